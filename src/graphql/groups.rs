//! One execution per distinct subscription per node.
//!
//! Subscribers whose operations are the same (the same document token for
//! token, operation name and variables) and whose results cannot differ
//! (the same viewer, when the document reaches a field whose value or
//! visibility depends on who asks; anyone, otherwise) are members of one
//! [`Group`]. The group runs the operation once, as its own request, and
//! encodes each result once to JSON; every member gets the same bytes
//! ([`SharedResult`]) and its transport wraps them in its own frame with
//! its own operation id.
//!
//! What stays per member:
//! - authorization, at subscribe time: the member's own request runs
//!   through the subscription resolvers' own checks ([`AuthorizeOnly`]: they
//!   stop there) before it joins, and is answered their refusal if any;
//!   when a topic's readers change, each member is asked again and those
//!   left out get `FORBIDDEN` and leave;
//! - its bounded queue: a member whose queue is full is cut off (1013) as a
//!   hub subscriber would be, and the rest of the group goes on;
//! - its token's expiry and every close code (the connection's own).
//!
//! A subscriber that resumes (`after`, given as a variable) joins the group
//! of the same subscription without `after`, but first replays what it
//! missed through an execution of its own; once that has delivered the
//! event just before the group's next one, it switches to the group's
//! results, none lost, none twice ([`Resuming`]).
//!
//! What is not grouped (runs on its own, as before): a large document
//! (checked off the workers first), a document whose root is not a single
//! plain field, `after` written as a literal.
//!
//! A group lives while it has members: the last one out stops its
//! execution, which releases its hub subscription.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_graphql::parser::types::{OperationType, Selection};
use async_graphql::{Executor, PathSegment, Request, Response, ServerError, Variables};
use async_graphql_value::{ConstValue, Value};
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use tokio::sync::mpsc;

use super::document::Tokens;
use super::limits::is_large;
use super::{is_request_error, outcome};
use crate::auth::Principal;
use crate::event::{Position, SharedEvent};
use crate::hub::resume::Recheck;
use crate::hub::Cutoff;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// Field names whose value or visibility depends on the viewer (`User.email`,
/// `Message.channel`, `notificationReceived`'s topic). A document that
/// names any of them, anywhere, is grouped per viewer; a unit test holds
/// this list to every resolver that reads the viewer.
pub const VIEWER_DEPENDENT_FIELDS: &[&str] = &["email", "channel", "notificationReceived"];

/// One result of a group, encoded once for all its members.
#[derive(Debug)]
pub struct SharedResult {
    /// The GraphQL result (`{"data":…}`, with `errors` when a field failed)
    /// as JSON.
    pub json: String,
    /// Its outcome label: `ok` or `field_error`.
    pub outcome: &'static str,
    /// When the event behind it was published (ms since the Unix epoch).
    pub published_at_ms: Option<u64>,
    /// The topic and resume position of the event behind it.
    pub position: Option<(String, Position)>,
    /// A frame that is the same for every member whatever its operation
    /// id (GraphQL over SSE's `event: next`): built by the first that needs
    /// it.
    frame: std::sync::OnceLock<Bytes>,
}

impl SharedResult {
    /// The frame every member sends alike, made by `build` from the JSON
    /// the first time.
    pub fn common_frame(&self, build: impl FnOnce(&str) -> Bytes) -> Bytes {
        self.frame.get_or_init(|| build(&self.json)).clone()
    }
}

/// An item of a subscription's results: a member's own result (a refusal,
/// a revocation, or anything of a subscription that is not grouped) or one
/// its group shares.
#[derive(Debug)]
pub enum Output {
    Own(Box<Response>),
    Shared(Arc<SharedResult>),
}

impl Output {
    pub fn own(response: Response) -> Self {
        Output::Own(Box::new(response))
    }
}

/// The results of an operation that runs on its own, as [`Output`]s; those
/// of a subscription are counted in
/// `subgate_graphql_subscription_executions_total`.
pub fn own_results(
    results: BoxStream<'static, Response>,
    subscription: bool,
    metrics: &Metrics,
) -> BoxStream<'static, Output> {
    let executions = subscription.then(|| metrics.subscription_executions_total.clone());
    results
        .map(move |response| {
            if let Some(executions) = &executions {
                executions.inc();
            }
            Output::own(response)
        })
        .boxed()
}

