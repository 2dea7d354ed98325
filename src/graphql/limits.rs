//! Document limits the schema builder does not have: the token limit
//! (before the parse), the alias limit, and an explicit refusal of
//! introspection where it is off (the builder's own switch answers `null`
//! without saying why); how large documents are parsed and validated (off
//! the workers, one at a time, with a bounded queue); syntax errors that
//! quote a window, not the document.
//! (Depth, complexity, recursion and directive limits are the builder's.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextValidation,
};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{
    ErrorExtensionValues, Executor, Request, ServerError, ServerResult, ValidationResult, Variables,
};
use tokio::sync::Semaphore;

use super::document::{count_tokens, syntax_message, TooManyTokens};
use crate::error::ErrorCode;

/// Request bodies above this many bytes are decoded [`off_worker`].
pub const LARGE_BODY_BYTES: usize = 64 * 1024;

/// Documents with more tokens than this are "large": they are parsed and
/// validated off the workers ([`check_large`]). Small documents, the usual
/// case, take no detour.
pub const LARGE_DOCUMENT_TOKENS: usize = 2_000;

/// How many large requests are decoded, parsed or validated at once (on
/// blocking threads) on one node. The workers answer health checks and
/// pump every socket; with one turn, a burst of large documents keeps at
/// most one core busy with them, each waiting its turn without blocking
/// anything.
pub const LARGE_WORK_PERMITS: usize = 1;

/// How many large requests may wait for a turn. Beyond it a document is
/// refused at once (`RATE_LIMITED`, scope `large_document`) instead of
/// being held, with its text, in an ever longer queue.
pub const LARGE_WORK_QUEUE: usize = 32;

/// The turns of [`off_worker`]: process-wide, as the cores are.
static LARGE_WORK: Semaphore = Semaphore::const_new(LARGE_WORK_PERMITS);
/// Requests holding or waiting for a turn.
static LARGE_WORK_HELD: AtomicUsize = AtomicUsize::new(0);

/// Why [`off_worker`] did not run the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffWorker {
    /// [`LARGE_WORK_QUEUE`] requests are already waiting.
    Busy,
    /// The blocking pool is gone (the node is stopping) or the work panicked.
    Lost,
}

/// A place among the requests holding or waiting for a turn.
struct Place;

