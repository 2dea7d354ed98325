//! subgate's integration tests: one binary (`cargo test --test it`) that
//! starts the real `subgate` binary on port 0 and talks to it through real
//! sockets, as users and operators do; the fleet tests add a real
//! `redis-server` that each test starts, kills and restarts itself.

mod common;

mod accounts;
mod auth;
mod capacity;
mod cli;
mod cluster;
mod envelope;
mod fleet;
mod graphql;
mod groups;
mod http;
mod inputs;
mod loadgen;
mod log_pipe;
mod publish;
mod resume;
mod rig;
mod shutdown;
mod slow_consumer;
mod sse;
mod user_limit;
mod ws;
