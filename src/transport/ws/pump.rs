//! The I/O task of one GraphQL WebSocket: pumps frames between the socket,
//! a protocol machine and the connection's operation streams.
//!
//! One task per connection, selecting over:
//!
//! - the client's frames, read through [`Reader::receive`](crate::transport::socket::Reader::receive) (frame limits,
//!   fragments, pings);
//! - the operation streams, in one `StreamMap` polled in place: no task or
//!   channel per operation. While the socket is slow this task simply stops
//!   polling them, and the hub's bounded queues (with their slow-consumer
//!   cut-off) take the strain;
//! - the socket's readiness to take what waits for it;
//! - the heartbeat ([`Heartbeat`](crate::transport::socket::Heartbeat), and the protocol's own
//!   keep-alive, if it has one);
//! - the `connection_init` deadline;
//! - the expiry of the token the connection runs as: 4403;
//! - the connection's [`Cutoff`]: fired by the hub when one of its
//!   subscriptions overflowed, it closes with 1013 "slow consumer";
//! - the node's drain: 1001 "server shutting down".
//!
//! Every write goes through the [`Outbox`](crate::transport::socket::Outbox): the frames of one turn
//! go out in one write at its end, and a client that stops reading cannot
//! hold the task.

use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_graphql::parser::types::OperationType;
use async_graphql::{Executor, Response};
use futures_util::stream::{BoxStream, Stream, StreamExt};
use tokio_stream::StreamMap;

use super::protocol::{Action, Protocol};
use crate::config::WebsocketSettings;
use crate::error::close;
use crate::graphql::groups::{own_results, Groups, Membership, Output};
use crate::graphql::limits::{check_large, is_large, Unchecked};
use crate::graphql::subscription::TransportLabel;
use crate::graphql::{ClientAddr, Viewer};
use crate::hub::Cutoff;
use crate::shutdown::Shutdown;
use crate::telemetry::metrics::{GaugeGuard, Metrics};
use crate::transport::socket::{
    finish, going_away, slow_consumer, End, Expiry, Incoming, Received, Socket,
};
use crate::user_connections::UserConnections;

/// The connection's timing and limits, in the units the task uses.
#[derive(Debug, Clone)]
pub struct PumpConfig {
    pub ping_interval: Duration,
    pub init_timeout: Duration,
    pub max_frame_bytes: usize,
    pub max_operations: usize,
}

impl PumpConfig {
    pub fn from_settings(ws: &WebsocketSettings) -> Self {
        Self {
            ping_interval: Duration::from_secs(ws.ping_interval_seconds),
            init_timeout: Duration::from_secs(ws.connection_init_timeout_seconds),
            max_frame_bytes: ws.max_frame_bytes,
            max_operations: ws.max_subscriptions_per_connection,
        }
    }
}

/// What the task needs besides the socket and the protocol machine.
pub struct Connection<E: Executor> {
    pub executor: E,
    pub config: PumpConfig,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// The client's address, for the mutations limited by it.
    pub client: ClientAddr,
    /// The per-user limit, for a user who authenticates in
    /// `connection_init` rather than with the upgrade.
    pub user_connections: Arc<UserConnections>,
    /// The user the upgrade already took a place for.
    pub admitted_user: Option<String>,
    /// The node's groups of identical subscriptions, when subscriptions are
    /// shared (`None`: each runs on its own).
    pub groups: Option<Arc<Groups<E>>>,
}

/// One operation's results, then one `None` to say it ended (a `StreamMap`
/// drops finished streams without telling). Holds the `subscriptions`
/// gauge up while a subscription runs.
struct OperationStream {
    inner: Option<BoxStream<'static, Output>>,
    _active: Option<GaugeGuard>,
}

impl Stream for OperationStream {
    type Item = Option<Output>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(inner.poll_next_unpin(cx)) {
            Some(response) => Poll::Ready(Some(Some(response))),
            None => {
                self.inner = None;
                Poll::Ready(Some(None))
            }
        }
    }
}

/// The results of `request`: a large document is first parsed and
/// validated off the worker ([`check_large`]), while the connection goes on
/// serving its other operations; one it cannot check ends in one error.
fn checked_stream<E: Executor>(
    executor: &E,
    mut request: async_graphql::Request,
    metrics: &Arc<Metrics>,
) -> BoxStream<'static, Response> {
    if !is_large(&request.query) {
        return executor.execute_stream(request, None);
    }
    let (executor, metrics) = (executor.clone(), metrics.clone());
    futures_util::stream::once(async move {
        match check_large(&executor, &mut request).await {
            Ok(()) => executor.execute_stream(request, None),
            Err(unchecked) => {
                if matches!(unchecked, Unchecked::Busy) {
                    metrics
                        .rate_limited_total
                        .with_label_values(&[crate::ratelimit::Scope::LargeDocument.as_str()])
                        .inc();
                }
                let error = Response::from_errors(vec![unchecked.server_error()]);
                futures_util::stream::once(async move { error }).boxed()
            }
        }
    })
    .flatten()
    .boxed()
}

// ---------------------------------------------------------------------------
// The task.

/// What woke the task. Lives for one loop turn on the stack, so the size of
/// the `Response` variant costs nothing worth an allocation per result.
#[allow(clippy::large_enum_variant)]
enum Event {
    Drain,
    Cut,
    Frame(Incoming),
    /// The socket may take what waits for it.
    Writable,
    Result(String, Option<Output>),
    InitTimeout,
    Heartbeat,
    Expired,
}

