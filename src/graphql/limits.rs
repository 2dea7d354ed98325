//! Document limits the schema builder does not have: the alias limit, and
//! an explicit refusal of introspection where it is off (the builder's own
//! switch answers `null` without saying why).
//! (Depth, complexity, recursion and directive limits are the builder's.)

use std::sync::Arc;

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{ServerError, ServerResult, Variables};

/// Refuses documents with more than `max_aliases` aliases and, unless
/// `introspection` is on, documents that select `__schema` or `__type`.
pub struct DocumentLimits {
    pub max_aliases: usize,
    pub introspection: bool,
}

impl ExtensionFactory for DocumentLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(DocumentLimitsExtension {
            max_aliases: self.max_aliases,
            introspection: self.introspection,
        })
    }
}

struct DocumentLimitsExtension {
    max_aliases: usize,
    introspection: bool,
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
        let doc = next.run(ctx, query, variables).await?;
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