/// In a member's probe request: the subscription resolvers authorize, then
/// end without subscribing.
pub struct AuthorizeOnly;

/// In a group's own request: the resolvers do not authorize (each member
/// did), hand the group's cut-off to the hub, recheck the members when a
/// topic's readers change, and note the publish time of each event.
pub struct GroupLeader(pub Arc<Group>);

/// What decides a group: members share results only when all of it is the
/// same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    /// The document's tokens, one space apart.
    document: String,
    operation: Option<String>,
    /// The variables as JSON, in the order the client sent them.
    variables: String,
    /// The user every member is, when the document depends on the viewer.
    viewer: Option<String>,
}

/// What a groupable subscription is run as.
struct Plan {
    key: GroupKey,
    query: String,
    operation: Option<String>,
    variables: Variables,
    /// The response key of the root field (for a revocation's error path).
    root: String,
    /// Who the group's own request runs as: the viewer (without expiry:
    /// each member's connection ends with its own token) or nobody.
    leader: Option<Principal>,
    /// The member resumes: it replays on its own, then joins.
    resumes: bool,
}

/// A member's connection, as the group needs it.
pub struct Membership {
    pub transport: &'static str,
    pub cutoff: Arc<Cutoff>,
}

/// The node's groups.
pub struct Groups<E: Executor> {
    executor: E,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Each member's queue, in results (as a hub subscriber's).
    queue: usize,
    groups: Mutex<HashMap<GroupKey, Arc<Group>>>,
}

