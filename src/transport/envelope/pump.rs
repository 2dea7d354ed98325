//! The I/O task of one `/ws` connection: pumps frames between the socket,
//! the protocol [`Machine`], the effects it asks for and the channels'
//! event streams.
//!
//! One task per connection, selecting over the client's frames, the effect
//! at the head of the connection's *lane*, the channels' streams (one
//! `StreamMap`, polled in place), the auth deadline, the token's expiry
//! (`auth.expired`, then 4401), the heartbeat, the
//! connection's [`Cutoff`] (1013) and the node's drain (1001). Frame
//! limits, heartbeat and closing are every subgate WebSocket's
//! ([`crate::transport::socket`]).
//!
//! The lane runs effects one at a time in arrival order, while the task
//! keeps reading, forwarding events and answering pings: a store call never
//! stalls the socket, yet a reply never overtakes the reply to an earlier
//! request, and two messages from one client are stored and published in
//! the order sent. Replies that need no effect wait behind the effects
//! before them. While `MAX_PENDING` steps wait, the task stops reading,
//! so a client that outruns the store is pushed back by TCP.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use tokio_stream::StreamMap;

use super::protocol::{Action, Effect, Machine, Outcome};
use crate::auth::policy::{authorize, Refusal};
use crate::domain;
use crate::event::{topic, SharedEvent};
use crate::hub::resume::Delivery;
use crate::hub::Cutoff;
use crate::presence::PresenceGuard;
use crate::state::AppState;
use crate::telemetry::metrics::{transport::ENVELOPE_WS, GaugeGuard, Metrics};
use crate::transport::socket::{
    finish, going_away, slow_consumer, End, Expiry, Incoming, Outbox, Received, Socket,
};

/// Most lane steps waiting before the task stops reading the socket.
const MAX_PENDING: usize = 64;

/// A subscription an `Open` produced, until the machine says to keep it.
struct Opened {
    stream: BoxStream<'static, Delivery>,
}

/// A finished effect: its outcome, and the subscription it opened, if any.
struct Done {
    outcome: Outcome,
    opened: Option<Opened>,
}

/// One step of the lane.
enum Step {
    /// An effect under way; only the head of the lane is polled.
    Effect(BoxFuture<'static, Done>),
    /// An action that waits for the effects before it.
    Then(Action),
}

/// One attached channel: its events, and what it holds while it lives.
struct ChannelStream {
    inner: BoxStream<'static, Delivery>,
    _presence: PresenceGuard,
    _active: GaugeGuard,
}

impl Stream for ChannelStream {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// What woke the task.
enum Wake {
    Drain,
    Cut,
    Frame(Incoming),
    /// The socket may take what waits for it.
    Writable,
    Done(Done),
    Delivery(String, Delivery),
    AuthTimeout,
    Heartbeat,
    Expired,
}

/// The parts of the task that actions work on.
struct Io {
    outbox: Outbox,
    lane: VecDeque<Step>,
    channels: StreamMap<String, ChannelStream>,
    state: AppState,
    cutoff: Arc<Cutoff>,
}

impl Io {
    /// Carries out the machine's `actions`: effects join the lane; the rest
    /// run now, or after the effects already waiting.
    async fn run(&mut self, actions: Vec<Action>) -> Result<(), End> {
        for action in actions {
            match action {
                Action::Effect(effect) => {
                    let job = effect_job(effect, &self.state, &self.cutoff);
                    self.lane.push_back(Step::Effect(job));
                }
                action if self.lane.is_empty() => self.perform(action, &mut None).await?,
                action => self.lane.push_back(Step::Then(action)),
            }
        }
        Ok(())
    }

    /// Answers the effect that finished at the head of the lane, then runs
    /// the actions that were waiting for it, up to the next effect.
    async fn finished(&mut self, machine: &mut Machine, done: Done) -> Result<(), End> {
        let mut opened = done.opened;
        for action in machine.on_outcome(done.outcome) {
            self.perform(action, &mut opened).await?;
        }
        // An opened subscription not attached drops here, releasing its
        // hub place.
        drop(opened);
        while let Some(Step::Then(_)) = self.lane.front() {
            let Some(Step::Then(action)) = self.lane.pop_front() else {
                unreachable!()
            };
            self.perform(action, &mut None).await?;
        }
        Ok(())
    }

