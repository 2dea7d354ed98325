//! What is checked on a document's text before the parser sees it, and how
//! a syntax error is told back without echoing the document.
//!
//! Parsing and validating cost time in proportion to the document (and
//! more), so the cheapest bound runs first: [`count_tokens`] scans the text
//! once, allocates nothing and stops at the first token over the limit, so
//! a 1 MB document of repeated selections is refused in microseconds
//! instead of after a parse and a validation that take most of a second.
//! Every GraphQL transport applies it through
//! [`crate::transport::operation::operation_type`], and the schema applies it
//! again before its own parse ([`super::limits::DocumentLimits`]).

use async_graphql::parser::types::OperationType;
use async_graphql::parser::Error as ParseError;

/// The document holds more lexical tokens than `graphql.max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the document has more than {max} tokens; at most {max} are allowed")]
pub struct TooManyTokens {
    pub max: usize,
}

/// The number of lexical tokens in `source` as the GraphQL lexer splits it
/// (names, numbers, strings, block strings, punctuators; `...` is one),
/// skipping what the grammar ignores (white space, commas, comments, a byte
/// order mark). `Err` as soon as there are more than `max`: the rest of the
/// text is not read.
///
/// A character the grammar does not know counts as one token: the parser
/// refuses it anyway, and counting it keeps a flood of them bounded too.
pub fn count_tokens(source: &str, max: usize) -> Result<usize, TooManyTokens> {
    let mut count = 0usize;
    for _ in Tokens::new(source) {
        count += 1;
        if count > max {
            return Err(TooManyTokens { max });
        }
    }
    Ok(count)
}

/// The lexical tokens of a document, as text, in order (see
/// [`count_tokens`] for what a token is). Allocates nothing.
pub struct Tokens<'a> {
    source: &'a str,
    at: usize,
}

impl<'a> Tokens<'a> {
    pub fn new(source: &'a str) -> Self {
        Tokens { source, at: 0 }
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.source.as_bytes();
        let len = bytes.len();
        let mut at = self.at;
        loop {
            match bytes.get(at)? {
                b' ' | b'\t' | b'\n' | b'\r' | b',' => at += 1,
                0xEF if bytes[at..].starts_with(&[0xEF, 0xBB, 0xBF]) => at += 3,
                b'#' => {
                    while at < len && bytes[at] != b'\n' && bytes[at] != b'\r' {
                        at += 1;
                    }
                }
                _ => break,
            }
        }
        let start = at;
        match bytes[at] {
            b'"' if bytes[at..].starts_with(b"\"\"\"") => {
                at = end_of_block_string(bytes, at + 3);
            }
            b'"' => at = end_of_string(bytes, at + 1),
            b'.' if bytes[at..].starts_with(b"...") => at += 3,
            b'_' | b'a'..=b'z' | b'A'..=b'Z' => {
                at += 1;
                while at < len && (bytes[at] == b'_' || bytes[at].is_ascii_alphanumeric()) {
                    at += 1;
                }
            }
            b'-' | b'0'..=b'9' => {
                // `-`, digits, a fraction and an exponent: one number. Its
                // exact shape is the parser's business.
                at += 1;
                while at < len
                    && (bytes[at].is_ascii_digit() || matches!(bytes[at], b'.' | b'e' | b'E'))
                {
                    if matches!(bytes[at], b'e' | b'E')
                        && matches!(bytes.get(at + 1), Some(b'+' | b'-'))
                    {
                        at += 1;
                    }
                    at += 1;
                }
            }
            // One punctuator, or one character of something unknown (the
            // whole UTF-8 sequence, so that `at` stays on a boundary).
            first => at += utf8_width(first),
        }
        // An escape at the very end may step past it.
        self.at = at.min(len);
        self.source.get(start..self.at)
    }
}