pub struct Group {
    key: GroupKey,
    root: String,
    members: Mutex<HashMap<u64, Member>>,
    next_member: AtomicU64,
    /// Fired by the hub when the group's own subscription falls behind:
    /// every member is then cut off.
    cutoff: Arc<Cutoff>,
    /// The publish time of the event being executed.
    published_at: AtomicU64,
    /// The topic and position of the event being executed.
    position: Mutex<Option<(String, Position)>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

struct Member {
    tx: mpsc::Sender<Output>,
    cutoff: Arc<Cutoff>,
    transport: &'static str,
    principal: Option<Principal>,
}

impl<E: Executor> Groups<E> {
    pub fn new(
        executor: E,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        queue: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            executor,
            store,
            metrics,
            queue: queue.max(1),
            groups: Mutex::new(HashMap::new()),
        })
    }

    /// The results of subscription `request` (its data already holds the
    /// member's viewer, address, cut-off and transport label), run by
    /// `principal`: shared with the other members of its group, or its own
    /// where it cannot be grouped.
    pub fn subscribe(
        self: &Arc<Self>,
        mut request: Request,
        principal: Option<Principal>,
        membership: Membership,
    ) -> BoxStream<'static, Output> {
        let Some(plan) = plan(&mut request, principal.as_ref()) else {
            let results = self.executor.execute_stream(request, None);
            return own_results(results, true, &self.metrics);
        };
        let groups = self.clone();
        stream::once(async move {
            if plan.resumes {
                // Replays as itself, from its `after` (its own execution
                // authorizes it, as alone), noting the position of each
                // event it delivers; joins the group once it delivered
                // something, and switches when it meets the group's results.
                let tracker = Arc::new(Tracker::default());
                let own = groups
                    .executor
                    .execute_stream(request.data(tracker.clone()), None);
                let executions = groups.metrics.subscription_executions_total.clone();
                let join: Join<E> = Box::new(move || groups.join(plan, principal, membership));
                return Resuming {
                    own: Some(own),
                    tracker,
                    join: Some(join),
                    group: None,
                    head: None,
                    in_step: false,
                    executions,
                }
                .boxed();
            }
            // Authorized as the member, by the resolvers' own checks.
            let mut probe = groups
                .executor
                .execute_stream(request.data(AuthorizeOnly), None);
            if let Some(refused) = probe.next().await {
                return stream::once(async move { Output::own(refused) }).boxed();
            }
            drop(probe);
            groups.join(plan, principal, membership).boxed()
        })
        .flatten()
        .boxed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Arc<Group>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a member to the group of `plan`, starting the group if it has
    /// none.
    fn join(
        self: &Arc<Self>,
        plan: Plan,
        principal: Option<Principal>,
        membership: Membership,
    ) -> MemberStream<E> {
        let (tx, rx) = mpsc::channel(self.queue);
        let member = Member {
            tx,
            cutoff: membership.cutoff.clone(),
            transport: membership.transport,
            principal,
        };
        let mut groups = self.lock();
        let group = match groups.get(&plan.key) {
            Some(group) => group.clone(),
            None => {
                let group = self.start(&plan);
                groups.insert(plan.key.clone(), group.clone());
                self.metrics.subscription_groups.set(groups.len() as i64);
                group
            }
        };
        let id = group.next_member.fetch_add(1, Ordering::Relaxed);
        group.lock().insert(id, member);
        drop(groups);
        MemberStream {
            rx,
            cutoff: membership.cutoff,
            _guard: MemberGuard {
                groups: self.clone(),
                group,
                id,
            },
        }
    }

    /// Starts the execution of a new group.
    fn start(self: &Arc<Self>, plan: &Plan) -> Arc<Group> {
        let group = Arc::new(Group {
            key: plan.key.clone(),
            root: plan.root.clone(),
            members: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(0),
            cutoff: Cutoff::new(),
            published_at: AtomicU64::new(0),
            position: Mutex::new(None),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            task: Mutex::new(None),
        });
        let mut request = Request::new(plan.query.clone())
            .variables(plan.variables.clone())
            .data(super::Viewer(plan.leader.clone()))
            .data(GroupLeader(group.clone()));
        request.operation_name = plan.operation.clone();
        let results = self.executor.execute_stream(request, None);
        let task = tokio::spawn(run(self.clone(), group.clone(), results));
        *group.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        group
    }

    /// Member `id` of `group` left (or was cut off or revoked before): the
    /// last one out stops the group.
    fn leave(&self, group: &Arc<Group>, id: u64) {
        let mut groups = self.lock();
        let mut members = group.lock();
        members.remove(&id);
        if !members.is_empty() {
            return;
        }
        drop(members);
        self.forget(&mut groups, group);
        drop(groups);
        if let Some(task) = group.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }

    /// The group's execution ended: no member joins it any more, and those
    /// it has end after what they hold.
    fn ended(&self, group: &Arc<Group>) {
        let mut groups = self.lock();
        self.forget(&mut groups, group);
        drop(groups);
        group.lock().clear();
    }

    /// Takes `group` out of `groups` (if it is still the one under its key):
    /// no member joins it any more.
    fn forget(&self, groups: &mut HashMap<GroupKey, Arc<Group>>, group: &Arc<Group>) {
        if groups
            .get(&group.key)
            .is_some_and(|current| Arc::ptr_eq(current, group))
        {
            groups.remove(&group.key);
            self.metrics.subscription_groups.set(groups.len() as i64);
        }
    }
}

/// The group's execution: each result encoded once and handed to every
/// member.
async fn run<E: Executor>(
    groups: Arc<Groups<E>>,
    group: Arc<Group>,
    mut results: BoxStream<'static, Response>,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = group.cutoff.fired() => {
                group.cut_all();
                break;
            }
            next = results.next() => next,
        };
        let Some(response) = next else { break };
        group.metrics.subscription_executions_total.inc();
        if is_request_error(&response) {
            // The group's own subscription failed (the bus refused it, say):
            // each member is told, as its own would have been.
            group.each(|| Output::own(Response::from_errors(response.errors.clone())));
            break;
        }
        let json = match serde_json::to_string(&response) {
            Ok(json) => json,
            Err(e) => {
                tracing::warn!(error = %e, "a subscription result did not encode; skipped");
                continue;
            }
        };
        let published_at = group.published_at.load(Ordering::Relaxed);
        let position = group
            .position
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let shared = Arc::new(SharedResult {
            json,
            outcome: outcome(&response),
            published_at_ms: (published_at > 0).then_some(published_at),
            position,
            frame: std::sync::OnceLock::new(),
        });
        group.dispatch(shared);
    }
    groups.ended(&group);
}