impl Place {
    fn take() -> Result<Place, OffWorker> {
        let place = Place;
        if LARGE_WORK_HELD.fetch_add(1, Ordering::AcqRel) >= LARGE_WORK_PERMITS + LARGE_WORK_QUEUE {
            return Err(OffWorker::Busy);
        }
        Ok(place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        LARGE_WORK_HELD.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `work` (decoding, parsing or validating a large request) on a
/// blocking thread, in one of [`LARGE_WORK_PERMITS`] turns per process. On
/// a worker it would hold up every request and socket of that worker: a
/// 15,000-token document takes milliseconds of CPU to parse and validate in
/// a release build, most of a second in a debug one.
pub async fn off_worker<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OffWorker> {
    let place = Place::take()?;
    run_in_turn(place, work).await
}

async fn run_in_turn<T: Send + 'static>(
    _place: Place,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OffWorker> {
    // The semaphore is never closed; should it be, go without a turn.
    let _turn = LARGE_WORK.acquire().await.ok();
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| OffWorker::Lost)
}

/// Decodes a request body: one over [`LARGE_BODY_BYTES`] [`off_worker`].
/// When the node is busy with large requests (or stopping) it is decoded
/// here, in time linear in the body, which `server.max_body_bytes` bounds.
pub async fn decode_body<T: serde::de::DeserializeOwned + Send + 'static>(
    body: bytes::Bytes,
) -> serde_json::Result<T> {
    if body.len() > LARGE_BODY_BYTES {
        let owned = body.clone();
        if let Ok(decoded) = off_worker(move || serde_json::from_slice(&owned)).await {
            return decoded;
        }
    }
    serde_json::from_slice(&body)
}

/// Whether `query` is a large document (more than [`LARGE_DOCUMENT_TOKENS`]
/// tokens); counting stops there.
pub fn is_large(query: &str) -> bool {
    count_tokens(query, LARGE_DOCUMENT_TOKENS).is_err()
}

/// The verdict on a large document's validation, reached off the workers
/// and carried in its request's data: the schema's validation step answers
/// with it instead of validating again on a worker.
struct Validated(Verdict);

/// What validating a document came to.
type Verdict = Result<ValidationResult, Vec<ServerError>>;

/// Put in a probe's data: the validation step leaves its verdict here and
/// stops the request (nothing executes).
#[derive(Clone, Default)]
struct ValidateOnly(Arc<Mutex<Option<Verdict>>>);

/// Why a large document was not checked.
#[derive(Debug)]
pub enum Unchecked {
    /// It does not parse: the parser's error, quoting a short window.
    Syntax(ServerError),
    /// [`LARGE_WORK_QUEUE`] large requests are already waiting.
    Busy,
    /// The check did not finish (the node is stopping); the request is
    /// gone with it.
    Lost,
}

impl Unchecked {
    /// The GraphQL error a client is answered with.
    pub fn server_error(&self) -> ServerError {
        match self {
            Unchecked::Syntax(e) => e.clone(),
            Unchecked::Busy => {
                let mut extensions = ErrorExtensionValues::default();
                extensions.set("code", ErrorCode::RateLimited.as_str());
                extensions.set("scope", crate::ratelimit::Scope::LargeDocument.as_str());
                extensions.set("retryAfterMs", 1000);
                let mut e = ServerError::new(
                    "the node is checking as many large documents as it queues; retry later",
                    None,
                );
                e.extensions = Some(extensions);
                e
            }
            Unchecked::Lost => {
                let mut extensions = ErrorExtensionValues::default();
                extensions.set("code", ErrorCode::Unavailable.as_str());
                let mut e = ServerError::new("the document could not be checked", None);
                e.extensions = Some(extensions);
                e
            }
        }
    }
}

/// Parses and validates `request`'s document off the workers when it is
/// large ([`is_large`]), in one blocking turn ([`off_worker`]): the request
/// then holds the parsed document and the verdict, which `executor`'s
/// schema uses as they are. A small document is left as it is (the schema
/// checks it on the worker, in microseconds).
///
/// The validation runs as `executor` runs it (same rules, variables and
/// limits), through a probe request that stops after validation. The
/// checks before validation (tokens, aliases, introspection, recursion,
/// directives) are linear walks: they run again where the request
/// executes, and refuse it there if they refused the probe.
pub async fn check_large<E: Executor>(
    executor: &E,
    request: &mut Request,
) -> Result<(), Unchecked> {
    if !is_large(&request.query) {
        return Ok(());
    }
    let place = Place::take().map_err(|_| Unchecked::Busy)?;
    let mut owned = std::mem::replace(request, Request::new(String::new()));
    let executor = executor.clone();
    let checked = run_in_turn(place, move || {
        let doc = match owned.parsed_query() {
            Ok(doc) => doc.clone(),
            Err(e) => {
                let e = shorten_syntax_error(&owned.query, e);
                return (owned, Err(e));
            }
        };
        let slot = ValidateOnly::default();
        let mut probe = Request::new(owned.query.clone())
            .variables(owned.variables.clone())
            .data(slot.clone());
        probe.operation_name = owned.operation_name.clone();
        probe.set_parsed_query(doc);
        // Nothing up to the validation step waits on I/O: the probe
        // completes on this thread.
        drop(tokio::runtime::Handle::current().block_on(executor.execute(probe)));
        let verdict = slot.0.lock().ok().and_then(|mut v| v.take());
        (owned, Ok(verdict))
    })
    .await;
    let (back, verdict) = checked.map_err(|_| Unchecked::Lost)?;
    *request = back;
    match verdict {
        Ok(Some(verdict)) => {
            request.data.insert(Validated(verdict));
            Ok(())
        }
        // A check before validation refused the probe: see above.
        Ok(None) => Ok(()),
        Err(syntax) => Err(Unchecked::Syntax(syntax)),
    }
}

/// Refuses documents with more than `max_tokens` tokens (before parsing),
/// more than `max_aliases` aliases and, unless `introspection` is on,
/// documents that select `__schema` or `__type`; validates a document
/// checked off the workers ([`check_large`]) with its verdict.
pub struct DocumentLimits {
    pub max_tokens: usize,
    pub max_aliases: usize,
    pub introspection: bool,
}

impl DocumentLimits {
    pub fn new(max_tokens: usize, max_aliases: usize, introspection: bool) -> Self {
        Self {
            max_tokens,
            max_aliases,
            introspection,
        }
    }
}

impl ExtensionFactory for DocumentLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(DocumentLimitsExtension {
            max_tokens: self.max_tokens,
            max_aliases: self.max_aliases,
            introspection: self.introspection,
        })
    }
}

