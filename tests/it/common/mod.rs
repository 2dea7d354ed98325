//! The harness every integration test uses: real nodes, real sockets.
//!
//! - [`node`]: the built binary as a child process on port 0, killed on drop.
//! - [`gql`]: GraphQL over HTTP and the domain helpers (users, posts).
//! - [`jwt`]: good and bad tokens, and `subgate token`.
//! - [`ws`]: a graphql-transport-ws / graphql-ws client with bounded reads.

#![allow(dead_code)] // not every test module uses every helper

pub mod gql;
pub mod jwt;
pub mod node;
pub mod ws;

pub use gql::*;
pub use jwt::{bad_tokens, cli_token, token};
pub use node::{run_cli, Node, TempDir, SECRET};
pub use ws::{try_connect, until_live, ConnectOptions, GqlWs, RawWs, Read, LEGACY_WS, TRANSPORT_WS};
