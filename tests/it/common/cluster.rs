//! Real Redis topologies beyond one server, started by the test on ports
//! of its own: a Redis Cluster of three masters with a replica each
//! (`redis-cli --cluster create … --cluster-replicas 1`), and a master
//! with a replica watched by three sentinels.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use super::node::TempDir;
use super::redis::{reserve_port, TestRedis};

/// How long a cluster node may be silent before the others fail it over:
/// short, so that a failover in a test takes seconds, and long enough that
/// a node starved of CPU by the rest of the suite is not failed over.
const NODE_TIMEOUT_MS: u64 = 3000;

/// Clusters running at once in this test process: six servers each, on a
/// machine of two cores.
static CLUSTERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Bounds every wait for the cluster to settle.
const SETTLE: Duration = Duration::from_secs(30);

pub struct TestCluster {
    /// Every node, in creation order: the first three start as masters.
    pub nodes: Vec<TestRedis>,
    _dir: TempDir,
    _turn: tokio::sync::SemaphorePermit<'static>,
}

impl TestCluster {
    /// Three masters and three replicas, every slot covered, state `ok`.
    pub async fn start() -> TestCluster {
        let cluster = Self::start_nodes().await;
        cluster.create().await;
        cluster
    }

    /// Six cluster-enabled servers, not yet made a cluster: no slot served.
    pub async fn start_nodes() -> TestCluster {
        let turn = CLUSTERS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let dir = TempDir::new();
        let nodes: Vec<TestRedis> = (0..6)
            .map(|_| {
                let port = reserve_port();
                // The cluster bus port is given too: its default (port +
                // 10000) may be another test's port, or an ephemeral one.
                let bus = reserve_port();
                let args = [
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    &NODE_TIMEOUT_MS.to_string(),
                    "--dir",
                    &dir.path().to_string_lossy(),
                    // A replica may be promoted however far it lagged.
                    "--cluster-replica-validity-factor",
                    "0",
                    // Replicas sync at once, not after 5 s.
                    "--repl-diskless-sync-delay",
                    "0",
                    // A shard lost whole leaves the others serving.
                    "--cluster-require-full-coverage",
                    "no",
                ]
                .map(str::to_owned);
                TestRedis::start_with(port, &args)
            })
            .collect();
        TestCluster {
            nodes,
            _dir: dir,
            _turn: turn,
        }
    }

    /// Makes the servers a cluster (`redis-cli --cluster create`, one
    /// replica per master) and waits until it has its shape.
    pub async fn create(&self) {
        let nodes = &self.nodes;
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create.output().expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_formed().await;
    }

