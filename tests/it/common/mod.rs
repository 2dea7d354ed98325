//! The harness every integration test uses: real nodes, real sockets.
//!
//! - [`node`]: the built binary as a child process on port 0, killed on drop.
//! - [`gql`]: GraphQL over HTTP and the domain helpers (users, posts).
//! - [`jwt`]: good and bad tokens, and `subgate token`.
//! - [`ws`]: a graphql-transport-ws / graphql-ws client with bounded reads.
//! - [`redis`]: a redis-server of the test's own, to share and to break.
//! - [`sse`]: an event-stream client; [`publish`]: the backend publish API.
//! - [`loadgen`]: `subgate-loadgen` run to its end, with its report.
//! - [`probe`]: `/healthz` polled while a test loads the node.

#![allow(dead_code)] // not every test module uses every helper

pub mod cluster;
pub mod gql;
pub mod jwt;
pub mod loadgen;
pub mod node;
pub mod probe;
pub mod publish;
pub mod redis;
pub mod sse;
pub mod ws;

pub use self::redis::{reserve_port, TestRedis};
pub use cluster::{bus_fleet, bus_node, Bus, TestCluster, TestSentinels};
pub use gql::*;
pub use jwt::{bad_tokens, cli_token, scoped_token, token};
pub use loadgen::run_loadgen;
pub use node::{run_cli, Node, TempDir, SECRET};
pub use probe::HealthProber;
pub use publish::{publish, publish_body, publish_raw, publisher_node, API_KEY};
pub use sse::{open_stream, Block, SseRead, SseStream};
pub use ws::{
    try_connect, until_live, ConnectOptions, GqlWs, RawWs, Read, LEGACY_WS, TRANSPORT_WS,
};
