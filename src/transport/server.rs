//! The HTTP server a node runs: actix-web's application for every request,
//! except WebSocket upgrades, which take their TCP stream out of the HTTP
//! dispatcher ([`Upgrade`]) so that an open WebSocket costs one task and
//! no HTTP buffers.
//!
//! Assembled as actix-web's `HttpServer` assembles itself (actix-server
//! workers, an `HttpService` per worker, the same timeouts), with the one
//! thing it does not offer: the upgrade handler.

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use actix_codec::Framed;
use actix_http::{h1, HttpService, KeepAlive, Request};
use actix_service::{fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{web, App};
use tokio::net::TcpStream;

use crate::transport::socket::Upgrade;

/// How the server runs.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    /// Worker threads.
    pub workers: usize,
    /// Connections of any kind each worker holds at once, upgraded ones
    /// included: a worker at its share stops accepting (the kernel's
    /// backlog waits). `None`: actix's default.
    pub max_sockets_per_worker: Option<usize>,
    /// How long a graceful stop waits for connections.
    pub shutdown_timeout: Duration,
}

/// Starts serving `listener`: `app` configures the application every
/// request goes to, `upgrades` serves each WebSocket upgrade, in a task of
/// its own.
pub fn start<A, U, F>(
    listener: TcpListener,
    settings: ServerSettings,
    app: A,
    upgrades: U,
) -> std::io::Result<actix_server::Server>
where
    A: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
    U: Fn(Upgrade) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + 'static,
{
    let addr = listener.local_addr()?;
    let mut builder = actix_server::Server::build()
        .workers(settings.workers)
        .shutdown_timeout(settings.shutdown_timeout.as_secs().max(1))
        .disable_signals();
    if let Some(max) = settings.max_sockets_per_worker {
        builder = builder.max_concurrent_connections(max);
    }
    // Idle keep-alive connections close when a graceful stop begins, as
    // actix-web's own server does, rather than holding it up.
    let stopping = builder.graceful_shutdown_signal();
    let builder = builder.listen("subgate-http", listener, move || {
        let stopping = stopping.clone();
        let app = App::new().configure(app.clone());
        let upgrades = upgrades.clone();
        let upgrade = fn_service(
            move |(request, framed): (Request, Framed<TcpStream, h1::Codec>)| {
                // The connection is served in a task of its own, sized to
                // what serving it takes; the dispatcher's task only waits
                // for it to end, so that it goes on counting under
                // `max_sockets_per_worker` (a descriptor is a descriptor).
                let (upgrade, ended) = Upgrade::new(request, framed);
                actix_web::rt::spawn(upgrades(upgrade));
                async move {
                    // Resolves (with an error) when the connection drops
                    // its end.
                    let _ = ended.await;
                    Ok::<(), std::convert::Infallible>(())
                }
            },
        );
        // actix-web's own defaults for the timeouts.
        HttpService::build()
            .graceful_shutdown_signal(move || {
                let stopping = stopping.clone();
                async move { stopping.notified().await }
            })
            // Every response and frame is written whole, and the frames of
            // a turn together: Nagle's algorithm would only hold a small
            // write back until the peer's (delayed) acknowledgement.
            .tcp_nodelay(true)
            .keep_alive(KeepAlive::default())
            .client_request_timeout(Duration::from_secs(5))
            .client_disconnect_timeout(Duration::from_secs(1))
            .local_addr(addr)
            .upgrade(upgrade)
            .finish(map_config(app, |_| AppConfig::default()))
            .tcp()
    })?;
    Ok(builder.run())
}
