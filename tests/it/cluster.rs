//! A fleet on Redis Cluster (three masters, three replicas) and on Redis
//! with Sentinel, every server a real process the test starts, kills and
//! reshapes: the fleet suite's scenarios pass on both, a topic's events
//! travel by sharded Pub/Sub on its own shard only, and a master killed or
//! a slot moved under live subscribers costs them nothing the history kept.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::common::*;
use crate::fleet::{self, eventually, posts_until_end, subscriber, until_live_via};

/// The fleet suite's cross-node delivery, on a cluster.
#[tokio::test]
async fn on_a_cluster_posts_created_on_one_node_reach_subscribers_on_two_others_once_each_in_order()
{
    let cluster = TestCluster::start().await;
    fleet::posts_created_on_one_node_reach_subscribers_on_two_others(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_thousand_posts_published_from_two_nodes_at_once_reach_every_node_once_each()
{
    let cluster = TestCluster::start().await;
    fleet::a_thousand_posts_published_from_two_nodes_at_once_reach_every_node_once_each_on(
        &cluster,
    )
    .await;
}

#[tokio::test]
async fn on_a_cluster_a_node_killed_with_sigkill_drops_only_its_own_clients() {
    let cluster = TestCluster::start().await;
    fleet::a_node_killed_with_sigkill_drops_only_its_own_clients_on(&cluster).await;
}

#[tokio::test]
async fn on_a_cluster_data_written_on_one_node_is_read_back_on_another_at_once() {
    let cluster = TestCluster::start().await;
    fleet::data_written_on_one_node_is_read_back_on_another_at_once_on(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_ten_concurrent_signups_with_one_email_make_one_user() {
    let cluster = TestCluster::start().await;
    fleet::ten_concurrent_signups_with_one_email_across_the_fleet_make_one_user_on(&cluster).await;
}

/// Topics named until each of the cluster's masters owns at least `per`
/// of them: `(topic, master port)`.
async fn topics_on_every_shard(cluster: &TestCluster, per: usize) -> Vec<(String, u16)> {
    let masters = cluster.masters().await;
    let mut counts: HashMap<u16, usize> = HashMap::new();
    let mut topics = Vec::new();
    for i in 0.. {
        if masters
            .iter()
            .all(|m| counts.get(m).copied().unwrap_or(0) >= per)
        {
            break;
        }
        let topic = format!("orders:{i}");
        let master = cluster
            .master_of(cluster.slot(&format!("subgate:history:{{{topic}}}")).await)
            .await;
        if counts.get(&master).copied().unwrap_or(0) < per {
            *counts.entry(master).or_default() += 1;
            topics.push((topic, master));
        }
    }
    topics
}

#[tokio::test]
async fn events_for_topics_on_every_shard_reach_subscribers_on_another_node_through_their_own_shard(
) {
    let cluster = TestCluster::start().await;
    let publisher = bus_node(&cluster, &[("SUBGATE__PUBLISH__API_KEYS", API_KEY)]);
    let reader = bus_node(&cluster, &[]);
    let topics = topics_on_every_shard(&cluster, 2).await;
    let watcher = create_user(&reader, "Watcher").await;
    let query: Vec<String> = topics.iter().map(|(t, _)| format!("topic={t}")).collect();
    let path = format!("/api/v1/events/stream?{}", query.join("&"));
    let bearer = format!("Bearer {}", watcher.token);
    let mut stream = open_stream(&reader, &path, &[("authorization", &bearer)])
        .await
        .unwrap_or_else(|reply| panic!("GET {path}: {} {}", reply.status, reply.body));

    // Each topic's channel is subscribed on its own shard, once (one
    // node), and on no other shard.
    for (topic, master) in &topics {
        let channel = format!("subgate:topic:{{{topic}}}");
        let counts = eventually(
            Duration::from_secs(10),
            &format!("{channel} subscribed"),
            async || {
                let counts = cluster.shard_numsub(&channel).await;
                if counts.get(master) == Some(&1) {
                    Ok(counts)
                } else {
                    Err(counts)
                }
            },
        )
        .await;
        for (port, n) in counts {
            if port != *master {
                assert_eq!(
                    n, 0,
                    "{channel} lives on {master}, yet {port} has a subscriber"
                );
            }
        }
    }

    let mut sent = Vec::new();
    for (i, (topic, _)) in topics.iter().enumerate() {
        publish(&publisher, topic, "order.placed", json!({ "n": i })).await;
        sent.push((topic.clone(), i as i64));
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let event = stream.next_event(Duration::from_secs(10)).await.json();
        got.push((
            event["topic"].as_str().unwrap_or_default().to_owned(),
            event["payload"]["n"].as_i64().unwrap_or(-1),
        ));
    }
    got.sort();
    sent.sort();
    assert_eq!(
        got, sent,
        "every topic's event arrives once, from every shard"
    );
}

/// Kills the master that owns `posts` under live subscribers on three
/// nodes while a publisher keeps publishing: the replica is promoted, the
/// subscribers receive again within 10 s with no action of theirs, nothing
/// acknowledged is lost, and a publish in the window fails rather than
/// lying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_live_subscribers_is_failed_over_and_they_receive_again_within_10s() {
    let mut cluster = TestCluster::start().await;
    let [n1, n2, n3] = fleet::fleet(&cluster);
    let author = create_user(&n3, "Publisher").await;
    let mut s1 = subscriber(&n1).await;
    let mut s2 = subscriber(&n2).await;
    until_live_via(&n3, &author.token, &mut [&mut s1, &mut s2], "warm-up").await;

    let slot = cluster.slot("subgate:history:{posts}").await;
    let victim = cluster.master_of(slot).await;
    // What the history holds now has reached the replica (replication is
    // asynchronous: a write the replica never got is lost with its master).
    let replica = cluster.replica_of(victim).await;
    cluster
        .node(victim)
        .wait_replicated_to(cluster.node(replica))
        .await;
    cluster.node_mut(victim).kill();
    let killed_at = tokio::time::Instant::now();

    // Publish once every 100 ms until a publish is acknowledged again;
    // every acknowledged post must arrive, the failed ones never count.
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    let mut recovered_after = None;
    for i in 0..200 {
        let title = format!("through the failover {i}");
        match fleet::try_create_post(&n3, &author.token, &title, "").await {
            Ok(id) => {
                if recovered_after.is_none() {
                    recovered_after = Some(killed_at.elapsed());
                }
                acknowledged.push((id, title));
                if acknowledged.len() >= 5 {
                    break;
                }
            }
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered_after = recovered_after.expect("publishing never came back after the failover");
    assert!(
        recovered_after < Duration::from_secs(10),
        "publishing came back only after {recovered_after:?}"
    );
    assert_ne!(
        cluster.master_of(slot).await,
        victim,
        "a replica took over the slot"
    );
    create_post(&n3, &author.token, fleet::END, "").await;
    for (who, ws) in [
        ("node 1's subscriber", &mut s1),
        ("node 2's subscriber", &mut s2),
    ] {
        let got = posts_until_end(ws, Duration::from_secs(10), who).await;
        // What was acknowledged before the kill reached them already; what
        // was acknowledged after must all arrive, in order, once.
        let after: Vec<_> = got
            .into_iter()
            .filter(|(_, title)| title.starts_with("through the failover"))
            .collect();
        assert_eq!(
            after, acknowledged,
            "{who}: every post acknowledged during and after the failover, once, in order ({refused} publishes were refused in the window)"
        );
    }
}

/// Moves the slot of `posts` to another master under live subscribers:
/// the server ends the shard channel subscriptions, the nodes subscribe
/// again where the slot now lives, and delivery continues.
#[tokio::test]
async fn a_slot_moved_to_another_master_under_live_subscribers_keeps_delivering() {
    let cluster = TestCluster::start().await;
    let [n1, n2] = fleet::fleet(&cluster);
    let author = create_user(&n2, "Publisher").await;
    let mut s1 = subscriber(&n1).await;
    let mut s2 = subscriber(&n2).await;
    until_live_via(&n2, &author.token, &mut [&mut s1, &mut s2], "warm-up").await;

    let slot = cluster.slot("subgate:history:{posts}").await;
    let from = cluster.master_of(slot).await;
    let to = *cluster
        .masters()
        .await
        .iter()
        .find(|m| **m != from)
        .expect("another master");
    cluster.move_slot(slot, to).await;
    assert_eq!(cluster.master_of(slot).await, to);

    // The subscriptions follow the slot: both nodes listen on its new
    // shard, none on the old one.
    let channel = "subgate:topic:{posts}";
    eventually(
        Duration::from_secs(10),
        "both nodes subscribed on the new shard",
        async || {
            let counts = cluster.shard_numsub(channel).await;
            if counts.get(&to) == Some(&2) && counts.get(&from) == Some(&0) {
                Ok(())
            } else {
                Err(counts)
            }
        },
    )
    .await;
    let mut published = Vec::new();
    for i in 0..10 {
        let title = format!("after the move {i}");
        published.push((create_post(&n2, &author.token, &title, "").await, title));
    }
    create_post(&n2, &author.token, fleet::END, "").await;
    for (who, ws) in [
        ("node 1's subscriber", &mut s1),
        ("node 2's subscriber", &mut s2),
    ] {
        let got = posts_until_end(ws, Duration::from_secs(10), who).await;
        let after: Vec<_> = got
            .into_iter()
            .filter(|(_, t)| t.starts_with("after the move"))
            .collect();
        assert_eq!(
            after, published,
            "{who}: every post after the move, once, in order"
        );
    }
}

/// Sentinel: one master, one replica, three sentinels. The master is
/// killed; the nodes follow the promotion and deliver again within 10 s,
/// and `/readyz` names the master in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sentinel_the_fleet_follows_a_failover_and_delivers_again_within_10s() {
    let mut rig = TestSentinels::start().await;
    let [n1, n2] = fleet::fleet(&rig);
    let author = create_user(&n2, "Publisher").await;
    let mut s1 = subscriber(&n1).await;
    until_live_via(&n2, &author.token, &mut [&mut s1], "warm-up").await;
    let old = rig.master.port();
    let ready = get(&n1, "/readyz").await;
    assert!(
        ready.body.contains(&format!("127.0.0.1:{old}")),
        "/readyz names the master in use: {}",
        ready.body
    );

    rig.master.wait_replicated_to(&rig.replica).await;
    rig.master.kill();
    let killed_at = tokio::time::Instant::now();
    let mut acknowledged = Vec::new();
    for i in 0..200 {
        let title = format!("through the failover {i}");
        if let Ok(id) = fleet::try_create_post(&n2, &author.token, &title, "").await {
            acknowledged.push((id, title));
            if acknowledged.len() >= 5 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !acknowledged.is_empty(),
        "publishing never came back after the failover"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "five publishes took {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(
        rig.master_port().await,
        rig.replica.port(),
        "the replica was promoted"
    );
    create_post(&n2, &author.token, fleet::END, "").await;
    let got = posts_until_end(&mut s1, Duration::from_secs(10), "node 1's subscriber").await;
    let after: Vec<_> = got
        .into_iter()
        .filter(|(_, t)| t.starts_with("through the failover"))
        .collect();
    assert_eq!(
        after, acknowledged,
        "every acknowledged post, once, in order"
    );
    let new = rig.replica.port();
    let ready = get(&n1, "/readyz").await;
    assert!(
        ready.body.contains(&format!("127.0.0.1:{new}")),
        "/readyz names the new master: {}",
        ready.body
    );
}

/// A shard lost whole (its master and its replica killed): the nodes say
/// which shard in `/readyz` and `subgate_redis_shard_up`, and topics on the
/// other shards keep delivering.
#[tokio::test]
async fn a_shard_lost_whole_is_named_by_readyz_while_the_other_shards_keep_delivering() {
    let mut cluster = TestCluster::start().await;
    let publisher = bus_node(&cluster, &[("SUBGATE__PUBLISH__API_KEYS", API_KEY)]);
    // The reader rebuilds its view of the cluster soon after the shard is
    // lost (topics unsubscribed for 1 s): delivery on the live shards must
    // survive that too.
    let reader = bus_node(
        &cluster,
        &[("SUBGATE__REDIS__SUBSCRIBE_TIMEOUT_SECONDS", "1")],
    );
    let topics = topics_on_every_shard(&cluster, 1).await;
    let watcher = create_user(&reader, "Watcher").await;
    let query: Vec<String> = topics.iter().map(|(t, _)| format!("topic={t}")).collect();
    let path = format!("/api/v1/events/stream?{}", query.join("&"));
    let bearer = format!("Bearer {}", watcher.token);
    let mut stream = open_stream(&reader, &path, &[("authorization", &bearer)])
        .await
        .unwrap_or_else(|reply| panic!("GET {path}: {} {}", reply.status, reply.body));
    for (topic, master) in &topics {
        let channel = format!("subgate:topic:{{{topic}}}");
        eventually(
            Duration::from_secs(10),
            &format!("{channel} subscribed"),
            async || {
                let counts = cluster.shard_numsub(&channel).await;
                if counts.get(master) == Some(&1) {
                    Ok(())
                } else {
                    Err(counts)
                }
            },
        )
        .await;
    }
    // The shard that holds none of the store's keys goes: the others
    // keep the publish API (which reads the store) working.
    let store_master = cluster.master_of(cluster.slot("{subgate:}seq").await).await;
    let (lost_topic, victim) = topics
        .iter()
        .find(|(_, m)| *m != store_master)
        .cloned()
        .expect("a topic on a shard without the store");
    let replica = cluster.replica_of(victim).await;
    cluster.node_mut(replica).kill();
    cluster.node_mut(victim).kill();

    let named = format!("redis shard 127.0.0.1:{victim}");
    eventually(
        Duration::from_secs(15),
        "/readyz names the shard that is down",
        async || {
            let reply = get(&reader, "/readyz").await;
            if reply.status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && reply.body.contains(&named)
            {
                Ok(())
            } else {
                Err((reply.status, reply.body))
            }
        },
    )
    .await;
    let down = format!("subgate_redis_shard_up{{shard=\"127.0.0.1:{victim}\"}} 0");
    eventually(
        Duration::from_secs(10),
        "subgate_redis_shard_up says which shard is down",
        async || {
            let metrics = get(&reader, "/metrics").await.body;
            if metrics.contains(&down) {
                Ok(())
            } else {
                let up: Vec<&str> = metrics
                    .lines()
                    .filter(|l| l.starts_with("subgate_redis_shard_up"))
                    .collect();
                Err(up.join("; "))
            }
        },
    )
    .await;

    // The topics of the other shards still deliver.
    let alive: Vec<&String> = topics
        .iter()
        .filter(|(t, _)| *t != lost_topic)
        .map(|(t, _)| t)
        .collect();
    for (i, topic) in alive.iter().enumerate() {
        publish(&publisher, topic, "order.placed", json!({ "n": i })).await;
    }
    let mut got = Vec::new();
    while got.len() < alive.len() {
        let event = stream.next_event(Duration::from_secs(10)).await.json();
        if event["type"] == "order.placed" {
            got.push(event["topic"].as_str().unwrap_or_default().to_owned());
        }
    }
    got.sort();
    let mut want: Vec<String> = alive.iter().map(|t| (*t).clone()).collect();
    want.sort();
    assert_eq!(got, want, "every topic on a live shard delivers");
}

/// The fleet suite's resume, presence and per-user limit scenarios, on a
/// cluster: history and resume across nodes on every transport, presence
/// and typing across the fleet, and the fleet-wide connection limit.
#[tokio::test]
async fn on_a_cluster_a_graphql_subscriber_resumes_on_another_node_with_exactly_what_it_missed() {
    let cluster = TestCluster::start().await;
    crate::resume::a_subscriber_resumes_on_another_node_with_exactly_what_it_missed_on(&cluster)
        .await;
}

#[tokio::test]
async fn on_a_cluster_a_ws_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let cluster = TestCluster::start().await;
    crate::envelope::a_client_resumes_on_another_node_with_exactly_what_it_missed_on(&cluster)
        .await;
}

#[tokio::test]
async fn on_a_cluster_an_event_stream_resumes_on_another_node_with_exactly_what_it_missed() {
    let cluster = TestCluster::start().await;
    crate::sse::a_stream_resumes_on_another_node_with_exactly_what_it_missed_on(&cluster).await;
}

#[tokio::test]
async fn on_a_cluster_a_stream_of_topics_on_several_shards_resumes_every_topic() {
    let cluster = TestCluster::start().await;
    crate::sse::a_stream_of_several_topics_resumes_every_topic_from_its_composite_id_on(&cluster)
        .await;
}

#[tokio::test]
async fn on_a_cluster_presence_typing_and_messages_cross_the_fleet() {
    let cluster = TestCluster::start().await;
    crate::envelope::presence_typing_and_messages_cross_the_fleet_and_a_killed_node_goes_offline_within_the_ttl_on(&cluster).await;
}

#[tokio::test]
async fn on_a_cluster_a_users_connections_are_limited_across_the_fleet() {
    let cluster = TestCluster::start().await;
    crate::user_limit::a_users_connections_are_limited_across_the_fleet_and_a_dead_nodes_lapse_on(
        &cluster,
    )
    .await;
}

#[tokio::test]
async fn with_sentinel_an_event_stream_resumes_on_another_node_with_exactly_what_it_missed() {
    let rig = TestSentinels::start().await;
    crate::sse::a_stream_resumes_on_another_node_with_exactly_what_it_missed_on(&rig).await;
}

#[tokio::test]
async fn with_sentinel_presence_typing_and_messages_cross_the_fleet() {
    let rig = TestSentinels::start().await;
    crate::envelope::presence_typing_and_messages_cross_the_fleet_and_a_killed_node_goes_offline_within_the_ttl_on(&rig).await;
}

/// Nodes started before their cluster is made (compose starts everything
/// at once): not ready, saying why, until the cluster serves its slots;
/// then ready, and subscriptions made afterwards deliver.
#[tokio::test]
async fn nodes_started_before_their_cluster_is_made_wait_unready_then_deliver() {
    let cluster = TestCluster::start_nodes().await;
    let [n1, n2] = fleet::fleet(&cluster);
    // First "connecting", then, once a connection is tried, why.
    eventually(
        Duration::from_secs(10),
        "/readyz says no shard serves slots yet",
        async || {
            let reply = get(&n1, "/readyz").await;
            if reply.status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && reply.body.contains("slots")
            {
                Ok(())
            } else {
                Err((reply.status, reply.body))
            }
        },
    )
    .await;
    // The nodes keep trying for a while before the cluster is made.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.create().await;
    for (node, name) in [(&n1, "node 1"), (&n2, "node 2")] {
        fleet::readyz_becomes(node, reqwest::StatusCode::OK, Duration::from_secs(20), name).await;
    }
    let author = create_user(&n2, "Publisher").await;
    let mut s1 = subscriber(&n1).await;
    until_live_via(&n2, &author.token, &mut [&mut s1], "warm-up").await;
    fleet::next_post_reaches_all(
        &n2,
        &author.token,
        &mut [("node 1's subscriber", &mut s1)],
        "made",
    )
    .await;
}