struct DocumentLimitsExtension {
    max_tokens: usize,
    max_aliases: usize,
    introspection: bool,
}

/// The GraphQL error of a document over `graphql.max_tokens`.
pub fn too_many_tokens_error(error: TooManyTokens) -> ServerError {
    let mut extensions = ErrorExtensionValues::default();
    extensions.set("code", ErrorCode::TooManyTokens.as_str());
    let mut server_error = ServerError::new(error.to_string(), None);
    server_error.extensions = Some(extensions);
    server_error
}

/// The parser's error with a short window of the document instead of its
/// whole line (the parser quotes the line; a one-line document is quoted
/// whole).
fn shorten_syntax_error(query: &str, mut error: ServerError) -> ServerError {
    // The parser's syntax messages are its multi-line ` --> L:C` rendering;
    // other parse errors are one short line and stay.
    if error.message.trim_start().starts_with("--> ") {
        if let Some(pos) = error.locations.first() {
            error.message = syntax_message(query, &error.message, pos.line, pos.column);
        }
    }
    error
}

#[async_trait::async_trait]
impl Extension for DocumentLimitsExtension {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        count_tokens(query, self.max_tokens).map_err(too_many_tokens_error)?;
        let doc = next
            .run(ctx, query, variables)
            .await
            .map_err(|e| shorten_syntax_error(query, e))?;
        let count = count_aliases(&doc);
        if count > self.max_aliases {
            return Err(ServerError::new(
                format!(
                    "the document has {count} aliases; at most {} are allowed",
                    self.max_aliases
                ),
                None,
            ));
        }
        if !self.introspection && selects_introspection(&doc) {
            return Err(ServerError::new(
                "introspection is disabled on this server",
                None,
            ));
        }
        Ok(doc)
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        if let Some(Validated(verdict)) = ctx.data_opt::<Validated>() {
            return verdict.clone();
        }
        let verdict = next.run(ctx).await;
        match ctx.data_opt::<ValidateOnly>() {
            Some(ValidateOnly(slot)) => {
                if let Ok(mut slot) = slot.lock() {
                    *slot = Some(verdict);
                }
                // A probe: stop here, with nothing to tell.
                Err(Vec::new())
            }
            None => verdict,
        }
    }
}

/// Aliases written in the document (operations and fragments).
pub fn count_aliases(doc: &ExecutableDocument) -> usize {
    fn walk(set: &SelectionSet) -> usize {
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(f) => {
                    usize::from(f.node.alias.is_some()) + walk(&f.node.selection_set.node)
                }
                Selection::InlineFragment(f) => walk(&f.node.selection_set.node),
                Selection::FragmentSpread(_) => 0,
            })
            .sum()
    }
    doc.operations
        .iter()
        .map(|(_, op)| walk(&op.node.selection_set.node))
        .sum::<usize>()
        + doc
            .fragments
            .values()
            .map(|f| walk(&f.node.selection_set.node))
            .sum::<usize>()
}

/// Whether the document selects `__schema` or `__type` anywhere.
pub fn selects_introspection(doc: &ExecutableDocument) -> bool {
    fn walk(set: &SelectionSet) -> bool {
        set.items.iter().any(|item| match &item.node {
            Selection::Field(f) => {
                matches!(f.node.name.node.as_str(), "__schema" | "__type")
                    || walk(&f.node.selection_set.node)
            }
            Selection::InlineFragment(f) => walk(&f.node.selection_set.node),
            Selection::FragmentSpread(_) => false,
        })
    }
    doc.operations
        .iter()
        .any(|(_, op)| walk(&op.node.selection_set.node))
        || doc
            .fragments
            .values()
            .any(|f| walk(&f.node.selection_set.node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_counted_in_operations_and_fragments() {
        let doc = async_graphql::parser::parse_query(
            "query { a: me { id } b: me { n: name } ...F } fragment F on Query { c: me { id } }",
        )
        .unwrap();
        assert_eq!(count_aliases(&doc), 4);
    }

    #[test]
    fn introspection_is_found_in_fragments_too() {
        let doc = async_graphql::parser::parse_query(
            "{ ...F } fragment F on Query { __type(name: \"User\") { name } }",
        )
        .unwrap();
        assert!(selects_introspection(&doc));
        let doc = async_graphql::parser::parse_query("{ me { __typename } }").unwrap();
        assert!(!selects_introspection(&doc));
    }
}
