//! How an entity lies in its Redis hash: one [`Stored`] declaration per
//! entity names its fields once, for writing and for reading, and
//! [`Column`] says how each type of value is written as a field.
//!
//! Timestamps are RFC 3339 strings, booleans `"0"`/`"1"`, member lists and
//! payloads JSON; every hash also holds `seq`, the entity's list position.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::store::{Channel, Comment, Message, Notification, Post, StoreError, StoreResult, User};

/// A hash as Redis returns it; empty when the key does not exist.
pub(super) type Fields = HashMap<String, String>;

/// A value stored as one hash field.
pub(super) trait Column: Sized {
    fn to_field(&self) -> String;
    /// `None` when `raw` is not a value of this type.
    fn from_field(raw: String) -> Option<Self>;
}

impl Column for String {
    fn to_field(&self) -> String {
        self.clone()
    }
    fn from_field(raw: String) -> Option<Self> {
        Some(raw)
    }
}

impl Column for DateTime<Utc> {
    fn to_field(&self) -> String {
        // Only as many fraction digits as needed, so reading it back yields
        // the very same instant.
        self.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }
    fn from_field(raw: String) -> Option<Self> {
        DateTime::parse_from_rfc3339(&raw)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

impl Column for bool {
    fn to_field(&self) -> String {
        if *self { "1" } else { "0" }.to_owned()
    }
    fn from_field(raw: String) -> Option<Self> {
        match raw.as_str() {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        }
    }
}

/// A channel's members: a JSON array, in join order (the add-member script
/// edits it in place).
impl Column for Vec<String> {
    fn to_field(&self) -> String {
        serde_json::Value::from(self.clone()).to_string()
    }
    fn from_field(raw: String) -> Option<Self> {
        serde_json::from_str(&raw).ok()
    }
}

impl Column for serde_json::Value {
    fn to_field(&self) -> String {
        self.to_string()
    }
    fn from_field(raw: String) -> Option<Self> {
        serde_json::from_str(&raw).ok()
    }
}

/// A stored hash being decoded into an entity.
pub(super) struct Record {
    fields: Fields,
    kind: &'static str,
}

impl Record {
    /// `None` for the empty hash Redis answers for a missing key.
    pub(super) fn found(fields: Fields, kind: &'static str) -> Option<Self> {
        (!fields.is_empty()).then_some(Self { fields, kind })
    }

    fn malformed(&self, field: &str) -> StoreError {
        // Only a bug or a foreign writer under our prefix gets here; the
        // caller sees an unavailable store rather than a half-read entity.
        StoreError::Unavailable(format!(
            "malformed {} record in Redis: field {field}",
            self.kind
        ))
    }

    pub(super) fn take<T: Column>(&mut self, field: &str) -> StoreResult<T> {
        self.fields
            .remove(field)
            .and_then(T::from_field)
            .ok_or_else(|| self.malformed(field))
    }

    /// The entity, and its position in its lists.
    pub(super) fn decode<E: Stored>(mut self) -> StoreResult<(u64, E)> {
        let entity = E::decode(&mut self)?;
        let seq = self.take::<String>("seq")?;
        let seq = seq.parse().map_err(|_| self.malformed("seq"))?;
        Ok((seq, entity))
    }
}

/// An entity kept as one hash, `{prefix}{KIND}:{id}`.
pub(super) trait Stored: Sized {
    const KIND: &'static str;
    fn id(&self) -> &str;
    /// Every field of the entity, by its name in the hash.
    fn encode(&self) -> Vec<(&'static str, String)>;
    fn decode(record: &mut Record) -> StoreResult<Self>;
}

/// Declares how an entity is stored: the kind that names its keys and its
/// fields, each under its own name in the hash unless renamed
/// (`kind => "type"`). Every field of the struct is listed, since the
/// decoder builds the struct from the list: a field added to an entity and
/// forgotten here does not compile.
macro_rules! stored {
    (@name $field:ident) => { stringify!($field) };
    (@name $field:ident $name:literal) => { $name };
    ($entity:ident as $kind:literal { $($field:ident $(=> $name:literal)?),+ $(,)? }) => {
        impl Stored for $entity {
            const KIND: &'static str = $kind;
            fn id(&self) -> &str {
                &self.id
            }
            fn encode(&self) -> Vec<(&'static str, String)> {
                vec![$((stored!(@name $field $($name)?), self.$field.to_field())),+]
            }
            fn decode(record: &mut Record) -> StoreResult<Self> {
                Ok(Self { $($field: record.take(stored!(@name $field $($name)?))?),+ })
            }
        }
    };
}

// `email_norm`, the user's normalized email, is stored beside these: it
// is written with the email and read only by the scripts.
stored!(User as "user" { id, email, name, password_hash, created_at, updated_at });
stored!(Post as "post" { id, author_id, title, content, created_at, updated_at });
stored!(Comment as "comment" { id, post_id, author_id, content, created_at });
stored!(Channel as "channel" { id, name, is_private, owner_id, member_ids, created_at });
stored!(Message as "message" { id, channel_id, author_id, content, created_at });
stored!(Notification as "notification" { id, user_id, kind => "type", message, payload, read, created_at });

/// The same normalization as the memory store: emails differing only in
/// case or surrounding blanks are one email.
pub(super) fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc)
    }

    fn notification(payload: serde_json::Value, read: bool) -> Notification {
        Notification {
            id: "n".into(),
            user_id: "u".into(),
            kind: "k".into(),
            message: "m".into(),
            payload,
            read,
            created_at: at("2024-05-06T07:08:09Z"),
        }
    }

    /// The hash `entity` is written as, at position 7.
    fn hash<E: Stored>(entity: &E) -> Fields {
        let mut fields: Fields = entity
            .encode()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        fields.insert("seq".into(), "7".into());
        fields
    }

    fn read<E: Stored>(fields: Fields) -> StoreResult<(u64, E)> {
        Record::found(fields, E::KIND).unwrap().decode()
    }

    #[test]
    fn every_entity_reads_back_as_written() {
        let channel = Channel {
            id: "c".into(),
            name: "n".into(),
            is_private: true,
            owner_id: "o".into(),
            member_ids: vec!["o".into(), "x\"y".into()],
            created_at: at("2024-05-06T07:08:09.123456Z"),
        };
        assert_eq!(read(hash(&channel)), Ok((7, channel)));
        let n = notification(serde_json::json!("a string payload"), false);
        assert_eq!(read(hash(&n)), Ok((7, n)));
    }

    #[test]
    fn fields_are_written_as_the_layout_says() {
        let fields = hash(&notification(serde_json::json!({"a": 1}), true));
        assert_eq!(fields["type"], "k");
        assert_eq!(fields["payload"], r#"{"a":1}"#);
        assert_eq!(fields["read"], "1");
        assert_eq!(fields["created_at"], "2024-05-06T07:08:09Z");
    }

    #[test]
    fn a_field_that_does_not_decode_names_the_record_and_field() {
        let mut fields = hash(&notification(serde_json::json!({}), false));
        fields.insert("read".into(), "yes".into());
        assert_eq!(
            read::<Notification>(fields),
            Err(StoreError::Unavailable(
                "malformed notification record in Redis: field read".into()
            ))
        );
    }
}