impl Group {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cut-off the group's own hub subscriptions report to.
    pub fn cutoff(&self) -> Arc<Cutoff> {
        self.cutoff.clone()
    }

    /// Notes the event the group is executing.
    pub fn note(&self, event: &SharedEvent) {
        self.published_at
            .store(event.published_at_ms, Ordering::Relaxed);
        *self.position.lock().unwrap_or_else(|p| p.into_inner()) = event
            .position
            .clone()
            .map(|p| (event.event.topic.clone(), p));
    }

    /// The recheck of `topic`'s readers for every member, where the topic
    /// has a readers rule that can change.
    pub fn recheck(self: &Arc<Self>, topic: &str) -> Option<Recheck> {
        crate::auth::policy::recheck(self.store.clone(), None, topic)?;
        let (group, topic) = (self.clone(), topic.to_owned());
        Some(Arc::new(move || {
            let (group, topic) = (group.clone(), topic.clone());
            Box::pin(async move {
                group.recheck_members(&topic).await;
                // The group goes on for those still allowed.
                true
            })
        }))
    }

    async fn recheck_members(&self, topic: &str) {
        let members: Vec<(u64, Option<Principal>)> = self
            .lock()
            .iter()
            .map(|(id, m)| (*id, m.principal.clone()))
            .collect();
        for (id, principal) in members {
            let Some(check) = crate::auth::policy::recheck(self.store.clone(), principal, topic)
            else {
                continue;
            };
            if !check().await {
                self.revoke(id, topic);
            }
        }
    }

    /// Member `id` may no longer read `topic`: it is told `FORBIDDEN`, and
    /// its results end.
    fn revoke(&self, id: u64, topic: &str) {
        let Some(member) = self.lock().remove(&id) else {
            return;
        };
        let mut error = ServerError::new(
            format!("no longer allowed to read {topic}: its readers changed"),
            None,
        );
        let mut extensions = async_graphql::ErrorExtensionValues::default();
        extensions.set("code", crate::error::ErrorCode::Forbidden.as_str());
        error.extensions = Some(extensions);
        error.path = vec![PathSegment::Field(self.root.clone())];
        let _ = member
            .tx
            .try_send(Output::own(Response::from_errors(vec![error])));
    }

    /// Hands `shared` to every member; a member whose queue is full is cut
    /// off and removed, the others are not slowed.
    fn dispatch(&self, shared: Arc<SharedResult>) {
        let mut slow = Vec::new();
        self.lock().retain(
            |_, member| match member.tx.try_send(Output::Shared(shared.clone())) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slow.push((member.cutoff.clone(), member.transport));
                    false
                }
                // Gone; its guard removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => true,
            },
        );
        for (cutoff, transport) in slow {
            self.cut(&cutoff, transport);
        }
    }

    /// Hands each member an item of its own.
    fn each(&self, item: impl Fn() -> Output) {
        for member in self.lock().values() {
            let _ = member.tx.try_send(item());
        }
    }

    /// The group fell behind its hub subscription: every member is cut off.
    fn cut_all(&self) {
        let members: Vec<Member> = self.lock().drain().map(|(_, m)| m).collect();
        for member in members {
            self.cut(&member.cutoff, member.transport);
        }
    }

    fn cut(&self, cutoff: &Cutoff, transport: &'static str) {
        crate::hub::cut_slow_consumer(&self.metrics, Some(cutoff), transport);
    }
}

/// A member's results; dropping it leaves the group.
pub struct MemberStream<E: Executor> {
    rx: mpsc::Receiver<Output>,
    cutoff: Arc<Cutoff>,
    _guard: MemberGuard<E>,
}

struct MemberGuard<E: Executor> {
    groups: Arc<Groups<E>>,
    group: Arc<Group>,
    id: u64,
}

impl<E: Executor> Drop for MemberGuard<E> {
    fn drop(&mut self) {
        self.groups.leave(&self.group, self.id);
    }
}

