//! What only the Redis store has: the key layout, its behaviour while
//! Redis is down, hung or shared. The trait's behaviour is checked by the
//! conformance suite.

use std::collections::BTreeSet;

use crate::domain::entities::Create;
use std::fmt;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::DateTime;

use super::*;
use crate::infra::redis::RedisConfig;
use crate::telemetry::metrics::Metrics;
use crate::test_support::{free_port, RedisServer};

const TIMEOUT: Duration = Duration::from_millis(300);
const FIRST_PAGE: PageRequest = PageRequest::first(5);
/// Scheduling slack on a busy test machine; far below "hangs".
const SLACK: Duration = Duration::from_secs(1);

fn store(url: &str, prefix: &str) -> RedisStore {
    let mut config = RedisConfig::new(url, prefix);
    config.pool_size = 4;
    config.command_timeout = TIMEOUT;
    let redis = Redis::new(config, Arc::new(Metrics::new())).expect("a valid URL");
    RedisStore::new(redis)
}

fn new_user(email: &str) -> NewUser {
    NewUser {
        email: email.into(),
        name: "n".into(),
        password_hash: "h".into(),
    }
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(server.url()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

fn assert_unavailable<T: fmt::Debug>(what: &str, result: StoreResult<T>) {
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{what}: expected Unavailable, got {result:?}"
    );
}

/// Every kind of call fails, and fails fast, while Redis is away. The
/// calls run together, so together they must finish within one timeout.
async fn assert_every_call_unavailable(s: &RedisStore) {
    let page = PageRequest::first(10);
    let ids = ["a".to_owned(), "b".to_owned()];
    let started = Instant::now();
    let (ping, create, get, find, list, send, mark) = tokio::join!(
        s.ping(),
        s.create_user(new_user("x@example.com")),
        s.get_users(&ids),
        s.find_user_by_email("x@example.com"),
        s.list_posts(None, page),
        s.create_message("c", "u", "hi".into()),
        s.mark_notification_read("u", "n"),
    );
    assert!(
        started.elapsed() < TIMEOUT + SLACK,
        "answered after {:?}",
        started.elapsed()
    );
    assert_unavailable("ping", ping);
    assert_unavailable("create_user", create);
    assert_unavailable("get_users", get);
    assert_unavailable("find_user_by_email", find);
    assert_unavailable("list_posts", list);
    assert_unavailable("create_message", send);
    assert_unavailable("mark_notification_read", mark);
}

#[test]
fn a_malformed_url_is_refused_up_front() {
    let config = RedisConfig::new("not a url", "p:");
    assert!(Redis::new(config, Arc::new(Metrics::new())).is_err());
}

#[tokio::test]
async fn a_node_starts_while_redis_is_down_and_serves_once_it_is_up() {
    let port = free_port();
    let s = store(&format!("redis://127.0.0.1:{port}/"), "subgate:");
    // No call yet: nothing is known to be wrong.
    assert!(s.readiness().is_ok());

    assert_every_call_unavailable(&s).await;
    let why = s.readiness().expect_err("not ready while Redis is down");
    assert!(why.contains("Redis"), "{why}");

    let _server = RedisServer::start_on(port);
    s.ping().await.unwrap();
    assert!(s.readiness().is_ok());
    s.create_user(new_user("first@example.com")).await.unwrap();
}

#[tokio::test]
async fn a_stopped_redis_answers_unavailable_and_a_restarted_one_serves_again() {
    let mut server = RedisServer::start();
    let s = store(&server.url(), "subgate:");
    let before = s.create_user(new_user("before@example.com")).await.unwrap();
    // Several pooled connections, all of which go stale together.
    let reads: Vec<_> = (0..8)
        .map(|_| s.get_users(std::slice::from_ref(&before.id)))
        .collect();
    for read in futures_util::future::join_all(reads).await {
        read.unwrap();
    }
    assert!(s.readiness().is_ok());

    server.stop();
    assert_every_call_unavailable(&s).await;
    assert!(s.readiness().is_err());

    // A new, empty server on the same address: no stale connection and
    // no missing script may get in the way.
    let _server = RedisServer::start_on(server.port());
    s.ping().await.unwrap();
    assert!(s.readiness().is_ok());
    s.create_user(new_user("after@example.com")).await.unwrap();
    assert_eq!(s.get_users(&[before.id]).await.unwrap(), vec![None]);
}

#[tokio::test]
async fn a_redis_that_never_answers_cannot_hang_a_call() {
    // The kernel completes connections into the backlog, nobody ever
    // reads or answers: the worst kind of outage for a client.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = store(
        &format!("redis://{}/", silent.local_addr().unwrap()),
        "subgate:",
    );
    assert_every_call_unavailable(&s).await;
    assert!(s.readiness().is_err());
}

