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

/// Idle connections the publisher keeps no longer than this: below the
/// nodes' HTTP keep-alive (actix-web's 5 s), so that the client, not the
/// server, retires an idle connection, and a publish never goes out on a
/// connection the server is closing.
const POOL_IDLE: Duration = Duration::from_secs(4);

/// The publisher's HTTP client: every publish (setup, warm-up, measured)
/// goes through it, at most `max_in_flight` at a time, on connections it
/// keeps alive and reuses.
///
/// Why it matters (item 5 of issue 10, "cannot assign requested
/// address" at 10,000 topics): a TCP connection is named by its four
/// addresses, and towards one node (one address and port) a client source
/// address has only the ephemeral ports to tell its connections apart
/// (`net.ipv4.ip_local_port_range`, 32768–60999 here: 28,232). 10,000
/// subscribers on 127.0.0.1 held 10,000 of them. The warm-up then
/// published one marker per topic, every 500 ms, each on a task of its
/// own with nothing bounding how many were in flight: 10,000 requests at
/// once, so 10,000 new connections (the pool only reuses idle ones), of
/// which all but `max_in_flight` (the idle pool's size) were closed by
/// this side when they went back to the pool, sitting in TIME_WAIT (60 s)
/// on their ports; the next round, started whether or not the previous
/// had finished, opened 10,000 more. Within a second or two the ports
/// were gone and `connect()` failed with EADDRNOTAVAIL. Now every publish
/// takes a permit of one bounded pool ([`warmup_round`] as
/// [`run_paced`]), so at most `max_in_flight` connections ever exist per
/// node and they are reused. (The subscribers' own connections come from
/// other loopback source addresses than the publisher's, [`crate::net`].)
pub fn client(max_in_flight: usize) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(max_in_flight.max(1))
        .pool_idle_timeout(POOL_IDLE)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("an HTTP client: {e}"))
}

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

impl Tally {
    /// Nothing published, to `topics` topics.
    pub fn nothing(topics: usize) -> Self {
        Self {
            published: vec![0; topics],
            unacked: vec![Vec::new(); topics],
            ..Self::default()
        }
    }
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

/// What the warm-up published, across its rounds.
#[derive(Debug, Default)]
pub struct Warmup {
    pub sent: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub failures: Mutex<BTreeMap<String, u64>>,
    /// Set when every subscription is live: a round in progress sends no
    /// more (those in flight finish).
    pub stop: std::sync::atomic::AtomicBool,
}

/// One warm-up round: a marker to each of `topics`, at most
/// `max_in_flight` at a time (see [`client`] for why the bound matters).
/// `first` numbers the round's publishes for the URL round-robin.
pub async fn warmup_round(
    publisher: Arc<Publisher>,
    topics: Vec<usize>,
    first: u64,
    max_in_flight: usize,
    warmup: Arc<Warmup>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let pool = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, topic) in topics.into_iter().enumerate() {
        let permit = pool.clone().acquire_owned().await.expect("never closed");
        if warmup.stop.load(Relaxed) {
            break;
        }
        warmup.sent.fetch_add(1, Relaxed);
        let publisher = publisher.clone();
        let warmup = warmup.clone();
        tasks.spawn(async move {
            let outcome = publisher
                .publish(first + i as u64, Kind::Warmup, topic, 0)
                .await;
            drop(permit);
            if let Err(reason) = outcome {
                warmup.failed.fetch_add(1, Relaxed);
                *warmup.failures.lock().entry(label(&reason)).or_default() += 1;
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}
