//! The key layout: every Redis key and channel name subgate uses, built
//! here and nowhere else from `redis.prefix` (`{p}` below, `subgate:` by
//! default), so that deployments with different prefixes share one Redis.
//!
//! | name | type | owner | holds |
//! | --- | --- | --- | --- |
//! | `{p}topic:{topic}` | channel | broker | the envelopes published to `topic` |
//! | `{p}history:{topic}` | stream | broker | the topic's last events; entry `SEQ-1` holds the envelope after its id |
//! | `{p}history-meta:{topic}` | hash | broker | `epoch`, `seq`: the history's epoch and last number |
//! | `{p}probe:{node}` | channel | broker | a node's Pub/Sub probe, heard by that node only |
//! | `{p}presence:members:{channel}` | sorted set | presence | user -> when their presence lapses (ms) |
//! | `{p}presence:holders:{len(user)}:{user}:{channel}` | hash | presence | node id -> that node's lease (ms) |
//! | `{p}presence:user:{user}` | sorted set | presence | channel -> lease: the channels a user is present in |
//! | `{p}presence:status:{user}` | string | presence | `away` / `busy` (absent: `online`), with a TTL |
//! | `{p}presence:channels` | sorted set | presence | channel -> its earliest lease: what the sweep looks at |
//! | `{p}user-connections:{user}` | hash | user connections | node id -> `count:lease_ms`: that node's connections of the user, until when |
//! | `{p}seq` | string (INCR) | store | the last list position handed out |
//! | `{p}user:{id}` | hash | store | `id email email_norm name password_hash created_at updated_at seq` |
//! | `{p}email:{normalized}` | string | store | the id of the user owning that email (trimmed, lowercased) |
//! | `{p}post:{id}` | hash | store | `id author_id title content created_at updated_at seq` |
//! | `{p}comment:{id}` | hash | store | `id post_id author_id content created_at seq` |
//! | `{p}channel:{id}` | hash | store | `id name is_private owner_id member_ids created_at seq`; `member_ids` is a JSON array, in join order |
//! | `{p}message:{id}` | hash | store | `id channel_id author_id content created_at seq` |
//! | `{p}notification:{id}` | hash | store | `id user_id type message payload read created_at seq`; `payload` is JSON |
//! | `{p}readers:{topic}` | string | store | a backend topic's readers rule as JSON; no TTL |
//! | `{p}users`, `{p}posts`, `{p}channels` | sorted set | store | ids scored by `seq` |
//! | `{p}posts:author:{id}`, `{p}comments:post:{id}`, `{p}messages:channel:{id}`, `{p}notifications:user:{id}` | sorted set | store | ids scored by `seq` |
//!
//! Store timestamps are RFC 3339 strings, booleans `"0"`/`"1"`.
//!
//! Presence's scripts derive its keys inside Lua from [`Keys::presence`]
//! (the per-pair keys are not known before the script runs); the names
//! above are the ones they build.
//!
//! **Redis Cluster** (`redis.mode = "cluster"`) needs every key one script
//! or transaction touches in one hash slot, so the names there carry hash
//! tags (the part in braces is what Redis hashes):
//!
//! | family | names in a cluster | slot |
//! | --- | --- | --- |
//! | a topic's channel, history and meta | `{p}topic:{<topic>}`, `{p}history:{<topic>}`, `{p}history-meta:{<topic>}` | the topic's own: topics spread over the shards, and the publish script stays one atomic call |
//! | the store (every entity, index, email, `seq`, readers rule) | `{<p>}user:{id}`, `{<p>}seq`, … | one: the store's scripts share the `seq` counter and its indexes |
//! | presence | `{<p>presence}:members:{channel}`, … | one: its scripts derive keys and keep one index of channels |
//! | per-user connection counts | `{<p>user-connections}:{user}` | one: a node renews all its users' leases in one script |
//! | a node's probe channel | `{p}probe:{node}` | — |
//!
//! A single Redis and Sentinel keep the names of the first table, so a
//! deployment on one Redis upgrades without moving a key.

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of its hash tag, or
/// of the whole key without one, modulo 16384).
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            // An empty tag (`{}`) does not count: the whole key is hashed.
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % 16384
}

/// Key and channel names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// Redis Cluster: names carry hash tags (see the module's table).
    cluster: bool,
    /// What every store key starts with: the prefix, braced in a cluster.
    store: String,
}