    async fn perform(&mut self, action: Action, opened: &mut Option<Opened>) -> Result<(), End> {
        match action {
            Action::Send(text) => self.outbox.text(&text),
            Action::Close(code, reason) => Err(End::Close(code, reason)),
            Action::Attach {
                channel_id,
                user_id,
            } => {
                if let Some(Opened { stream }) = opened.take() {
                    let metrics = &self.state.metrics;
                    let channel = ChannelStream {
                        inner: stream,
                        _presence: self.state.presence.join(&channel_id, &user_id),
                        _active: GaugeGuard::new(
                            metrics.subscriptions.with_label_values(&[ENVELOPE_WS]),
                        ),
                    };
                    self.channels.insert(channel_id, channel);
                }
                Ok(())
            }
            Action::Release { channel_id } => {
                self.channels.remove(&channel_id);
                Ok(())
            }
            Action::Reject(reason) => {
                self.state
                    .metrics
                    .rejected_total
                    .with_label_values(&[reason])
                    .inc();
                Ok(())
            }
            Action::Effect(effect) => {
                // Outcomes answer with sends and attaches only; an effect
                // here would simply join the end of the lane.
                let job = effect_job(effect, &self.state, &self.cutoff);
                self.lane.push_back(Step::Effect(job));
                Ok(())
            }
        }
    }