/// Serves one connection until either side closes it.
pub async fn run<E: Executor, P: Protocol>(
    connection: Connection<E>,
    mut machine: P,
    socket: Socket,
) {
    let Connection {
        executor,
        config,
        metrics,
        shutdown,
        client,
        user_connections,
        admitted_user,
        groups,
    } = connection;
    let mut admitted_user = admitted_user;
    // A place under the per-user limit taken after the upgrade.
    let mut _user_lease = None;
    let transport = P::TRANSPORT;
    let cutoff = Cutoff::new();
    let (mut reader, mut outbox) =
        socket.open(&metrics, transport, config.ping_interval, cutoff.clone());
    let mut operations: StreamMap<String, OperationStream> = StreamMap::new();
    let mut init_timer = pin!(tokio::time::sleep(config.init_timeout));
    let mut init_timer_armed = true;
    let mut drained = pin!(shutdown.wait());
    let mut cut = pin!(cutoff.fired());
    let mut expiry = Expiry::new();

    let end = 'connection: loop {
        expiry.follow(machine.expires_at());
        let event = tokio::select! {
            () = expiry.wait() => Event::Expired,
            _ = &mut drained => Event::Drain,
            _ = &mut cut => Event::Cut,
            frame = reader.frames.next() => Event::Frame(frame),
            // While the socket is far behind, results wait in their
            // subscriptions' bounded queues.
            Some((id, result)) = operations.next(), if !operations.is_empty() && !outbox.is_backed_up() => Event::Result(id, result),
            () = outbox.writable(), if outbox.is_waiting() => Event::Writable,
            _ = &mut init_timer, if init_timer_armed && !machine.is_initialised() => Event::InitTimeout,
            () = reader.heartbeat.tick() => Event::Heartbeat,
        };
        let actions = match event {
            Event::Drain => break going_away(),
            Event::Cut => break slow_consumer(),
            Event::Frame(frame) => match reader.receive(frame, &mut outbox) {
                Ok(Received::Text(text)) => machine.on_text(&text),
                Ok(Received::Binary) => machine.on_binary(),
                Ok(Received::Nothing) => Vec::new(),
                Err(end) => break end,
            },
            Event::Result(id, Some(Output::Own(response))) => machine.on_response(&id, *response),
            Event::Result(id, Some(Output::Shared(shared))) => {
                if let Some(published_at) = shared.published_at_ms {
                    metrics.delivered(transport, published_at);
                }
                machine.on_shared(&id, &shared)
            }
            Event::Result(id, None) => machine.on_end(&id),
            Event::InitTimeout => {
                init_timer_armed = false;
                machine.on_init_timeout()
            }
            Event::Expired => machine.on_expired(),
            Event::Heartbeat => {
                if let Err(end) = reader.beat(&mut outbox) {
                    break end;
                }
                machine.on_heartbeat()
            }
            Event::Writable => Vec::new(),
        };
        // `connection_init` may have authenticated someone the upgrade did
        // not: they take a place under the per-user limit before anything
        // (the ack) is answered, or the connection closes with 4429.
        let user = machine
            .core()
            .principal()
            .filter(|p| admitted_user.as_ref() != Some(&p.user_id))
            .map(|p| p.user_id.clone());
        if let Some(user) = user {
            match Box::pin(user_connections.acquire(&user)).await {
                Ok(lease) => {
                    _user_lease = Some(lease);
                    admitted_user = Some(user);
                }
                Err(_) => {
                    metrics
                        .rejected_total
                        .with_label_values(&["max_connections_per_user"])
                        .inc();
                    break End::Close(
                        close::TOO_MANY_USER_CONNECTIONS,
                        "too many connections for this user".into(),
                    );
                }
            }
        }
        for action in actions {
            match action {
                Action::Send(text) => {
                    if let Err(end) = outbox.text(&text) {
                        break 'connection end;
                    }
                }
                Action::Close(code, reason) => break 'connection End::Close(code, reason),
                Action::Start(operation) => {
                    let active = (operation.kind == Some(OperationType::Subscription)).then(|| {
                        GaugeGuard::new(metrics.subscriptions.with_label_values(&[transport]))
                    });
                    let operation = *operation;
                    let subscription = operation.kind == Some(OperationType::Subscription);
                    let principal = operation.principal;
                    let request = operation
                        .request
                        .data(Viewer(principal.clone()))
                        .data(client)
                        // The subscription resolvers hand this to the hub,
                        // which fires it when this connection falls behind.
                        .data(cutoff.clone())
                        // The label its deliveries are counted under: each
                        // protocol its own (without it, legacy graphql-ws
                        // deliveries were counted as graphql_ws).
                        .data(TransportLabel(transport));
                    let results = match &groups {
                        // Shared with the identical subscriptions on the node.
                        Some(groups) if subscription && !is_large(&request.query) => groups
                            .subscribe(
                                request,
                                principal,
                                Membership {
                                    transport,
                                    cutoff: cutoff.clone(),
                                },
                            ),
                        _ => own_results(
                            checked_stream(&executor, request, &metrics),
                            subscription,
                            &metrics,
                        ),
                    };
                    operations.insert(
                        operation.id,
                        OperationStream {
                            inner: Some(results),
                            _active: active,
                        },
                    );
                }
                Action::Stop(id) => {
                    operations.remove(&id);
                }
                Action::Count { ty, outcome } => {
                    metrics
                        .graphql_operations_total
                        .with_label_values(&[ty, outcome])
                        .inc();
                }
                Action::Reject(reason) => metrics.rejected_total.with_label_values(&[reason]).inc(),
            }
        }
        // What this turn wrote goes out in one write.
        if let Err(end) = outbox.flush() {
            break end;
        }
    };

    // Release the operations (and their hub places) before the close goes
    // out, so that nothing is delivered after it.
    drop(operations);
    Box::pin(finish(outbox, end, &metrics, transport)).await;
}
