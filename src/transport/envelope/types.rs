//! The message type names of the envelope protocol on `/ws`, in one place.
//!
//! The protocol's implementation, its documentation (`asyncapi.yaml` at the
//! repository root) and its tests all name these types; keeping the list
//! here lets a test hold the AsyncAPI document to exactly this set, so a
//! type added to the protocol cannot go undocumented (nor a documented one
//! be left unimplemented).

/// Declares the types of one direction once: a constant per type in
/// `$module`, and `$all`, the list of every one of them.
macro_rules! message_types {
    ($(#[$doc:meta])* $module:ident, $all:ident: $($name:ident = $value:expr,)+) => {
        $(#[$doc])*
        pub mod $module {
            $(pub const $name: &str = $value;)+
        }

        /// Every type of this direction.
        pub const $all: &[&str] = &[$($module::$name),+];
    };
}

message_types! {
    /// Types a client sends.
    client, CLIENT_MESSAGE_TYPES:
    AUTH = "auth",
    CHANNEL_SUBSCRIBE = "channel.subscribe",
    CHANNEL_UNSUBSCRIBE = "channel.unsubscribe",
    MESSAGE_SEND = "message.send",
    USER_TYPING = "user.typing",
    PRESENCE_UPDATE = "presence.update",
    PING = "ping",
}

message_types! {
    /// Types the server sends.
    server, SERVER_MESSAGE_TYPES:
    CONNECTION_ESTABLISHED = "connection.established",
    AUTH_SUCCESS = "auth.success",
    AUTH_FAILED = "auth.failed",
    AUTH_EXPIRED = "auth.expired",
    CHANNEL_SUBSCRIBED = "channel.subscribed",
    CHANNEL_UNSUBSCRIBED = "channel.unsubscribed",
    CHANNEL_GAP = "channel.gap",
    MESSAGE_SENT = "message.sent",
    // Events of a channel's topic: their names belong to what publishes them.
    MESSAGE_CREATED = crate::domain::MESSAGE_CREATED,
    USER_TYPING = crate::domain::USER_TYPING,
    PRESENCE_UPDATED = crate::presence::PRESENCE_UPDATED,
    PONG = "pong",
    ERROR = "error",
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn backends_may_publish_no_type_of_the_protocol() {
        for kind in CLIENT_MESSAGE_TYPES.iter().chain(SERVER_MESSAGE_TYPES) {
            assert!(
                crate::domain::publishing::is_reserved_type(kind),
                "{kind} is not reserved"
            );
        }
    }

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