/// The type of the operation a document would run (the one named `name`,
/// or its only one), read from its tokens without parsing it: the keyword
/// that opens each operation at the top level (`{` alone opens a query).
/// `None` when it cannot be told so (no such operation, several without a
/// name). A large document's type is told so on a worker while its parse
/// waits for a turn off the workers; should it not parse, the parse says
/// so.
pub fn scanned_operation_type(source: &str, name: Option<&str>) -> Option<OperationType> {
    // `{}` and `()` nesting together: only the top level is read.
    let mut depth = 0usize;
    // In an operation's header (its type, and its name once read), or in a
    // fragment's; the header ends at the `{` of the selection set.
    let mut operation: Option<(OperationType, Option<&str>)> = None;
    let mut fragment = false;
    let mut name_next = false;
    let mut only = None;
    let mut count = 0usize;
    for token in Tokens::new(source) {
        if depth > 0 {
            match token {
                "{" | "(" => depth += 1,
                "}" | ")" => depth -= 1,
                _ => {}
            }
            continue;
        }
        if std::mem::take(&mut name_next)
            && token.starts_with(|c: char| c == '_' || c.is_ascii_alphabetic())
        {
            if let Some((_, named)) = &mut operation {
                *named = Some(token);
            }
            continue;
        }
        match token {
            "(" => depth += 1,
            "{" => {
                depth += 1;
                if std::mem::take(&mut fragment) {
                    continue;
                }
                let (ty, named) = operation.take().unwrap_or((OperationType::Query, None));
                match name {
                    Some(name) if named == Some(name) => return Some(ty),
                    Some(_) => {}
                    None => {
                        count += 1;
                        only = Some(ty);
                    }
                }
            }
            _ if operation.is_some() || fragment => {}
            "query" => operation = Some((OperationType::Query, None)),
            "mutation" => operation = Some((OperationType::Mutation, None)),
            "subscription" => operation = Some((OperationType::Subscription, None)),
            "fragment" => fragment = true,
            _ => {}
        }
        name_next = operation.is_some_and(|(_, named)| named.is_none())
            && !fragment
            && matches!(token, "query" | "mutation" | "subscription");
    }
    match (name, count) {
        (None, 1) => only,
        _ => None,
    }
}

/// Where the string whose body starts at `at` ends: after its closing quote,
/// or at the line end or the text's end when it is not closed.
fn end_of_string(bytes: &[u8], mut at: usize) -> usize {
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => at += 2,
            b'"' => return at + 1,
            b'\n' | b'\r' => return at,
            _ => at += 1,
        }
    }
    bytes.len()
}

/// Where the block string whose body starts at `at` ends (`\"""` does not
/// end it).
fn end_of_block_string(bytes: &[u8], mut at: usize) -> usize {
    while at < bytes.len() {
        if bytes[at..].starts_with(b"\\\"\"\"") {
            at += 4;
        } else if bytes[at..].starts_with(b"\"\"\"") {
            return at + 3;
        } else {
            at += 1;
        }
    }
    bytes.len()
}

fn utf8_width(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Characters quoted on each side of a syntax error's position.
pub const EXCERPT_CHARS: usize = 40;

/// The message of a parse error of `source`, with at most
/// [`EXCERPT_CHARS`] characters of the document quoted on each side of
/// the position (the parser's own message quotes the whole line, which for
/// a one-line document is the whole document).
pub fn describe_parse_error(source: &str, error: &ParseError) -> String {
    match error {
        ParseError::Syntax { message, start, .. } => {
            syntax_message(source, message, start.line, start.column)
        }
        other => other.to_string(),
    }
}

/// `syntax error at line L, column C: <what the parser expected>, near "…"`.
/// `message` is the parser's multi-line message; only its `= …` line (what
/// was expected) is kept. `line` and `column` count from 1, columns in
/// characters.
pub fn syntax_message(source: &str, message: &str, line: usize, column: usize) -> String {
    let expected = message
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("= "))
        .unwrap_or("invalid syntax");
    let near = excerpt(source, line, column);
    format!("syntax error at line {line}, column {column}: {expected}, near {near:?}")
}