impl<E: Executor> Stream for MemberStream<E> {
    type Item = Output;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Output>> {
        match self.rx.poll_recv(cx) {
            // Cut off: stall rather than end, so that the transport closes
            // with the slow-consumer code instead of completing.
            Poll::Ready(None) if self.cutoff.reason().is_some() => Poll::Pending,
            polled => polled,
        }
    }
}

/// How `request` is grouped, or `None` where it runs on its own: a large
/// document, one that does not parse, an operation that is not a
/// subscription of one plain root field, one that resumes with `after`
/// written as a literal, used elsewhere too, or over several topics.
fn plan(request: &mut Request, principal: Option<&Principal>) -> Option<Plan> {
    if is_large(&request.query) {
        return None;
    }
    let operation = request.operation_name.clone();
    let query = request.query.clone();
    let mut variables = request.variables.clone();
    let doc = request.parsed_query().ok()?;
    let op = match &operation {
        Some(name) => {
            doc.operations
                .iter()
                .find(|(n, _)| n.is_some_and(|n| n.as_str() == name))?
                .1
        }
        None => {
            let mut ops = doc.operations.iter();
            let (_, op) = ops.next()?;
            if ops.next().is_some() {
                return None;
            }
            op
        }
    };
    if op.node.ty != OperationType::Subscription {
        return None;
    }
    let [root] = op.node.selection_set.node.items.as_slice() else {
        return None;
    };
    let Selection::Field(field) = &root.node else {
        return None;
    };
    let argument = |name: &str| {
        field
            .node
            .arguments
            .iter()
            .find(|(n, _)| n.node.as_str() == name)
            .map(|(_, v)| &v.node)
    };
    // A member that resumes joins the group of the same subscription
    // without `after`: the variable that carries it is left out of the key
    // and null in the group's own request.
    let after = match argument("after") {
        None => None,
        Some(Value::Variable(name)) => Some(name.to_string()),
        Some(_) => return None,
    };
    if let Some(name) = &after {
        let mentions = Tokens::new(&query)
            .zip(Tokens::new(&query).skip(1))
            .filter(|(dollar, n)| *dollar == "$" && n == name)
            .count();
        // Its definition and this argument: nowhere else.
        if mentions != 2 {
            return None;
        }
        // One topic, so that positions tell where its replay stands.
        let one_topic = match argument("topics") {
            None => true,
            Some(Value::List(items)) => items.len() == 1,
            Some(Value::Variable(topics)) => matches!(
                variables.get(topics.as_str()),
                Some(ConstValue::List(items)) if items.len() == 1
            ),
            Some(_) => false,
        };
        if !one_topic {
            return None;
        }
    }
    // Resuming means a position to resume after; without one (absent or
    // null) the member is live from the start, like the group.
    let resumes = after
        .as_ref()
        .and_then(|name| variables.remove(name.as_str()))
        .is_some_and(|value| value != ConstValue::Null);
    let root = field.node.response_key().node.to_string();
    let mut document = String::with_capacity(query.len());
    let mut by_viewer = false;
    for token in Tokens::new(&query) {
        by_viewer |= VIEWER_DEPENDENT_FIELDS.contains(&token);
        if !document.is_empty() {
            document.push(' ');
        }
        document.push_str(token);
    }
    let viewer = by_viewer.then(|| principal.map(|p| p.user_id.clone()));
    let leader = viewer.clone().flatten().map(|user_id| Principal {
        user_id,
        scopes: Vec::new(),
        expires_at: None,
    });
    let key = GroupKey {
        document,
        operation: operation.clone(),
        variables: serde_json::to_string(&variables).ok()?,
        // Anonymous viewers of a viewer-dependent document share: they see
        // what nobody sees.
        viewer: viewer.flatten(),
    };
    Some(Plan {
        key,
        query,
        operation,
        variables,
        root,
        leader,
        resumes,
    })
}

/// Where a resuming member's own execution stands: the topic and position
/// of the last event it delivered (noted by the subscription resolvers).
#[derive(Default)]
pub struct Tracker {
    last: Mutex<Option<(String, Position)>>,
}