#[tokio::test]
async fn a_paused_redis_times_out_and_serves_again_when_resumed() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let server = RedisServer::start();
    let s = store(&server.url(), "subgate:");
    let user = s.create_user(new_user("p@example.com")).await.unwrap();
    let pid = Pid::from_raw(server.pid().unwrap() as i32);

    kill(pid, Signal::SIGSTOP).unwrap();
    assert_every_call_unavailable(&s).await;
    // Whichever layer noticed first (connecting, or our deadline), the
    // node is not ready.
    assert!(s.readiness().is_err());

    kill(pid, Signal::SIGCONT).unwrap();
    // Answers to the abandoned requests may still arrive; they must not
    // be taken for answers to new ones.
    assert_eq!(
        s.get_users(std::slice::from_ref(&user.id)).await.unwrap(),
        vec![Some(user.clone())]
    );
    assert_eq!(
        s.find_user_by_email("p@example.com").await.unwrap(),
        Some(user)
    );
    assert!(s.readiness().is_ok());
}

#[tokio::test]
async fn a_refused_request_is_unavailable_without_costing_readiness() {
    let server = RedisServer::start();
    let s = store(&server.url(), "bad:");
    let mut con = raw(&server).await;
    // A foreign writer put the wrong type under our prefix.
    let _: () = redis::cmd("SET")
        .arg("bad:users")
        .arg("not a sorted set")
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("bad:post:half")
        .arg("id")
        .arg("half")
        .query_async(&mut con)
        .await
        .unwrap();

    let listed = s.list_users(FIRST_PAGE).await;
    assert!(
        matches!(listed, Err(StoreError::Unavailable(_))),
        "{listed:?}"
    );
    let half = s.get_posts(&["half".into()]).await;
    assert!(
        matches!(&half, Err(StoreError::Unavailable(why)) if why.contains("malformed post")),
        "{half:?}"
    );
    assert!(s.readiness().is_ok(), "Redis answered; it is reachable");
}

#[tokio::test]
async fn two_nodes_racing_for_one_email_have_one_winner() {
    let server = RedisServer::start();
    let nodes = [
        Arc::new(store(&server.url(), "subgate:")),
        Arc::new(store(&server.url(), "subgate:")),
    ];
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let node = nodes[i % 2].clone();
            tokio::spawn(async move { node.create_user(new_user("shared@example.com")).await })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e, StoreError::Conflict { field: "email" }),
        }
    }
    assert_eq!(wins, 1);
    // Either node sees the one user.
    for node in &nodes {
        assert_eq!(node.list_users(FIRST_PAGE).await.unwrap().total_count, 1);
    }
}

#[tokio::test]
async fn prefixes_keep_deployments_apart() {
    let server = RedisServer::start();
    let (blue, green) = (
        store(&server.url(), "blue:"),
        store(&server.url(), "green:"),
    );
    let b = blue
        .create_user(new_user("same@example.com"))
        .await
        .unwrap();
    let g = green
        .create_user(new_user("same@example.com"))
        .await
        .unwrap();
    assert_eq!(
        blue.get_users(&[b.id.clone(), g.id.clone()]).await.unwrap(),
        vec![Some(b), None]
    );
    assert_eq!(green.list_users(FIRST_PAGE).await.unwrap().total_count, 1);
}