/// Up to [`EXCERPT_CHARS`] characters before and after (`line`, `column`)
/// on that line, with `…` where the line goes on.
fn excerpt(source: &str, line: usize, column: usize) -> String {
    let text = source
        .split('\n')
        .nth(line.saturating_sub(1))
        .unwrap_or("")
        .trim_end_matches('\r');
    let at = column.saturating_sub(1);
    let from = at.saturating_sub(EXCERPT_CHARS);
    let mut out = String::new();
    if from > 0 {
        out.push('…');
    }
    let mut chars = text.chars().skip(from);
    out.extend(chars.by_ref().take(at - from + EXCERPT_CHARS));
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(source: &str) -> usize {
        count_tokens(source, usize::MAX).unwrap()
    }

    #[test]
    fn tokens_are_counted_as_the_lexer_splits_them() {
        for (document, count) in [
            ("{ me { id } }", 6),
            ("query Q($a: Int = -1.5e+3) { f(a: $a) }", 19),
            ("{ ...F } fragment F on Query { me { id } }", 14),
            ("{f(a:[1,2,3]@x)}", 14),
            // Ignored text is not counted.
            ("\u{feff} ,,, \t\r\n# a { comment }\n{ me }", 3),
            ("", 0),
            // Strings and block strings are one token each.
            (r#"{ f(a: "x { y } \" z") }"#, 8),
            ("{ f(a: \"\"\"a \\\"\"\" { \"\" } \n b\"\"\") }", 8),
            // Unterminated: the rest of the line, or of the text.
            ("\"open\n{", 2),
            ("\"\"\"open { }", 1),
            // Unknown characters count, UTF-8 boundaries are kept.
            ("é ü ?", 3),
            ("{ f(a: \"é\") }", 8),
        ] {
            assert_eq!(tokens(document), count, "{document:?}");
        }
    }

    #[test]
    fn tokens_are_the_lexers_pieces_of_text() {
        let source = "query Q($a: [Int!] = [-1, 2e3]) @x { f(s: \"a b\", t: \"\"\"c\"\"\") ...F } # c\n\"open";
        let tokens: Vec<&str> = Tokens::new(source).collect();
        assert_eq!(
            tokens,
            [
                "query",
                "Q",
                "(",
                "$",
                "a",
                ":",
                "[",
                "Int",
                "!",
                "]",
                "=",
                "[",
                "-1",
                "2e3",
                "]",
                ")",
                "@",
                "x",
                "{",
                "f",
                "(",
                "s",
                ":",
                "\"a b\"",
                "t",
                ":",
                "\"\"\"c\"\"\"",
                ")",
                "...",
                "F",
                "}",
                "\"open"
            ]
        );
        // An escape as the last character stays within the text.
        assert_eq!(Tokens::new("\"a\\").collect::<Vec<_>>(), ["\"a\\"]);
    }

    #[test]
    fn the_operation_type_read_from_tokens_is_the_parsers() {
        use OperationType::*;
        for (document, name, expected) in [
            ("{ me { id } }", None, Some(Query)),
            (
                "subscription { postCreated { id } }",
                None,
                Some(Subscription),
            ),
            (
                "mutation M($a: I = {x: {y: 1}}) @d(a: {b: 2}) { a }",
                None,
                Some(Mutation),
            ),
            (
                "fragment query on Query { me { id } } subscription S { x }",
                None,
                Some(Subscription),
            ),
            (
                "query A { a } subscription B { b }",
                Some("B"),
                Some(Subscription),
            ),
            ("query A { a } subscription B { b }", Some("A"), Some(Query)),
            ("query A { a } subscription B { b }", None, None),
            ("query A { a } subscription B { b }", Some("C"), None),
            (
                "query subscription { a }",
                Some("subscription"),
                Some(Query),
            ),
            (
                "subscription($a: Int) { a(x: $a) }",
                None,
                Some(Subscription),
            ),
            ("{ a(s: \"}\") } mutation { b }", None, None),
            ("fragment F on Q { a }", None, None),
        ] {
            assert_eq!(
                scanned_operation_type(document, name),
                expected,
                "{document:?} {name:?}"
            );
            // Where the tokens tell a type, the parser agrees.
            if let (Some(ty), Ok(doc)) = (expected, async_graphql::parser::parse_query(document)) {
                let parsed = doc
                    .operations
                    .iter()
                    .find(|(n, _)| name.is_none() || n.map(|n| n.as_str()) == name)
                    .map(|(_, op)| op.node.ty);
                assert_eq!(parsed, Some(ty), "{document:?}");
            }
        }
    }

    #[test]
    fn counting_stops_at_the_first_token_over_the_limit() {
        let document = "{ me { id } }".repeat(100_000);
        assert_eq!(count_tokens(&document, 15), Err(TooManyTokens { max: 15 }));
        assert_eq!(count_tokens("{ me { id } }", 6), Ok(6));
        assert_eq!(
            count_tokens("{ me { id } }", 5),
            Err(TooManyTokens { max: 5 })
        );
    }

    #[test]
    fn a_syntax_error_quotes_a_short_window_with_its_position() {
        let source = format!("{{ {} !!! {} }}", "a ".repeat(10_000), "b ".repeat(10_000));
        let error = async_graphql::parser::parse_query(&source).unwrap_err();
        let message = describe_parse_error(&source, &error);
        assert!(message.len() < 200, "{message}");
        assert!(
            message.starts_with("syntax error at line 1, column 20004: "),
            "{message}"
        );
        assert!(message.contains("a a  !!! b b"), "{message}");
        assert!(message.contains("expected"), "{message}");
    }

    #[test]
    fn the_window_is_on_the_error_line_and_char_based() {
        let source = "query {\n  éé { id } }}\n{ x }";
        let error = async_graphql::parser::parse_query(source).unwrap_err();
        let message = describe_parse_error(source, &error);
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("near \"  éé { id } }}\""), "{message}");
    }
}