    /// The seed URL a node is given.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// The settings a subgate node on this cluster gets.
    pub fn node_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SUBGATE__REDIS__URL", self.url()),
            ("SUBGATE__REDIS__MODE", "cluster".into()),
            (
                "SUBGATE__REDIS__CLUSTER_URLS",
                self.nodes[1..3]
                    .iter()
                    .map(TestRedis::url)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2".into()),
            // The shards are read every half second (readiness, metrics).
            ("SUBGATE__REDIS__PROBE_INTERVAL_SECONDS", "0.5".into()),
        ]
    }

    /// The port of the replica of the master on `port`.
    pub async fn replica_of(&self, port: u16) -> u16 {
        let id = self.id_of(port).await;
        let nodes: String = self.any().cmd(&["CLUSTER", "NODES"]).await;
        nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() >= 4 && f[2].contains("slave") && f[3] == id)
            .map(|f| port_of(f[1]))
            .unwrap_or_else(|| panic!("no replica of {port}:\n{nodes}"))
    }

    /// The node on `port`.
    pub fn node(&self, port: u16) -> &TestRedis {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    pub fn node_mut(&mut self, port: u16) -> &mut TestRedis {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// A running node to ask about the cluster.
    fn any(&self) -> &TestRedis {
        self.nodes
            .iter()
            .find(|n| n.running())
            .expect("a running cluster node")
    }

    /// `CLUSTER KEYSLOT key`.
    pub async fn slot(&self, key: &str) -> u16 {
        self.any().cmd::<u16>(&["CLUSTER", "KEYSLOT", key]).await
    }

    /// The port of the master serving `slot`, as the cluster says now.
    pub async fn master_of(&self, slot: u16) -> u16 {
        let nodes: String = self.any().cmd(&["CLUSTER", "NODES"]).await;
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            for range in &fields[8..] {
                let (lo, hi) = match range.split_once('-') {
                    Some((lo, hi)) => (lo.parse::<u16>(), hi.parse::<u16>()),
                    None => (range.parse::<u16>(), range.parse::<u16>()),
                };
                if let (Ok(lo), Ok(hi)) = (lo, hi) {
                    if (lo..=hi).contains(&slot) {
                        return port_of(fields[1]);
                    }
                }
            }
        }
        panic!("no master serves slot {slot}:\n{nodes}");
    }

    /// Ports of the masters serving slots now.
    pub async fn masters(&self) -> Vec<u16> {
        let nodes: String = self.any().cmd(&["CLUSTER", "NODES"]).await;
        let mut masters: Vec<u16> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() >= 9 && f[2].contains("master") && !f[2].contains("fail"))
            .map(|f| port_of(f[1]))
            .collect();
        masters.sort();
        masters
    }

    /// The node id of the node on `port`.
    pub async fn id_of(&self, port: u16) -> String {
        self.node(port).cmd(&["CLUSTER", "MYID"]).await
    }

    /// Waits until every running node says `cluster_state:ok` and every
    /// replica's link to its master is up (after a create or a failover).
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|n| n.running()) {
                let info: String = node.cmd(&["CLUSTER", "INFO"]).await;
                let replication: String = node.cmd(&["INFO", "replication"]).await;
                if !info.contains("cluster_state:ok")
                    || (replication.contains("role:slave")
                        && !replication.contains("master_link_status:up"))
                {
                    ok = false;
                }
            }
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach state ok within {SETTLE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the new cluster has its shape: three masters serving
    /// slots, each with a replica whose link is up, state `ok` everywhere.
    async fn wait_formed(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            self.wait_ok().await;
            let nodes: String = self.any().cmd(&["CLUSTER", "NODES"]).await;
            let rows: Vec<Vec<&str>> = nodes
                .lines()
                .map(|l| l.split_whitespace().collect())
                .collect();
            let masters = rows
                .iter()
                .filter(|f| f.len() >= 9 && f[2].contains("master"))
                .count();
            let replicas = rows
                .iter()
                .filter(|f| f.len() >= 4 && f[2].contains("slave"))
                .count();
            if masters == 3 && replicas == 3 {
                // wait_ok has seen every replica's link up: settled again
                // once the last replica is known.
                self.wait_ok().await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form 3 masters with a replica each within {SETTLE:?}:\n{nodes}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Moves `slot` (and every key in it) to the master on `to`, the way
    /// `redis-cli --cluster reshard` does: IMPORTING / MIGRATING, MIGRATE
    /// the keys, then NODE on every master.
    pub async fn move_slot(&self, slot: u16, to: u16) {
        let from = self.master_of(slot).await;
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (from_id, to_id) = (self.id_of(from).await, self.id_of(to).await);
        let s = slot.to_string();
        let _: String = self
            .node(to)
            .cmd(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
            .await;
        let _: String = self
            .node(from)
            .cmd(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
            .await;
        loop {
            let keys: Vec<String> = self
                .node(from)
                .cmd(&["CLUSTER", "GETKEYSINSLOT", &s, "100"])
                .await;
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _: String = self.node(from).cmd(&args).await;
        }
        for port in self.masters().await {
            let _: String = self
                .node(port)
                .cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id])
                .await;
        }
        self.wait_ok().await;
    }

    /// Counts per master port of the subscribers of sharded `channel`
    /// (`PUBSUB SHARDNUMSUB` asked of each master).
    pub async fn shard_numsub(&self, channel: &str) -> HashMap<u16, i64> {
        let mut counts = HashMap::new();
        for port in self.masters().await {
            let reply: HashMap<String, i64> = self
                .node(port)
                .cmd(&["PUBSUB", "SHARDNUMSUB", channel])
                .await;
            counts.insert(port, reply.get(channel).copied().unwrap_or(0));
        }
        counts
    }
}

/// The port of a `CLUSTER NODES` address (`127.0.0.1:7000@17000`).
fn port_of(addr: &str) -> u16 {
    addr.split('@')
        .next()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// A master, its replica and three sentinels watching it as `mymaster`.
pub struct TestSentinels {
    pub master: TestRedis,
    pub replica: TestRedis,
    pub sentinels: Vec<TestRedis>,
    _dir: TempDir,
}

pub const SENTINEL_MASTER: &str = "mymaster";

impl TestSentinels {
    pub async fn start() -> TestSentinels {
        let dir = TempDir::new();
        let quick = ["--repl-diskless-sync-delay".to_owned(), "0".to_owned()];
        let master = TestRedis::start_with(reserve_port(), &quick);
        let mut replica_args = quick.to_vec();
        replica_args.extend([
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port().to_string(),
        ]);
        let replica = TestRedis::start_with(reserve_port(), &replica_args);
        let sentinels = (0..3)
            .map(|i| {
                let port = reserve_port();
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\nsentinel monitor {SENTINEL_MASTER} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                         sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                         sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                        master.port()
                    ),
                )
                .expect("write a sentinel config");
                TestRedis::start_sentinel(port, &conf)
            })
            .collect();
        let rig = TestSentinels {
            master,
            replica,
            sentinels,
            _dir: dir,
        };
        // The sentinels know the replica and one another before a test
        // kills anything.
        let deadline = Instant::now() + SETTLE;
        loop {
            let mut ready = true;
            for s in &rig.sentinels {
                let replicas: Vec<HashMap<String, String>> =
                    s.cmd(&["SENTINEL", "REPLICAS", SENTINEL_MASTER]).await;
                let peers: Vec<HashMap<String, String>> =
                    s.cmd(&["SENTINEL", "SENTINELS", SENTINEL_MASTER]).await;
                if replicas.is_empty() || peers.len() < 2 {
                    ready = false;
                }
            }
            if ready {
                return rig;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not settle within {SETTLE:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn node_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SUBGATE__REDIS__MODE", "sentinel".into()),
            (
                "SUBGATE__REDIS__SENTINEL_URLS",
                self.sentinels
                    .iter()
                    .map(TestRedis::url)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("SUBGATE__REDIS__SENTINEL_MASTER", SENTINEL_MASTER.into()),
            ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2".into()),
        ]
    }

    /// The master's port as the sentinels name it now.
    pub async fn master_port(&self) -> u16 {
        let addr: Vec<String> = self.sentinels[0]
            .cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER])
            .await;
        addr[1].parse().expect("a port")
    }
}

/// Where a fleet's Redis is: what each node is told to reach it, and how
/// many connections (nodes) listen to a topic.
pub trait Bus {
    fn node_env(&self) -> Vec<(&'static str, String)>;

    /// Connections subscribed to `topic`'s channel (default prefix).
    async fn listeners(&self, topic: &str) -> i64;
}

impl Bus for TestRedis {
    fn node_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SUBGATE__REDIS__URL", self.url()),
            ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2".into()),
        ]
    }

    async fn listeners(&self, topic: &str) -> i64 {
        self.numsub(&format!("subgate:topic:{topic}")).await
    }
}

impl Bus for TestCluster {
    fn node_env(&self) -> Vec<(&'static str, String)> {
        TestCluster::node_env(self)
    }

    /// Sharded subscribers, summed over the masters (only the topic's own
    /// shard should have any).
    async fn listeners(&self, topic: &str) -> i64 {
        self.shard_numsub(&format!("subgate:topic:{{{topic}}}"))
            .await
            .values()
            .sum()
    }
}

impl Bus for TestSentinels {
    fn node_env(&self) -> Vec<(&'static str, String)> {
        TestSentinels::node_env(self)
    }

    async fn listeners(&self, topic: &str) -> i64 {
        let port = self.master_port().await;
        let master = [&self.master, &self.replica]
            .into_iter()
            .find(|r| r.port() == port)
            .expect("the master is one of the two servers");
        master.numsub(&format!("subgate:topic:{topic}")).await
    }
}

/// A node on `bus` (one Redis, a cluster, sentinels), with `extra` settings.
pub fn bus_node(bus: &impl Bus, extra: &[(&str, &str)]) -> super::node::Node {
    let env = bus.node_env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    super::node::Node::start(&all)
}

/// `N` nodes on `bus` with `extra` settings, started side by side (each
/// start waits for its `listening on` line; in parallel the fleet is up in
/// the time of one).
pub fn bus_fleet<const N: usize>(
    bus: &(impl Bus + Sync),
    extra: &[(&str, &str)],
) -> [super::node::Node; N] {
    std::thread::scope(|scope| {
        let starting: Vec<_> = (0..N)
            .map(|_| scope.spawn(|| bus_node(bus, extra)))
            .collect();
        // A node that fails to start fails the test with its own message.
        let nodes: Vec<super::node::Node> = starting
            .into_iter()
            .map(|s| s.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect();
        nodes.try_into().unwrap_or_else(|_| unreachable!())
    })
}