    /// Writes one event as the node encoded it.
    async fn forward(&mut self, event: &SharedEvent, metrics: &Metrics) -> Result<(), End> {
        self.outbox.text(event.json.get())?;
        metrics.delivered(ENVELOPE_WS, event.published_at_ms);
        Ok(())
    }
}

/// Resolves with the effect at the head of the lane when it finishes;
/// pending while the head is not an effect.
async fn head(lane: &mut VecDeque<Step>) -> Done {
    let done = poll_fn(|cx| match lane.front_mut() {
        Some(Step::Effect(job)) => job.as_mut().poll(cx),
        _ => Poll::Pending,
    })
    .await;
    lane.pop_front();
    done
}

/// The future that carries out `effect`.
fn effect_job(effect: Effect, state: &AppState, cutoff: &Arc<Cutoff>) -> BoxFuture<'static, Done> {
    let state = state.clone();
    match effect {
        Effect::Open {
            channel_id,
            subscription,
            last_event_id,
            principal,
        } => {
            let cutoff = cutoff.clone();
            Box::pin(async move {
                let name = topic::channel(&channel_id);
                let opened = async {
                    authorize(state.store.as_ref(), Some(&principal), &name).await?;
                    state
                        .hub
                        // Channels are never rechecked: membership is
                        // only ever granted.
                        .subscribe_from(
                            &name,
                            last_event_id.as_deref(),
                            ENVELOPE_WS,
                            Some(cutoff),
                            None,
                        )
                        .await
                        .map_err(|e| Refusal::Unavailable(e.to_string()))
                }
                .await;
                match opened {
                    Ok(resumed) => Done {
                        outcome: Outcome::Opened {
                            channel_id,
                            subscription,
                            result: Ok(resumed.gap),
                        },
                        opened: Some(Opened {
                            stream: resumed.stream,
                        }),
                    },
                    Err(refusal) => Done {
                        outcome: Outcome::Opened {
                            channel_id,
                            subscription,
                            result: Err(refusal),
                        },
                        opened: None,
                    },
                }
            })
        }
        Effect::SendMessage {
            channel_id,
            content,
            principal,
        } => {
            // Spawned, so that a client that disconnects mid-send cannot
            // cancel it between the store write and the publish.
            let task = tokio::spawn({
                let channel_id = channel_id.clone();
                async move {
                    domain::send_message(
                        state.store.as_ref(),
                        &state.hub,
                        &principal.user_id,
                        &channel_id,
                        content,
                    )
                    .await
                }
            });
            Box::pin(async move {
                let result = task.await.unwrap_or_else(|e| {
                    Err(domain::SendRefusal::Store(
                        crate::store::StoreError::Unavailable(format!("send failed: {e}")),
                    ))
                });
                Done {
                    outcome: Outcome::Sent { channel_id, result },
                    opened: None,
                }
            })
        }
        Effect::Typing {
            channel_id,
            principal,
            authorized,
        } => Box::pin(async move {
            let result = async {
                if !authorized {
                    authorize(
                        state.store.as_ref(),
                        Some(&principal),
                        &topic::channel(&channel_id),
                    )
                    .await?;
                }
                domain::signal_typing(&state.hub, &principal.user_id, &channel_id)
                    .await
                    .map_err(|e| Refusal::Unavailable(e.to_string()))
            }
            .await;
            Done {
                outcome: Outcome::Typed { channel_id, result },
                opened: None,
            }
        }),
        Effect::SetStatus { principal, status } => Box::pin(async move {
            let result = state.presence.set_status(&principal.user_id, status).await;
            Done {
                outcome: Outcome::StatusSet { result },
                opened: None,
            }
        }),
    }
}

/// Serves one connection until either side closes it.
pub async fn run(state: AppState, mut machine: Machine, socket: Socket) {
    let metrics = state.metrics.clone();
    let settings = state.settings.websocket.clone();
    let cutoff = Cutoff::new();
    let shutdown = state.shutdown.clone();
    let (mut reader, outbox) = socket.open(
        &metrics,
        ENVELOPE_WS,
        Duration::from_secs(settings.ping_interval_seconds),
        cutoff.clone(),
    );
    let mut io = Io {
        outbox,
        lane: VecDeque::new(),
        channels: StreamMap::new(),
        state,
        cutoff: cutoff.clone(),
    };
    let mut auth_deadline = pin!(tokio::time::sleep(Duration::from_secs(
        settings.auth_timeout_seconds
    )));
    let mut auth_armed = !machine.is_authenticated();
    // A place under the per-user limit for a user who authenticates with
    // an `auth` message (the upgrade took one for a `?token=`).
    let mut _user_lease = None;
    let mut drained = pin!(shutdown.wait());
    let mut cut = pin!(cutoff.fired());
    let mut expiry = Expiry::new();

    let greeting = machine.start();
    let end = match io.run(greeting).await.and_then(|()| io.outbox.flush()) {
        Err(end) => end,
        Ok(()) => loop {
            let reading = io.lane.len() < MAX_PENDING;
            let working = matches!(io.lane.front(), Some(Step::Effect(_)));
            expiry.follow(machine.expires_at());
            let wake = tokio::select! {
                () = expiry.wait() => Wake::Expired,
                _ = &mut drained => Wake::Drain,
                _ = &mut cut => Wake::Cut,
                frame = reader.frames.next(), if reading => Wake::Frame(frame),
                done = head(&mut io.lane), if working => Wake::Done(done),
                // While the socket is far behind, events wait in their
                // subscriptions' bounded queues.
                Some((channel_id, delivery)) = io.channels.next(), if !io.channels.is_empty() && !io.outbox.is_backed_up() => {
                    Wake::Delivery(channel_id, delivery)
                }
                () = io.outbox.writable(), if io.outbox.is_waiting() => Wake::Writable,
                _ = &mut auth_deadline, if auth_armed && !machine.is_authenticated() => Wake::AuthTimeout,
                () = reader.heartbeat.tick() => Wake::Heartbeat,
            };
            let step = match wake {
                Wake::Drain => Err(going_away()),
                Wake::Cut => Err(slow_consumer()),
                Wake::Frame(frame) => match reader.receive(frame, &mut io.outbox) {
                    Ok(Received::Text(text)) => {
                        let anonymous = !machine.is_authenticated();
                        let actions = machine.on_text(&text);
                        match machine.user_id().filter(|_| anonymous) {
                            None => io.run(actions).await,
                            // Before `auth.success` goes out.
                            Some(user) => match io.state.user_connections.acquire(user).await {
                                Ok(lease) => {
                                    _user_lease = Some(lease);
                                    io.run(actions).await
                                }
                                Err(_) => {
                                    metrics
                                        .rejected_total
                                        .with_label_values(&["max_connections_per_user"])
                                        .inc();
                                    Err(End::Close(
                                        crate::error::close::TOO_MANY_USER_CONNECTIONS,
                                        "too many connections for this user".into(),
                                    ))
                                }
                            },
                        }
                    }
                    Ok(Received::Binary) => io.run(machine.on_binary()).await,
                    Ok(Received::Nothing) => Ok(()),
                    Err(end) => Err(end),
                },
                Wake::Done(done) => io.finished(&mut machine, done).await,
                Wake::Delivery(_, Delivery::Event(event)) => io.forward(&event, &metrics).await,
                // Only streams with a recheck end so; channels have none.
                Wake::Delivery(_, Delivery::Revoked) => Ok(()),
                Wake::Delivery(channel_id, Delivery::Gap(reason)) => {
                    io.run(machine.on_gap(&channel_id, reason)).await
                }
                Wake::AuthTimeout => {
                    auth_armed = false;
                    io.run(machine.on_auth_timeout()).await
                }
                Wake::Heartbeat => reader.beat(&mut io.outbox),
                Wake::Writable => Ok(()),
                Wake::Expired => io.run(machine.on_expired()).await,
            };
            // What this turn wrote goes out in one write.
            if let Err(end) = step.and_then(|()| io.outbox.flush()) {
                break end;
            }
        },
    };

    // Release the subscriptions (hub places, presence) and abandon the
    // effects still waiting before the close goes out, so that nothing is
    // delivered after it. A message send under way finishes on its own.
    let Io {
        outbox,
        lane,
        channels,
        ..
    } = io;
    drop(channels);
    drop(lane);
    finish(outbox, end, &metrics, ENVELOPE_WS).await;
}