#[tokio::test]
async fn keys_follow_the_documented_layout() {
    let server = RedisServer::start();
    let s = store(&server.url(), "lay:");
    let u = s.create_user(new_user(" Lay@Example.com")).await.unwrap();
    let p = s.create_post(&u.id, "t".into(), "c".into()).await.unwrap();
    let c = s.create_comment(&p.id, &u.id, "c".into()).await.unwrap();
    let ch = s
        .create_channel(&u.id, "ch".into(), true, vec!["x\"y".into()])
        .await
        .unwrap();
    let m = s.create_message(&ch.id, &u.id, "m".into()).await.unwrap();
    let n = s
        .create_notification(&u.id, "k".into(), "m".into(), serde_json::json!({"a": 1}))
        .await
        .unwrap();
    s.set_topic_readers("orders:eu", &TopicReaders::Users(vec![u.id.clone()]))
        .await
        .unwrap();

    let mut con = raw(&server).await;
    let keys: BTreeSet<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    let expected: BTreeSet<String> = [
        "lay:seq".to_owned(),
        format!("lay:user:{}", u.id),
        "lay:email:lay@example.com".to_owned(),
        "lay:users".to_owned(),
        format!("lay:post:{}", p.id),
        "lay:posts".to_owned(),
        format!("lay:posts:author:{}", u.id),
        format!("lay:comment:{}", c.id),
        format!("lay:comments:post:{}", p.id),
        format!("lay:channel:{}", ch.id),
        "lay:channels".to_owned(),
        format!("lay:message:{}", m.id),
        format!("lay:messages:channel:{}", ch.id),
        format!("lay:notification:{}", n.id),
        format!("lay:notifications:user:{}", u.id),
        "lay:readers:orders:eu".to_owned(),
    ]
    .into();
    assert_eq!(keys, expected);

    let reader = con.clone();
    let get = |key: String, field: &'static str| {
        let mut con = reader.clone();
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg(field)
                .query_async::<String>(&mut con)
                .await
                .unwrap()
        }
    };
    let owner: String = redis::cmd("GET")
        .arg("lay:email:lay@example.com")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(owner, u.id);
    assert_eq!(
        get(format!("lay:user:{}", u.id), "email").await,
        " Lay@Example.com"
    );
    assert_eq!(
        get(format!("lay:channel:{}", ch.id), "is_private").await,
        "1"
    );
    let members = get(format!("lay:channel:{}", ch.id), "member_ids").await;
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&members).unwrap(),
        vec![u.id.clone(), "x\"y".into()]
    );
    assert_eq!(get(format!("lay:notification:{}", n.id), "read").await, "0");
    assert_eq!(
        get(format!("lay:notification:{}", n.id), "payload").await,
        r#"{"a":1}"#
    );
    let readers: String = redis::cmd("GET")
        .arg("lay:readers:orders:eu")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(readers, format!(r#"{{"users":["{}"]}}"#, u.id));
    let created = get(format!("lay:message:{}", m.id), "created_at").await;
    assert_eq!(
        DateTime::parse_from_rfc3339(&created).unwrap(),
        m.created_at
    );
    // The position in the hash is the score in the index.
    let seq = get(format!("lay:post:{}", p.id), "seq").await;
    let score: String = redis::cmd("ZSCORE")
        .arg("lay:posts")
        .arg(&p.id)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(seq, score);

    // Deleting removes the entity and its index entries, not the lists.
    s.delete_post(&p.id).await.unwrap();
    s.delete_user(&u.id).await.unwrap();
    let keys: BTreeSet<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    for gone in [
        format!("lay:post:{}", p.id),
        format!("lay:user:{}", u.id),
        "lay:email:lay@example.com".into(),
    ] {
        assert!(!keys.contains(&gone), "{gone} is left behind");
    }
    let indexed: usize = redis::cmd("ZCARD")
        .arg(format!("lay:posts:author:{}", u.id))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(indexed, 0);
}

#[tokio::test]
async fn reads_what_the_previous_version_wrote() {
    // Hashes exactly as the single-file store of the previous version
    // wrote them: a node of this version reads a fleet's existing data.
    let server = RedisServer::start();
    let mut con = raw(&server).await;
    let writes: &[&[&str]] = &[
        &["SET", "old:seq", "3"],
        &[
            "HSET",
            "old:user:u1",
            "id",
            "u1",
            "email",
            " Old@Example.com",
            "email_norm",
            "old@example.com",
            "name",
            "Old",
            "password_hash",
            "$argon2id$h",
            "created_at",
            "2024-05-06T07:08:09.5Z",
            "updated_at",
            "2024-05-06T07:08:10Z",
            "seq",
            "1",
        ],
        &["SET", "old:email:old@example.com", "u1"],
        &["ZADD", "old:users", "1", "u1"],
        &[
            "HSET",
            "old:channel:c1",
            "id",
            "c1",
            "name",
            "general",
            "is_private",
            "1",
            "owner_id",
            "u1",
            "member_ids",
            r#"["u1","u2"]"#,
            "created_at",
            "2024-05-06T07:08:09Z",
            "seq",
            "2",
        ],
        &["ZADD", "old:channels", "2", "c1"],
        &[
            "HSET",
            "old:notification:n1",
            "id",
            "n1",
            "user_id",
            "u1",
            "type",
            "mention",
            "message",
            "hi",
            "payload",
            r#"{"a":[1,2]}"#,
            "read",
            "0",
            "created_at",
            "2024-05-06T07:08:09.123456789Z",
            "seq",
            "3",
        ],
        &["ZADD", "old:notifications:user:u1", "3", "n1"],
    ];
    for args in writes {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let _: () = cmd.query_async(&mut con).await.unwrap();
    }
    let s = store(&server.url(), "old:");
    let at = |t: &str| {
        DateTime::parse_from_rfc3339(t)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let user = User {
        id: "u1".into(),
        email: " Old@Example.com".into(),
        name: "Old".into(),
        password_hash: "$argon2id$h".into(),
        created_at: at("2024-05-06T07:08:09.5Z"),
        updated_at: at("2024-05-06T07:08:10Z"),
    };
    assert_eq!(
        s.find_user_by_email("old@example.com").await.unwrap(),
        Some(user.clone())
    );
    let users = s.list_users(FIRST_PAGE).await.unwrap();
    assert_eq!(users.items, vec![(1, user)]);
    let channel = s.get_channels(&["c1".into()]).await.unwrap();
    assert_eq!(
        channel,
        vec![Some(Channel {
            id: "c1".into(),
            name: "general".into(),
            is_private: true,
            owner_id: "u1".into(),
            member_ids: vec!["u1".into(), "u2".into()],
            created_at: at("2024-05-06T07:08:09Z"),
        })]
    );
    let read = s.mark_notification_read("u1", "n1").await.unwrap();
    assert_eq!(
        read,
        Notification {
            id: "n1".into(),
            user_id: "u1".into(),
            kind: "mention".into(),
            message: "hi".into(),
            payload: serde_json::json!({"a": [1, 2]}),
            read: true,
            created_at: at("2024-05-06T07:08:09.123456789Z"),
        }
    );
    // New entities continue the old positions.
    let post = s.create_post("u1", "t".into(), "c".into()).await.unwrap();
    let posts = s.list_posts(None, FIRST_PAGE).await.unwrap();
    assert_eq!(posts.items, vec![(4, post)]);
}
