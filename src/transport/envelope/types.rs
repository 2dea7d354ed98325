//! The message type names of the envelope protocol on `/ws`, in one place.
//!
//! The protocol's implementation, its documentation (`asyncapi.yaml` at the
//! repository root) and its tests all name these types; keeping the list
//! here lets a test hold the AsyncAPI document to exactly this set, so a
//! type added to the protocol cannot go undocumented (nor a documented one
//! be left unimplemented).

/// Types a client sends.
pub mod client {
    pub const AUTH: &str = "auth";
    pub const CHANNEL_SUBSCRIBE: &str = "channel.subscribe";
    pub const CHANNEL_UNSUBSCRIBE: &str = "channel.unsubscribe";
    pub const MESSAGE_SEND: &str = "message.send";
    pub const USER_TYPING: &str = "user.typing";
    pub const PRESENCE_UPDATE: &str = "presence.update";
    pub const PING: &str = "ping";
}

/// Types the server sends.
pub mod server {
    pub const CONNECTION_ESTABLISHED: &str = "connection.established";
    pub const AUTH_SUCCESS: &str = "auth.success";
    pub const AUTH_FAILED: &str = "auth.failed";
    pub const CHANNEL_SUBSCRIBED: &str = "channel.subscribed";
    pub const CHANNEL_UNSUBSCRIBED: &str = "channel.unsubscribed";
    pub const CHANNEL_GAP: &str = "channel.gap";
    pub const MESSAGE_SENT: &str = "message.sent";
    // Events of a channel's topic: their names belong to what publishes them.
    pub const MESSAGE_CREATED: &str = crate::domain::MESSAGE_CREATED;
    pub const USER_TYPING: &str = crate::domain::USER_TYPING;
    pub const PRESENCE_UPDATED: &str = crate::presence::PRESENCE_UPDATED;
    pub const PONG: &str = "pong";
    pub const ERROR: &str = "error";
}

/// Every type a client may send.
pub const CLIENT_MESSAGE_TYPES: &[&str] = &[
    client::AUTH,
    client::CHANNEL_SUBSCRIBE,
    client::CHANNEL_UNSUBSCRIBE,
    client::MESSAGE_SEND,
    client::USER_TYPING,
    client::PRESENCE_UPDATE,
    client::PING,
];

/// Every type the server may send.
pub const SERVER_MESSAGE_TYPES: &[&str] = &[
    server::CONNECTION_ESTABLISHED,
    server::AUTH_SUCCESS,
    server::AUTH_FAILED,
    server::CHANNEL_SUBSCRIBED,
    server::CHANNEL_UNSUBSCRIBED,
    server::CHANNEL_GAP,
    server::MESSAGE_SENT,
    server::MESSAGE_CREATED,
    server::USER_TYPING,
    server::PRESENCE_UPDATED,
    server::PONG,
    server::ERROR,
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The types `asyncapi.yaml` documents in one direction: every message
    /// there carries `messageId: {direction}.{type}`.
    fn documented(spec: &str, direction: &str) -> BTreeSet<String> {
        let marker = format!("{direction}.");
        spec.lines()
            .filter_map(|line| line.trim().strip_prefix("messageId:"))
            .map(|id| id.trim().trim_matches(|c| c == '"' || c == '\''))
            .filter_map(|id| id.strip_prefix(&marker))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn asyncapi_documents_exactly_the_protocols_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("asyncapi.yaml");
        let spec = std::fs::read_to_string(&path).expect("asyncapi.yaml at the repository root");
        for (direction, types) in [
            ("client", CLIENT_MESSAGE_TYPES),
            ("server", SERVER_MESSAGE_TYPES),
        ] {
            let in_code: BTreeSet<String> = types.iter().map(|t| t.to_string()).collect();
            let in_spec = documented(&spec, direction);
            let undocumented: Vec<_> = in_code.difference(&in_spec).collect();
            let unknown: Vec<_> = in_spec.difference(&in_code).collect();
            assert!(
                undocumented.is_empty() && unknown.is_empty(),
                "{direction} messages: not in asyncapi.yaml: {undocumented:?}; in asyncapi.yaml but not in \
                 src/transport/envelope/types.rs: {unknown:?}"
            );
            // Each one also states its type as the envelope's `type` value.
            for t in types {
                assert!(
                    spec.contains(&format!("const: {t}\n")),
                    "asyncapi.yaml: no `const: {t}` for the type field"
                );
            }
        }
    }

    #[test]
    fn type_names_are_unique_per_direction() {
        for types in [CLIENT_MESSAGE_TYPES, SERVER_MESSAGE_TYPES] {
            let set: BTreeSet<_> = types.iter().collect();
            assert_eq!(set.len(), types.len());
        }
    }
}
