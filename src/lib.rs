//! # subgate: a horizontally scalable GraphQL subscription gateway
//!
//! ## Components
//!
//! - [`config`]: typed, layered settings, validated before the node listens.
//! - [`app`]: the composition root; builds the [`state::AppState`] once and
//!   mounts the transports.
//! - [`state`]: what every handler shares (settings, store, hub, auth,
//!   schema, metrics, limits, presence, shutdown); imports no transport.
//! - [`auth`]: JWT verification, the [`auth::Principal`], the topic policy,
//!   and where a request's token comes from ([`auth::credentials`]).
//! - [`event`]: the event envelope, ids (resume positions) and topic names.
//! - [`broker`]: the seam to the bus (memory now; Redis Pub/Sub + history).
//! - [`infra`]: the one Redis layer the broker, the store and presence
//!   share: settings, pool, timed call, key layout, scripts, health.
//! - [`hub`]: topic -> local subscribers, bounded queues, slow-consumer
//!   cut-off, holes in a topic's live stream filled once per node.
//! - [`store`]: the domain data behind a trait (memory; Redis).
//! - [`domain`]: the rules, once: each operation of users, posts, comments,
//!   channels, messages and notifications takes the caller and a plain
//!   input and answers a typed result or a `DomainError`; the catalogue of
//!   event kinds (name, topic, payload type).
//! - [`graphql`]: the schema as adapters over the domain, its loaders and
//!   limits; identical subscriptions executed once per event
//!   ([`graphql::groups`]).
//! - [`transport`]: GraphQL over HTTP, over WebSocket (graphql-transport-ws
//!   and legacy graphql-ws) and over SSE; the event-envelope protocol on
//!   `/ws`; the resumable event stream (SSE); the backend publish API;
//!   health and metrics. No transport imports another: they share the one
//!   admission gate ([`transport::admission`]), the WebSocket layer
//!   ([`transport::socket`]: after the upgrade a WebSocket owns its TCP
//!   stream, one task per connection) and the event-stream body
//!   ([`transport::streaming`]). [`transport::server`] is the HTTP server
//!   that hands upgrades over.
//! - [`presence`]: who is online in which channel, with what status.
//! - [`ratelimit`]: token buckets per connection, user and publisher, per
//!   client address and email for `login` / `createUser` and failed publish
//!   authentication; the bounded password hashing slots.
//! - [`user_connections`]: the per-user connection limit (fleet-wide on Redis).
//! - [`telemetry`]: logs and the metrics registry (served by `transport::ops`).
//! - [`healthcheck`]: the `subgate healthcheck` probe (the container's HEALTHCHECK).
//! - [`shutdown`]: the drain.
//! - [`supervise`]: background tasks restarted (and counted) when they die.
//!
//! ## Data flow
//!
//! A transport turns a request into a [`domain::Domain`] operation, which
//! checks it, writes to the [`store::Store`] and publishes an event through
//! the [`broker::Broker`], which stamps it with an id and delivers it to the
//! hub of every subscribed node. The [`hub::Hub`] hands one shared,
//! already-encoded copy to each local subscriber's bounded queue; a
//! transport pulls from its queues and writes to its socket. Nothing on this
//! path waits on a slow client: a full queue, or on a WebSocket more than
//! `hub.subscriber_queue_bytes` waiting for the socket, cuts that client off
//! with close code 1013 (it reconnects) and is counted.
//!
//! ## Guarantees
//!
//! Events of one topic reach a subscriber in id order. Every queue is
//! bounded and every drop is counted with a reason.

pub mod app;
pub mod auth;
pub mod broker;
pub mod config;
pub mod domain;
pub mod error;
pub mod event;
pub mod graphql;
pub mod healthcheck;
pub mod hub;
pub mod infra;
pub mod presence;
pub mod ratelimit;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod supervise;
pub mod telemetry;
#[cfg(test)]
pub mod test_support;
pub mod transport;
pub mod user_connections;
