//! Document limits the schema builder does not have: the token limit
//! (before the parse), the alias limit, and an explicit refusal of
//! introspection where it is off (the builder's own switch answers `null`
//! without saying why); how large documents are parsed (off the workers)
//! and validated (one at a time); syntax errors that quote a window, not
//! the document.
//! (Depth, complexity, recursion and directive limits are the builder's.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextValidation,
};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{ErrorExtensionValues, ServerError, ServerResult, ValidationResult, Variables};
use tokio::sync::Semaphore;

use super::document::{count_tokens, syntax_message, TooManyTokens};
use crate::error::ErrorCode;

/// Request bodies above this many bytes are decoded [`off_worker`].
pub const LARGE_BODY_BYTES: usize = 64 * 1024;

/// Documents with more tokens than this are "large": they are parsed off
/// the workers ([`parse_large`]) and their validation waits for one of
/// [`LARGE_DOCUMENT_PERMITS`]. Small documents, the usual case, take
/// neither detour.
pub const LARGE_DOCUMENT_TOKENS: usize = 2_000;

/// How many large documents are parsed at once (on blocking threads), and,
/// separately, validated at once (on the worker that runs the request) on
/// one node. The workers also answer health checks and pump every socket:
/// with one permit, a burst of large documents keeps at most one core
/// parsing and one worker validating, each document waiting its turn
/// without blocking anything.
pub const LARGE_DOCUMENT_PERMITS: usize = 1;

/// The turns of [`off_worker`]: process-wide, as the cores are.
static LARGE_PARSES: Semaphore = Semaphore::const_new(LARGE_DOCUMENT_PERMITS);

/// Runs `work` (decoding or parsing a large request) on a blocking thread,
/// one at a time per process. On a worker it would hold up every request
/// and socket of that worker: a 15,000-token document takes milliseconds
/// of CPU to parse in a release build, most of a second in a debug one.
/// `None` when the blocking pool is gone (the node is stopping) or `work`
/// panicked.
pub async fn off_worker<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    // The semaphore is never closed; should it be, go without a turn.
    let _turn = LARGE_PARSES.acquire().await.ok();
    tokio::task::spawn_blocking(work).await.ok()
}

/// Parses a large document [`off_worker`] (here, should that fail).
pub async fn parse_large(query: &str) -> Result<ExecutableDocument, async_graphql::parser::Error> {
    let owned = query.to_owned();
    match off_worker(move || async_graphql::parser::parse_query(&owned)).await {
        Some(parsed) => parsed,
        None => async_graphql::parser::parse_query(query),
    }
}

/// Refuses documents with more than `max_tokens` tokens (before parsing),
/// more than `max_aliases` aliases and, unless `introspection` is on,
/// documents that select `__schema` or `__type`.
pub struct DocumentLimits {
    pub max_tokens: usize,
    pub max_aliases: usize,
    pub introspection: bool,
    /// Shared by every request of the schema: see [`LARGE_DOCUMENT_PERMITS`].
    pub large_validations: Arc<Semaphore>,
}

impl DocumentLimits {
    pub fn new(max_tokens: usize, max_aliases: usize, introspection: bool) -> Self {
        Self {
            max_tokens,
            max_aliases,
            introspection,
            large_validations: Arc::new(Semaphore::new(LARGE_DOCUMENT_PERMITS)),
        }
    }
}

impl ExtensionFactory for DocumentLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(DocumentLimitsExtension {
            max_tokens: self.max_tokens,
            max_aliases: self.max_aliases,
            introspection: self.introspection,
            large_validations: self.large_validations.clone(),
            large: AtomicBool::new(false),
        })
    }
}

struct DocumentLimitsExtension {
    max_tokens: usize,
    max_aliases: usize,
    introspection: bool,
    large_validations: Arc<Semaphore>,
    /// Whether this request's document is large (set by the parse step,
    /// read by the validation step).
    large: AtomicBool,
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
        let tokens = count_tokens(query, self.max_tokens).map_err(too_many_tokens_error)?;
        self.large
            .store(tokens > LARGE_DOCUMENT_TOKENS, Ordering::Relaxed);
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
        // The semaphore is never closed; should it be, validate without a turn.
        let _turn = match self.large.load(Ordering::Relaxed) {
            true => self.large_validations.acquire().await.ok(),
            false => None,
        };
        next.run(ctx).await
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
