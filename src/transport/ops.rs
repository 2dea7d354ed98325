//! Operations endpoints: `/healthz` (the process answers), `/readyz` (it
//! should get traffic: not draining, and its broker, store and presence can
//! serve) and `/metrics` (the Prometheus exposition).

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Why the node should not get traffic now; empty when it is ready.
fn readiness_problems(state: &AppState) -> Vec<String> {
    let mut problems = Vec::new();
    if state.shutdown.is_draining() {
        problems.push("draining".to_owned());
    }
    let (open, limit) = (
        state.shutdown.open_connections(),
        state.settings.connection_limit(),
    );
    if open >= limit {
        // Full: new clients should go to another node.
        problems.push(format!("connections: full ({open} of {limit})"));
    }
    if let Err(why) = state.hub.broker().readiness() {
        problems.push(format!("broker: {why}"));
    }
    if let Err(why) = state.store.readiness() {
        problems.push(format!("store: {why}"));
    }
    if let Err(why) = state.presence.readiness() {
        problems.push(format!("presence: {why}"));
    }
    problems
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let problems = readiness_problems(&state);
    // Which Redis the node uses (mode; in Sentinel mode the master).
    let redis = state.hub.broker().describe();
    if problems.is_empty() {
        HttpResponse::Ok().json(json!({ "status": "ready", "redis": redis }))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(json!({ "status": "unavailable", "reasons": problems, "redis": redis }))
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // The state gauges are read, not maintained: one scrape, one decision.
    state
        .metrics
        .draining
        .set(i64::from(state.shutdown.is_draining()));
    state
        .metrics
        .ready
        .set(i64::from(readiness_problems(&state).is_empty()));
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::Settings;
    use crate::test_support::{free_port, RedisServer};

    #[tokio::test]
    async fn readiness_names_each_component_while_redis_is_away() {
        let port = free_port();
        let mut settings = Settings::default();
        settings.redis.url = Some(format!("redis://127.0.0.1:{port}/"));
        settings.redis.command_timeout_seconds = 0.2;
        settings.redis.max_backoff_seconds = 0.1;
        let state = crate::test_support::state(settings);
        let until = |ready: fn(&[String]) -> bool, what: &'static str| {
            let state = state.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let problems = readiness_problems(&state);
                    if ready(&problems) {
                        return problems;
                    }
                    assert!(Instant::now() < deadline, "{what}: {problems:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let away = until(
            |p| {
                ["broker: ", "store: ", "presence: "]
                    .iter()
                    .all(|c| p.iter().any(|why| why.starts_with(c)))
            },
            "every component on Redis reports it",
        )
        .await;
        assert!(
            away.iter().all(|why| why.to_lowercase().contains("redis")),
            "{away:?}"
        );

        let _redis = RedisServer::start_on(port);
        until(|p| p.is_empty(), "ready once Redis answers").await;
    }
}
