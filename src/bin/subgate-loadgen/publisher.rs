//! Publishing: one event through GraphQL `createPost` or `POST
//! /api/v1/publish`, and the paced publisher of the measured phase.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::marker::{self, Kind};
use crate::plan::PublisherKind;

/// A publish that takes longer than this counts as failed (its event may
/// still arrive: it is then neither lost nor a duplicate).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How a run publishes, shared by every publish task.
pub struct Publisher {
    pub client: reqwest::Client,
    pub kind: PublisherKind,
    pub urls: Vec<String>,
    /// `Bearer …` for the chosen endpoint.
    pub authorization: String,
    pub run: String,
    pub topics: Vec<String>,
}

/// The outcome of one publish, by a bounded label.
pub type Outcome = Result<(), String>;

impl Publisher {
    /// Publishes one marked event to topic index `topic` through the
    /// `n`-th URL (round-robin).
    pub async fn publish(&self, n: u64, kind: Kind, topic: usize, seq: u64) -> Outcome {
        let url = &self.urls[(n as usize) % self.urls.len()];
        let mark = marker::make(&self.run, kind, topic, seq);
        match self.kind {
            PublisherKind::Mutation => self.create_post(url, &mark).await,
            PublisherKind::Api => {
                let body = json!({
                    "topic": self.topics[topic],
                    "type": "loadgen.event",
                    "payload": {"mark": mark},
                });
                self.post_api(url, &body).await
            }
        }
    }

    async fn create_post(&self, url: &str, mark: &str) -> Outcome {
        let body = json!({
            "query": "mutation Publish($input: CreatePostInput!) { createPost(input: $input) { post { id } errors { code message } } }",
            "variables": {"input": {"title": "loadgen", "content": mark}},
        });
        let answer = graphql(&self.client, url, Some(&self.authorization), &body).await?;
        // A post saved without its event ("saved, but the post.created event
        // could not be published") is not a publish: nobody will see it.
        let clean = answer
            .pointer("/data/createPost/errors")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        match answer.pointer("/data/createPost/post/id") {
            Some(Value::String(_)) if clean => Ok(()),
            _ => Err(first_error(&answer)),
        }
    }

    /// `POST /api/v1/publish`; 202 is success.
    pub async fn post_api(&self, url: &str, body: &Value) -> Outcome {
        let response = self
            .client
            .post(format!("{url}/api/v1/publish"))
            .header("authorization", &self.authorization)
            .json(body)
            .timeout(PUBLISH_TIMEOUT)
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status();
        if status.as_u16() == 202 {
            Ok(())
        } else {
            Err(format!("http_{}", status.as_u16()))
        }
    }
}

/// A GraphQL request over HTTP; the decoded answer, or a failure label.
pub async fn graphql(
    client: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
    body: &Value,
) -> Result<Value, String> {
    let mut request = client
        .post(format!("{url}/graphql"))
        .header(
            "accept",
            "application/graphql-response+json, application/json",
        )
        .json(body)
        .timeout(PUBLISH_TIMEOUT);
    if let Some(auth) = authorization {
        request = request.header("authorization", auth);
    }
    let response = request.send().await.map_err(request_error)?;
    let status = response.status();
    let answer: Value = response
        .json()
        .await
        .map_err(|_| format!("http_{}", status.as_u16()))?;
    if !status.is_success() {
        return Err(format!(
            "http_{}: {}",
            status.as_u16(),
            first_error(&answer)
        ));
    }
    Ok(answer)
}

/// The first error an answer carries, as `code: message`.
pub fn first_error(answer: &Value) -> String {
    if let Some(e) = answer.pointer("/errors/0") {
        let code = e
            .pointer("/extensions/code")
            .and_then(Value::as_str)
            .unwrap_or("graphql_error");
        let message = e.get("message").and_then(Value::as_str).unwrap_or("");
        return format!("{code}: {message}");
    }
    // A payload error: `{data: {op: {errors: [{code, message}]}}}`.
    if let Some(Value::Object(ops)) = answer.get("data") {
        for op in ops.values() {
            if let Some(e) = op.pointer("/errors/0") {
                let code = e.get("code").and_then(Value::as_str).unwrap_or("ERROR");
                let message = e.get("message").and_then(Value::as_str).unwrap_or("");
                return format!("{code}: {message}");
            }
        }
    }
    "unexpected answer".to_owned()
}

pub fn request_error(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".to_owned()
    } else if e.is_connect() {
        "connect".to_owned()
    } else {
        "request".to_owned()
    }
}

/// What the measured phase published.
#[derive(Debug, Default)]
pub struct Tally {
    /// Per topic index: the last sequence number handed out.
    pub published: Vec<u64>,
    /// Per topic index: sequence numbers whose publish was not
    /// acknowledged (failed or timed out).
    pub unacked: Vec<Vec<u64>>,
    pub sent: u64,
    pub acked: u64,
    pub failures: BTreeMap<String, u64>,
    /// Publishes that started later than their slot because every request
    /// in the pool was busy.
    pub late: u64,
}

/// Publishes at `rate` events/s for `duration`, spreading events over the
/// topics round-robin, at most `max_in_flight` requests at a time.
/// Returns once every request has finished.
pub async fn run_paced(
    publisher: Arc<Publisher>,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    sent_counter: Arc<std::sync::atomic::AtomicU64>,
) -> Tally {
    let topics = publisher.topics.len();
    let tally = Arc::new(Mutex::new(Tally {
        published: vec![0; topics],
        unacked: vec![Vec::new(); topics],
        ..Tally::default()
    }));
    let pool = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let slot = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(slot.into()).await;
        let permit = pool.clone().acquire_owned().await.expect("never closed");
        let topic = (n as usize) % topics;
        let seq = {
            let mut t = tally.lock();
            t.published[topic] += 1;
            t.sent += 1;
            if Instant::now() > slot + interval {
                t.late += 1;
            }
            t.published[topic]
        };
        sent_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let publisher = publisher.clone();
        let tally = tally.clone();
        tasks.spawn(async move {
            let outcome = publisher.publish(n, Kind::Measured, topic, seq).await;
            drop(permit);
            let mut t = tally.lock();
            match outcome {
                Ok(()) => t.acked += 1,
                Err(reason) => {
                    t.unacked[topic].push(seq);
                    *t.failures.entry(label(&reason)).or_default() += 1;
                }
            }
        });
        // Reap finished requests as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut out = std::mem::take(&mut *tally.lock());
    for u in &mut out.unacked {
        u.sort_unstable();
    }
    out
}

/// A failure's bounded label: its code, without the human message.
pub fn label(reason: &str) -> String {
    reason.split(':').next().unwrap_or(reason).trim().to_owned()
}