impl Tracker {
    pub fn note(&self, event: &SharedEvent) {
        if let Some(position) = &event.position {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((event.event.topic.clone(), position.clone()));
        }
    }

    fn last(&self) -> Option<(String, Position)> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Joins a resuming member to its group, when it is time.
type Join<E> = Box<dyn FnOnce() -> MemberStream<E> + Send>;

/// Where the group's next result stands against what a resuming member
/// delivered on its own.
enum Meeting {
    /// Already delivered on its own: dropped.
    Behind,
    /// The very next one: the member switches to the group.
    Next,
    /// Not there yet (or cannot tell): the member goes on on its own.
    Ahead,
}

/// A resuming member: its own execution (the replay, then live) until that
/// delivered the event just before the group's next result; from then on
/// the group's results.
pub struct Resuming<E: Executor> {
    own: Option<BoxStream<'static, Response>>,
    tracker: Arc<Tracker>,
    join: Option<Join<E>>,
    group: Option<MemberStream<E>>,
    /// The group's next result, taken to compare.
    head: Option<Output>,
    /// The group has shown a result the member already delivered on its
    /// own: the group is in step, and its next result is the member's
    /// next event. Its own execution waits meanwhile; polled on, it would
    /// win every race against the group's task and run beside the group
    /// for good, one more execution per event.
    in_step: bool,
    executions: prometheus::IntCounter,
}

impl<E: Executor> Resuming<E> {
    fn meets(&self, head: &Output) -> Meeting {
        let Output::Shared(shared) = head else {
            // A result of the member's own from the group (it was
            // revoked): the group speaks for it now.
            return Meeting::Next;
        };
        let (Some((topic, next)), Some((own_topic, own))) = (&shared.position, self.tracker.last())
        else {
            return Meeting::Ahead;
        };
        if *topic != own_topic || next.epoch != own.epoch {
            return Meeting::Ahead;
        }
        match next.seq {
            seq if seq <= own.seq => Meeting::Behind,
            seq if seq == own.seq + 1 => Meeting::Next,
            _ => Meeting::Ahead,
        }
    }
}

impl<E: Executor> Stream for Resuming<E> {
    type Item = Output;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Output>> {
        let this = self.get_mut();
        loop {
            if this.own.is_none() {
                if let Some(head) = this.head.take() {
                    return Poll::Ready(Some(head));
                }
                return match this.group.as_mut() {
                    Some(group) => group.poll_next_unpin(cx),
                    None => Poll::Ready(None),
                };
            }
            if let Some(group) = this.group.as_mut() {
                if this.head.is_none() {
                    match group.poll_next_unpin(cx) {
                        Poll::Ready(Some(item)) => this.head = Some(item),
                        // The group ended: the member goes on on its own.
                        Poll::Ready(None) => this.group = None,
                        Poll::Pending => {}
                    }
                }
                if let Some(head) = &this.head {
                    match this.meets(head) {
                        Meeting::Behind => {
                            this.head = None;
                            this.in_step = true;
                            continue;
                        }
                        Meeting::Next => {
                            this.own = None;
                            continue;
                        }
                        // A gap or a new epoch: the member's own execution
                        // catches up first.
                        Meeting::Ahead => this.in_step = false,
                    }
                }
                if this.in_step && this.head.is_none() && this.group.is_some() {
                    // The group was polled just above: it wakes the task.
                    return Poll::Pending;
                }
            }
            let Some(own) = this.own.as_mut() else {
                continue;
            };
            return match own.poll_next_unpin(cx) {
                Poll::Ready(Some(response)) => {
                    this.executions.inc();
                    // Its own execution delivered an event: it was
                    // authorized (a refusal delivers none), it may join.
                    if this.join.is_some() && this.tracker.last().is_some() {
                        if let Some(join) = this.join.take() {
                            this.group = Some(join());
                        }
                    }
                    Poll::Ready(Some(Output::own(response)))
                }
                // Its own subscription ended (refused, revoked): so does
                // the member.
                Poll::Ready(None) => {
                    this.group = None;
                    this.head = None;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

#[cfg(test)]
mod tests;