impl Keys {
    /// The names for one Redis (or Sentinel).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self::with_tags(prefix, false)
    }

    /// The names for one Redis, or with hash tags for Redis Cluster.
    pub fn with_tags(prefix: impl Into<String>, cluster: bool) -> Self {
        let prefix = prefix.into();
        let store = if cluster {
            format!("{{{prefix}}}")
        } else {
            prefix.clone()
        };
        Self {
            prefix,
            cluster,
            store,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the names carry hash tags for Redis Cluster.
    pub fn tagged(&self) -> bool {
        self.cluster
    }

    fn name(&self, parts: std::fmt::Arguments<'_>) -> String {
        format!("{}{parts}", self.prefix)
    }

    /// A store key: under the prefix, in the store's one slot in a cluster.
    fn stored(&self, parts: std::fmt::Arguments<'_>) -> String {
        format!("{}{parts}", self.store)
    }

    /// A key of `topic`'s family: in a cluster the topic is the hash tag.
    fn of_topic(&self, kind: &str, topic: &str) -> String {
        if self.cluster {
            format!("{}{kind}:{{{topic}}}", self.prefix)
        } else {
            format!("{}{kind}:{topic}", self.prefix)
        }
    }

    /// What every key of a family of its own slot starts with.
    fn family(&self, family: &str) -> String {
        if self.cluster {
            format!("{{{}{family}}}:", self.prefix)
        } else {
            format!("{}{family}:", self.prefix)
        }
    }

    // The broker.

    /// The Pub/Sub channel of `topic`.
    pub fn topic_channel(&self, topic: &str) -> String {
        self.of_topic("topic", topic)
    }

    /// The topic whose channel is `channel`, if it is one.
    pub fn topic_of_channel(&self, channel: &str) -> Option<String> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix("topic:")?;
        if self.cluster {
            Some(rest.strip_prefix('{')?.strip_suffix('}')?.to_owned())
        } else {
            Some(rest.to_owned())
        }
    }

    /// The history stream of `topic`.
    pub fn history(&self, topic: &str) -> String {
        self.of_topic("history", topic)
    }

    /// The epoch and last number of `topic`'s history.
    pub fn history_meta(&self, topic: &str) -> String {
        self.of_topic("history-meta", topic)
    }

    /// The probe channel of the node named `node`.
    pub fn probe_channel(&self, node: &str) -> String {
        self.name(format_args!("probe:{node}"))
    }

    // Presence.

    /// What every presence key starts with; the scripts append the rest.
    pub fn presence(&self) -> String {
        self.family("presence")
    }

    // Per-user connection counts (`crate::user_connections`).

    /// The hash of `user`'s connection counts, node id -> `count:lease_ms`.
    pub fn user_connections(&self, user: &str) -> String {
        format!("{}{user}", self.family("user-connections"))
    }

    // The store.

    /// The counter behind every list position.
    pub fn seq(&self) -> String {
        self.stored(format_args!("seq"))
    }

    /// The hash of the `kind` entity `id` (`user`, `post`, …).
    pub fn record(&self, kind: &str, id: &str) -> String {
        self.stored(format_args!("{kind}:{id}"))
    }

    /// What the keys of every `kind` entity start with.
    pub fn record_prefix(&self, kind: &str) -> String {
        self.record(kind, "")
    }

    /// The owner of a normalized email.
    pub fn email(&self, normalized: &str) -> String {
        self.stored(format_args!("email:{normalized}"))
    }

    pub fn email_prefix(&self) -> String {
        self.email("")
    }

    /// Every user, oldest first.
    pub fn users(&self) -> String {
        self.stored(format_args!("users"))
    }

    /// Every post.
    pub fn posts(&self) -> String {
        self.stored(format_args!("posts"))
    }

    pub fn posts_by_author(&self, author_id: &str) -> String {
        self.stored(format_args!("posts:author:{author_id}"))
    }

    pub fn posts_by_author_prefix(&self) -> String {
        self.posts_by_author("")
    }

    pub fn comments_of_post(&self, post_id: &str) -> String {
        self.stored(format_args!("comments:post:{post_id}"))
    }

    /// Every channel.
    pub fn channels(&self) -> String {
        self.stored(format_args!("channels"))
    }

    pub fn messages_of_channel(&self, channel_id: &str) -> String {
        self.stored(format_args!("messages:channel:{channel_id}"))
    }

    pub fn notifications_of_user(&self, user_id: &str) -> String {
        self.stored(format_args!("notifications:user:{user_id}"))
    }

    /// The readers rule of a backend topic.
    pub fn topic_readers(&self, topic: &str) -> String {
        self.stored(format_args!("readers:{topic}"))
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn names_follow_the_documented_layout() {
        let k = Keys::new("p:");
        assert_eq!(k.topic_channel("post:1"), "p:topic:post:1");
        assert_eq!(k.history("posts"), "p:history:posts");
        assert_eq!(k.history_meta("posts"), "p:history-meta:posts");
        assert_eq!(k.probe_channel("n1"), "p:probe:n1");
        assert_eq!(k.presence(), "p:presence:");
        assert_eq!(k.seq(), "p:seq");
        assert_eq!(k.record("user", "u1"), "p:user:u1");
        assert_eq!(k.record_prefix("user"), "p:user:");
        assert_eq!(k.email("a@b.c"), "p:email:a@b.c");
        assert_eq!(k.email_prefix(), "p:email:");
        assert_eq!(k.users(), "p:users");
        assert_eq!(k.posts(), "p:posts");
        assert_eq!(k.posts_by_author("u1"), "p:posts:author:u1");
        assert_eq!(k.posts_by_author_prefix(), "p:posts:author:");
        assert_eq!(k.comments_of_post("p1"), "p:comments:post:p1");
        assert_eq!(k.channels(), "p:channels");
        assert_eq!(k.messages_of_channel("c1"), "p:messages:channel:c1");
        assert_eq!(k.notifications_of_user("u1"), "p:notifications:user:u1");
        assert_eq!(k.topic_readers("orders:eu"), "p:readers:orders:eu");
        assert_eq!(k.user_connections("u1"), "p:user-connections:u1");
        assert_eq!(
            k.topic_of_channel("p:topic:post:1").as_deref(),
            Some("post:1")
        );
        assert_eq!(k.topic_of_channel("q:topic:post:1"), None);
    }

    #[test]
    fn slots_are_the_clusters() {
        use redis::cluster_routing::Slot;
        // The examples of the Redis Cluster specification.
        assert_eq!(super::slot_of("123456789"), 0x31C3 % 16384);
        for key in [
            "foo",
            "{user1000}.following",
            "foo{}{bar}",
            "foo{{bar}}zap",
            "foo{bar}{zap}",
            "",
            "{}",
        ] {
            let ours = Slot::new(super::slot_of(key)).unwrap();
            assert_eq!(ours, Slot::for_key(key), "{key}");
        }
        assert_eq!(
            super::slot_of("{user1000}.following"),
            super::slot_of("{user1000}.followers")
        );
    }

    #[test]
    fn cluster_names_put_each_family_in_its_slot() {
        let k = Keys::with_tags("p:", true);
        assert_eq!(k.topic_channel("post:1"), "p:topic:{post:1}");
        assert_eq!(k.history("post:1"), "p:history:{post:1}");
        assert_eq!(k.history_meta("post:1"), "p:history-meta:{post:1}");
        assert_eq!(k.presence(), "{p:presence}:");
        assert_eq!(k.user_connections("u1"), "{p:user-connections}:u1");
        assert_eq!(k.seq(), "{p:}seq");
        assert_eq!(k.record("user", "u1"), "{p:}user:u1");
        assert_eq!(k.email("a@b.c"), "{p:}email:a@b.c");
        assert_eq!(k.topic_readers("orders"), "{p:}readers:orders");
        assert_eq!(k.probe_channel("n1"), "p:probe:n1");
        assert_eq!(
            k.topic_of_channel("p:topic:{post:1}").as_deref(),
            Some("post:1")
        );
        assert_eq!(k.topic_of_channel("p:probe:n1"), None);
        // One slot per topic family, one for the whole store.
        let slot = |key: &str| super::slot_of(key);
        assert_eq!(slot(&k.history("posts")), slot(&k.topic_channel("posts")));
        assert_eq!(slot(&k.history("posts")), slot(&k.history_meta("posts")));
        assert_eq!(slot(&k.seq()), slot(&k.record("post", "x")));
        assert_eq!(slot(&k.seq()), slot(&k.topic_readers("orders")));
        assert_eq!(
            slot(&format!("{}members:c1", k.presence())),
            slot(&format!("{}user:u2", k.presence()))
        );
    }
}
