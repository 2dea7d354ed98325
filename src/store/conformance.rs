//! The conformance suite every [`Store`] implementation passes: the trait's
//! contract as executable checks, run once per implementation.
//!
//! Each check gets a fresh, empty store and is its own test, so a failure
//! names the behaviour that broke and the implementation it broke in. The
//! Redis runs start a private `redis-server` per test.

use std::collections::HashSet;

use crate::domain::entities::Create;
use std::future::Future;
use std::slice;
use std::sync::Arc;

use super::*;

/// Every check, by name; each implementation's module below turns each into
/// a test.
macro_rules! for_each_check {
    ($suite:ident!($setup:path)) => {
        $suite!($setup;
            users_crud,
            emails_are_unique_case_insensitively,
            updating_and_deleting_move_and_free_emails,
            concurrent_creates_of_one_email_have_one_winner,
            concurrent_updates_to_one_email_have_one_winner,
            posts_crud,
            deleting_an_author_keeps_their_posts,
            comments_need_their_post,
            channels_and_members,
            messages_need_their_channel,
            notifications_and_reading_them,
            every_list_pages_without_gaps_or_repeats,
            pages_walk_on_while_items_arrive,
            pages_walk_on_past_a_deleted_cursor,
            page_flags_at_the_edges,
            batches_keep_order_and_mark_missing_ids,
            concurrent_creates_get_distinct_positions,
            topic_readers_are_kept_per_topic_until_replaced,
        );
    };
}

macro_rules! suite {
    ($setup:path; $($check:ident),+ $(,)?) => {
        $(
            // Several worker threads, so the concurrency checks really race.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let (store, _keep_alive) = $setup();
                super::$check(store).await;
            }
        )+
    };
}

mod memory_store {
    use super::*;

    fn setup() -> (Arc<dyn Store>, ()) {
        (Arc::new(memory::MemoryStore::new()), ())
    }

    for_each_check!(suite!(setup));
}

mod redis_store {
    use std::time::Duration;

    use super::*;
    use crate::infra::redis::{Redis, RedisConfig};
    use crate::telemetry::metrics::Metrics;
    use crate::test_support::RedisServer;

    fn setup() -> (Arc<dyn Store>, RedisServer) {
        let server = RedisServer::start();
        let mut config = RedisConfig::new(server.url(), "subgate:");
        config.pool_size = 8;
        config.command_timeout = Duration::from_secs(5);
        let redis = Redis::new(config, Arc::new(Metrics::new())).expect("a valid URL");
        (Arc::new(redis::RedisStore::new(redis)), server)
    }

    for_each_check!(suite!(setup));
}

fn new_user(email: &str) -> NewUser {
    NewUser {
        email: email.into(),
        name: format!("name of {email}"),
        password_hash: "$argon2id$hash".into(),
    }
}

fn conflict() -> StoreError {
    StoreError::Conflict { field: "email" }
}

fn ids<T>(items: &[(u64, T)], id: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|(_, v)| id(v).to_owned()).collect()
}

async fn users_crud(s: Arc<dyn Store>) {
    let created = s.create_user(new_user("ada@example.com")).await.unwrap();
    assert_eq!(created.email, "ada@example.com");
    assert_eq!(created.name, "name of ada@example.com");
    assert_eq!(created.password_hash, "$argon2id$hash");
    assert_eq!(created.created_at, created.updated_at);

    // Read back exactly, timestamps to the last digit included.
    assert_eq!(
        s.get_users(slice::from_ref(&created.id)).await.unwrap(),
        vec![Some(created.clone())]
    );
    assert_eq!(
        s.find_user_by_email("ada@example.com").await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(
        s.find_user_by_email("  ADA@Example.com ").await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(
        s.find_user_by_email("nobody@example.com").await.unwrap(),
        None
    );

    let patch = UserPatch {
        name: Some("Ada L.".into()),
        password_hash: Some("$argon2id$new".into()),
        email: None,
    };
    let updated = s.update_user(&created.id, patch).await.unwrap();
    assert_eq!(updated.id, created.id);
    assert_eq!(updated.email, created.email);
    assert_eq!(updated.name, "Ada L.");
    assert_eq!(updated.password_hash, "$argon2id$new");
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.updated_at >= created.updated_at);
    assert_eq!(
        s.get_users(slice::from_ref(&created.id)).await.unwrap(),
        vec![Some(updated.clone())]
    );

    // An empty patch still touches `updated_at` and changes nothing else.
    let touched = s
        .update_user(&created.id, UserPatch::default())
        .await
        .unwrap();
    assert_eq!(
        (&touched.name, &touched.email),
        (&updated.name, &updated.email)
    );
    assert!(touched.updated_at >= updated.updated_at);

    let page = s.list_users(PageRequest::first(10)).await.unwrap();
    assert_eq!(page.total_count, 1);
    assert_eq!(page.items[0].1, touched);

    assert_eq!(s.delete_user(&created.id).await.unwrap(), touched);
    assert_eq!(
        s.get_users(slice::from_ref(&created.id)).await.unwrap(),
        vec![None]
    );
    assert_eq!(s.find_user_by_email("ada@example.com").await.unwrap(), None);
    assert_eq!(
        s.list_users(PageRequest::first(10))
            .await
            .unwrap()
            .total_count,
        0
    );

    assert_eq!(s.delete_user(&created.id).await, Err(StoreError::NotFound));
    let patch = UserPatch {
        name: Some("ghost".into()),
        ..Default::default()
    };
    assert_eq!(
        s.update_user(&created.id, patch).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        s.update_user("no-such-user", UserPatch::default()).await,
        Err(StoreError::NotFound)
    );
}

async fn emails_are_unique_case_insensitively(s: Arc<dyn Store>) {
    let a = s
        .create_user(new_user("  Mixed@Example.COM "))
        .await
        .unwrap();
    // Stored as given; compared trimmed and lowercased.
    assert_eq!(a.email, "  Mixed@Example.COM ");
    assert_eq!(
        s.create_user(new_user("mixed@example.com")).await,
        Err(conflict())
    );
    assert_eq!(
        s.create_user(new_user("MIXED@EXAMPLE.COM")).await,
        Err(conflict())
    );
    assert_eq!(
        s.create_user(new_user("\tmixed@example.com\n")).await,
        Err(conflict())
    );
    assert_eq!(
        s.find_user_by_email("mixed@example.com")
            .await
            .unwrap()
            .map(|u| u.id),
        Some(a.id.clone())
    );

    let b = s.create_user(new_user("b@example.com")).await.unwrap();
    let patch = UserPatch {
        email: Some("MIXED@example.com".into()),
        ..Default::default()
    };
    assert_eq!(s.update_user(&b.id, patch).await, Err(conflict()));
    // The refused update changed nothing.
    assert_eq!(
        s.get_users(slice::from_ref(&b.id)).await.unwrap(),
        vec![Some(b.clone())]
    );
    assert_eq!(
        s.find_user_by_email("b@example.com")
            .await
            .unwrap()
            .map(|u| u.id),
        Some(b.id.clone())
    );

    // Only the failed creates were refused: two users exist.
    assert_eq!(
        s.list_users(PageRequest::first(10))
            .await
            .unwrap()
            .total_count,
        2
    );

    s.delete_user(&a.id).await.unwrap();
    let again = s.create_user(new_user("mixed@example.com")).await.unwrap();
    assert_ne!(again.id, a.id);
}

async fn updating_and_deleting_move_and_free_emails(s: Arc<dyn Store>) {
    let a = s.create_user(new_user("a@example.com")).await.unwrap();

    // A change of case keeps the email this user's.
    let patch = UserPatch {
        email: Some("A@Example.com".into()),
        ..Default::default()
    };
    let a2 = s.update_user(&a.id, patch).await.unwrap();
    assert_eq!(a2.email, "A@Example.com");
    assert_eq!(
        s.find_user_by_email("a@example.com").await.unwrap(),
        Some(a2.clone())
    );
    assert_eq!(
        s.create_user(new_user("a@example.com")).await,
        Err(conflict())
    );

    // A real change claims the new email and frees the old one.
    let patch = UserPatch {
        email: Some("new@example.com".into()),
        ..Default::default()
    };
    let a3 = s.update_user(&a.id, patch).await.unwrap();
    assert_eq!(a3.email, "new@example.com");
    assert_eq!(s.find_user_by_email("a@example.com").await.unwrap(), None);
    assert_eq!(
        s.find_user_by_email("NEW@example.com").await.unwrap(),
        Some(a3.clone())
    );
    assert_eq!(
        s.create_user(new_user("new@example.com")).await,
        Err(conflict())
    );
    let b = s.create_user(new_user("a@example.com")).await.unwrap();

    // The freed email went to b; a cannot take it back.
    let patch = UserPatch {
        email: Some("a@example.com".into()),
        ..Default::default()
    };
    assert_eq!(s.update_user(&a.id, patch).await, Err(conflict()));
    assert_eq!(
        s.find_user_by_email("a@example.com")
            .await
            .unwrap()
            .map(|u| u.id),
        Some(b.id.clone())
    );

    // Deleting frees the current email, not the one given up before.
    s.delete_user(&a.id).await.unwrap();
    assert_eq!(s.find_user_by_email("new@example.com").await.unwrap(), None);
    assert_eq!(
        s.find_user_by_email("a@example.com")
            .await
            .unwrap()
            .map(|u| u.id),
        Some(b.id.clone())
    );
    s.create_user(new_user("new@example.com")).await.unwrap();
}

async fn concurrent_creates_of_one_email_have_one_winner(s: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            // Spellings differ; the normalized email is one.
            let email = if i % 2 == 0 {
                "Race@Example.com".to_owned()
            } else {
                format!(" race@example.COM{}", " ".repeat(i))
            };
            tokio::spawn(async move { s.create_user(new_user(&email)).await })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(user) => winners.push(user),
            Err(e) => assert_eq!(e, conflict()),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one create wins");
    assert_eq!(
        s.find_user_by_email("race@example.com").await.unwrap(),
        Some(winners[0].clone())
    );
    assert_eq!(
        s.list_users(PageRequest::first(50))
            .await
            .unwrap()
            .total_count,
        1
    );
}

async fn concurrent_updates_to_one_email_have_one_winner(s: Arc<dyn Store>) {
    let mut users = Vec::new();
    for i in 0..20 {
        users.push(
            s.create_user(new_user(&format!("u{i}@example.com")))
                .await
                .unwrap(),
        );
    }
    let tasks: Vec<_> = users
        .iter()
        .map(|u| {
            let (s, id) = (s.clone(), u.id.clone());
            let patch = UserPatch {
                email: Some("wanted@example.com".into()),
                ..Default::default()
            };
            tokio::spawn(async move { s.update_user(&id, patch).await })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(user) => winners.push(user),
            Err(e) => assert_eq!(e, conflict()),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one update wins");
    let winner = &winners[0];
    assert_eq!(
        s.find_user_by_email("wanted@example.com")
            .await
            .unwrap()
            .map(|u| u.id),
        Some(winner.id.clone())
    );
    // The winner gave up its old email; every loser kept its own.
    for (i, u) in users.iter().enumerate() {
        let owner = s
            .find_user_by_email(&format!("u{i}@example.com"))
            .await
            .unwrap()
            .map(|u| u.id);
        if u.id == winner.id {
            assert_eq!(owner, None);
        } else {
            assert_eq!(owner, Some(u.id.clone()));
        }
    }
}

async fn posts_crud(s: Arc<dyn Store>) {
    let p = s
        .create_post("author-1", "Title".into(), "Body".into())
        .await
        .unwrap();
    assert_eq!(
        (p.author_id.as_str(), p.title.as_str(), p.content.as_str()),
        ("author-1", "Title", "Body")
    );
    assert_eq!(p.created_at, p.updated_at);
    assert_eq!(
        s.get_posts(slice::from_ref(&p.id)).await.unwrap(),
        vec![Some(p.clone())]
    );

    // Each field of the patch alone.
    let t = s
        .update_post(
            &p.id,
            PostPatch {
                title: Some("New title".into()),
                content: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (t.title.as_str(), t.content.as_str()),
        ("New title", "Body")
    );
    let c = s
        .update_post(
            &p.id,
            PostPatch {
                title: None,
                content: Some("New body".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (c.title.as_str(), c.content.as_str()),
        ("New title", "New body")
    );
    assert_eq!(c.created_at, p.created_at);
    assert!(c.updated_at >= p.updated_at);
    assert_eq!(
        s.get_posts(slice::from_ref(&p.id)).await.unwrap(),
        vec![Some(c.clone())]
    );

    let other = s
        .create_post("author-2", "Other".into(), String::new())
        .await
        .unwrap();
    let all = s.list_posts(None, PageRequest::first(10)).await.unwrap();
    assert_eq!(
        ids(&all.items, |p| &p.id),
        vec![other.id.clone(), p.id.clone()]
    );
    let mine = s
        .list_posts(Some("author-1"), PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(
        mine.items
            .iter()
            .map(|(_, p)| p.clone())
            .collect::<Vec<_>>(),
        vec![c.clone()]
    );
    assert_eq!(mine.total_count, 1);

    assert_eq!(s.delete_post(&p.id).await.unwrap(), c);
    assert_eq!(
        s.get_posts(slice::from_ref(&p.id)).await.unwrap(),
        vec![None]
    );
    let all = s.list_posts(None, PageRequest::first(10)).await.unwrap();
    assert_eq!(
        (ids(&all.items, |p| &p.id), all.total_count),
        (vec![other.id.clone()], 1)
    );
    let mine = s
        .list_posts(Some("author-1"), PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!((mine.items.len(), mine.total_count), (0, 0));

    assert_eq!(s.delete_post(&p.id).await, Err(StoreError::NotFound));
    assert_eq!(
        s.update_post(&p.id, PostPatch::default()).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        s.update_post("no-such-post", PostPatch::default()).await,
        Err(StoreError::NotFound)
    );
    let nobody = s
        .list_posts(Some("nobody"), PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(
        (nobody.items.len(), nobody.total_count, nobody.has_next_page),
        (0, 0, false)
    );
}

async fn deleting_an_author_keeps_their_posts(s: Arc<dyn Store>) {
    let author = s.create_user(new_user("writer@example.com")).await.unwrap();
    let post = s
        .create_post(&author.id, "Kept".into(), String::new())
        .await
        .unwrap();
    s.delete_user(&author.id).await.unwrap();
    assert_eq!(
        s.get_posts(slice::from_ref(&post.id)).await.unwrap(),
        vec![Some(post.clone())]
    );
    let theirs = s
        .list_posts(Some(&author.id), PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(ids(&theirs.items, |p| &p.id), vec![post.id.clone()]);
}

async fn comments_need_their_post(s: Arc<dyn Store>) {
    assert_eq!(
        s.create_comment("no-such-post", "u", "x".into()).await,
        Err(StoreError::NotFound)
    );
    let post = s.create_post("u", "t".into(), String::new()).await.unwrap();
    let first = s
        .create_comment(&post.id, "u1", "first".into())
        .await
        .unwrap();
    let second = s
        .create_comment(&post.id, "u2", "second".into())
        .await
        .unwrap();
    assert_eq!(
        (
            first.post_id.as_str(),
            first.author_id.as_str(),
            first.content.as_str()
        ),
        (post.id.as_str(), "u1", "first")
    );

    // Oldest first, read back exactly.
    let page = s
        .list_comments(&post.id, PageRequest::first(10))
        .await
        .unwrap();
    let comments: Vec<Comment> = page.items.into_iter().map(|(_, c)| c).collect();
    assert_eq!(comments, vec![first, second]);
    assert_eq!(page.total_count, 2);

    // Nothing was written for the refused comment.
    let none = s
        .list_comments("no-such-post", PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!((none.items.len(), none.total_count), (0, 0));

    s.delete_post(&post.id).await.unwrap();
    assert_eq!(
        s.create_comment(&post.id, "u", "late".into()).await,
        Err(StoreError::NotFound)
    );
}

async fn channels_and_members(s: Arc<dyn Store>) {
    let members = vec![
        "b".to_owned(),
        "owner".to_owned(),
        "a".to_owned(),
        "b".to_owned(),
    ];
    let ch = s
        .create_channel("owner", "general".into(), true, members)
        .await
        .unwrap();
    assert_eq!(
        ch.member_ids,
        vec!["owner", "b", "a"],
        "owner first, then as given, once each"
    );
    assert_eq!(
        (ch.name.as_str(), ch.is_private, ch.owner_id.as_str()),
        ("general", true, "owner")
    );
    assert_eq!(
        s.get_channels(slice::from_ref(&ch.id)).await.unwrap(),
        vec![Some(ch.clone())]
    );

    let public = s
        .create_channel("o2", "random".into(), false, Vec::new())
        .await
        .unwrap();
    assert_eq!(public.member_ids, vec!["o2"]);
    assert!(
        !s.get_channels(slice::from_ref(&public.id)).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .is_private
    );

    let joined = s.add_channel_member(&ch.id, "c").await.unwrap();
    assert_eq!(joined.member_ids, vec!["owner", "b", "a", "c"]);
    // Idempotent, for newcomers and the owner alike.
    assert_eq!(s.add_channel_member(&ch.id, "c").await.unwrap(), joined);
    assert_eq!(s.add_channel_member(&ch.id, "owner").await.unwrap(), joined);
    assert_eq!(
        s.get_channels(slice::from_ref(&ch.id)).await.unwrap(),
        vec![Some(joined.clone())]
    );
    assert_eq!(
        s.add_channel_member("no-such-channel", "c").await,
        Err(StoreError::NotFound)
    );

    let page = s.list_channels(PageRequest::first(10)).await.unwrap();
    assert_eq!(
        ids(&page.items, |c| &c.id),
        vec![ch.id.clone(), public.id.clone()]
    );
    assert_eq!(page.total_count, 2);
    assert_eq!(page.items[0].1, joined);
}

async fn messages_need_their_channel(s: Arc<dyn Store>) {
    assert_eq!(
        s.create_message("no-such-channel", "u", "hi".into()).await,
        Err(StoreError::NotFound)
    );
    let ch = s
        .create_channel("owner", "c".into(), false, Vec::new())
        .await
        .unwrap();
    let first = s
        .create_message(&ch.id, "owner", "hello".into())
        .await
        .unwrap();
    let second = s
        .create_message(&ch.id, "b", "héllo ✓ \"quoted\"\n".into())
        .await
        .unwrap();
    assert_eq!(
        (first.channel_id.as_str(), first.author_id.as_str()),
        (ch.id.as_str(), "owner")
    );

    // Newest first, read back exactly.
    let page = s
        .list_messages(&ch.id, PageRequest::first(10))
        .await
        .unwrap();
    let messages: Vec<Message> = page.items.into_iter().map(|(_, m)| m).collect();
    assert_eq!(messages, vec![second, first]);
    assert_eq!(page.total_count, 2);
    let none = s
        .list_messages("no-such-channel", PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!((none.items.len(), none.total_count), (0, 0));
}

async fn notifications_and_reading_them(s: Arc<dyn Store>) {
    let payload = serde_json::json!({"postId": "p1", "n": [1, 2.5, -3], "nested": {"ok": true, "none": null}, "s": "é/✓"});
    let first = s
        .create_notification(
            "u1",
            "comment.created".into(),
            "New comment".into(),
            payload.clone(),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            first.user_id.as_str(),
            first.kind.as_str(),
            first.message.as_str()
        ),
        ("u1", "comment.created", "New comment")
    );
    assert!(!first.read);
    let second = s
        .create_notification(
            "u1",
            "mention".into(),
            "You were mentioned".into(),
            serde_json::json!([]),
        )
        .await
        .unwrap();
    let theirs = s
        .create_notification(
            "u2",
            "mention".into(),
            "Not yours".into(),
            serde_json::Value::Null,
        )
        .await
        .unwrap();

    // Newest first, per user, read back exactly (payload included).
    let page = s
        .list_notifications("u1", PageRequest::first(10))
        .await
        .unwrap();
    let mine: Vec<Notification> = page.items.into_iter().map(|(_, n)| n).collect();
    assert_eq!(mine, vec![second.clone(), first.clone()]);
    assert_eq!(mine[1].payload, payload);
    assert_eq!(page.total_count, 2);

    // Only the owner can mark it; to anyone else it does not exist.
    assert_eq!(
        s.mark_notification_read("u1", &theirs.id).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        s.mark_notification_read("u2", &first.id).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        s.mark_notification_read("u1", "no-such-notification").await,
        Err(StoreError::NotFound)
    );
    let page = s
        .list_notifications("u2", PageRequest::first(10))
        .await
        .unwrap();
    assert!(!page.items[0].1.read, "a refused mark changes nothing");

    let read = s.mark_notification_read("u1", &first.id).await.unwrap();
    assert_eq!(
        read,
        Notification {
            read: true,
            ..first.clone()
        }
    );
    // Marking again is harmless.
    assert_eq!(
        s.mark_notification_read("u1", &first.id).await.unwrap(),
        read
    );
    let page = s
        .list_notifications("u1", PageRequest::first(10))
        .await
        .unwrap();
    let states: Vec<bool> = page.items.iter().map(|(_, n)| n.read).collect();
    assert_eq!(states, vec![false, true]);
}

/// Pages through a list `first` at a time and checks every page's flags
/// against a list that does not change meanwhile; answers the positions and
/// ids in walk order.
async fn walk<T, F, Fut>(
    first: usize,
    expected_total: usize,
    id: fn(&T) -> String,
    mut fetch: F,
) -> Vec<(u64, String)>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: Future<Output = StoreResult<Page<T>>>,
{
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = fetch(PageRequest { first, after }).await.unwrap();
        assert_eq!(page.total_count, expected_total, "total_count");
        assert_eq!(
            page.has_previous_page,
            after.is_some() && !seen.is_empty(),
            "has_previous_page"
        );
        assert!(
            page.items.len() <= first,
            "a page holds at most `first` items"
        );
        let before = seen.len();
        seen.extend(page.items.iter().map(|(seq, v)| (*seq, id(v))));
        assert_eq!(
            page.has_next_page,
            seen.len() < expected_total,
            "has_next_page after {} items",
            seen.len()
        );
        if !page.has_next_page {
            break;
        }
        assert_eq!(page.items.len(), first, "only the last page is short");
        assert!(seen.len() > before, "a walk always advances");
        after = page.items.last().map(|(seq, _)| *seq);
    }
    seen
}

/// Walks one list with several page sizes and compares it with `expected`
/// (ids, in list order); positions must run in list order too.
async fn check_list<T, F, Fut>(
    what: &str,
    expected: &[String],
    newest_first: bool,
    id: fn(&T) -> String,
    fetch: F,
) where
    F: Fn(PageRequest) -> Fut,
    Fut: Future<Output = StoreResult<Page<T>>>,
{
    for first in [1, 2, 3, 5, expected.len(), expected.len() + 10] {
        if first == 0 {
            continue;
        }
        let seen = walk(first, expected.len(), id, &fetch).await;
        let seen_ids: Vec<String> = seen.iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(seen_ids, expected, "{what} in pages of {first}");
        let mut seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
        if newest_first {
            seqs.reverse();
        }
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{what}: positions follow the list order"
        );
    }
}

async fn every_list_pages_without_gaps_or_repeats(s: Arc<dyn Store>) {
    // Items of every list interleaved, so each list's positions have gaps.
    let post = s
        .create_post("anchor", "commented".into(), String::new())
        .await
        .unwrap();
    let channel = s
        .create_channel("owner", "chatty".into(), false, Vec::new())
        .await
        .unwrap();
    let (mut users, mut posts, mut by_author, mut comments, mut channels, mut messages, mut notes) = (
        vec![],
        vec![post.id.clone()],
        vec![],
        vec![],
        vec![channel.id.clone()],
        vec![],
        vec![],
    );
    for i in 0..11 {
        users.push(
            s.create_user(new_user(&format!("walker{i}@example.com")))
                .await
                .unwrap()
                .id,
        );
        let author = if i % 3 == 0 { "prolific" } else { "other" };
        let p = s
            .create_post(author, format!("post {i}"), String::new())
            .await
            .unwrap();
        if author == "prolific" {
            by_author.push(p.id.clone());
        }
        posts.push(p.id);
        comments.push(
            s.create_comment(&post.id, "u", format!("comment {i}"))
                .await
                .unwrap()
                .id,
        );
        channels.push(
            s.create_channel("owner", format!("channel {i}"), i % 2 == 0, Vec::new())
                .await
                .unwrap()
                .id,
        );
        messages.push(
            s.create_message(&channel.id, "u", format!("message {i}"))
                .await
                .unwrap()
                .id,
        );
        notes.push(
            s.create_notification(
                "reader",
                "k".into(),
                format!("n {i}"),
                serde_json::json!({"i": i}),
            )
            .await
            .unwrap()
            .id,
        );
        // Another user's notifications interleave without showing up.
        s.create_notification(
            "someone-else",
            "k".into(),
            "x".into(),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
    }
    // Deleted items leave no holes in the pages.
    for gone in [users.remove(4), users.remove(7)] {
        s.delete_user(&gone).await.unwrap();
    }
    let gone = posts.remove(3);
    by_author.retain(|id| *id != gone);
    s.delete_post(&gone).await.unwrap();
    for list in [&mut posts, &mut by_author, &mut messages, &mut notes] {
        list.reverse();
    }

    check_list(
        "users",
        &users,
        false,
        |u: &User| u.id.clone(),
        |r| s.list_users(r),
    )
    .await;
    check_list(
        "posts",
        &posts,
        true,
        |p: &Post| p.id.clone(),
        |r| s.list_posts(None, r),
    )
    .await;
    check_list(
        "posts by author",
        &by_author,
        true,
        |p: &Post| p.id.clone(),
        |r| s.list_posts(Some("prolific"), r),
    )
    .await;
    check_list(
        "comments",
        &comments,
        false,
        |c: &Comment| c.id.clone(),
        |r| s.list_comments(&post.id, r),
    )
    .await;
    check_list(
        "channels",
        &channels,
        false,
        |c: &Channel| c.id.clone(),
        |r| s.list_channels(r),
    )
    .await;
    check_list(
        "messages",
        &messages,
        true,
        |m: &Message| m.id.clone(),
        |r| s.list_messages(&channel.id, r),
    )
    .await;
    check_list(
        "notifications",
        &notes,
        true,
        |n: &Notification| n.id.clone(),
        |r| s.list_notifications("reader", r),
    )
    .await;
}

async fn pages_walk_on_while_items_arrive(s: Arc<dyn Store>) {
    // Newest first: an arrival lands before the cursor and is not seen.
    for i in 0..25 {
        s.create_post("u", format!("t{i}"), String::new())
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .list_posts(None, PageRequest { first: 10, after })
            .await
            .unwrap();
        assert_eq!(page.total_count, 25 + seen.len() / 10);
        seen.extend(page.items.iter().map(|(_, p)| p.title.clone()));
        s.create_post("u", "late".into(), String::new())
            .await
            .unwrap();
        if !page.has_next_page {
            break;
        }
        after = page.items.last().map(|(seq, _)| *seq);
    }
    let expected: Vec<String> = (0..25).rev().map(|i| format!("t{i}")).collect();
    assert_eq!(seen, expected);

    // Oldest first: an arrival lands after the cursor and is seen once.
    let post = s
        .create_post("u", "thread".into(), String::new())
        .await
        .unwrap();
    for i in 0..7 {
        s.create_comment(&post.id, "u", format!("c{i}"))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    let mut arrivals = 0;
    loop {
        let page = s
            .list_comments(&post.id, PageRequest { first: 3, after })
            .await
            .unwrap();
        seen.extend(page.items.iter().map(|(_, c)| c.content.clone()));
        if arrivals < 2 {
            s.create_comment(&post.id, "u", format!("late{arrivals}"))
                .await
                .unwrap();
            arrivals += 1;
        }
        if !page.has_next_page {
            break;
        }
        after = page.items.last().map(|(seq, _)| *seq);
    }
    let expected: Vec<String> = (0..7)
        .map(|i| format!("c{i}"))
        .chain(["late0".into(), "late1".into()])
        .collect();
    assert_eq!(seen, expected);
}

async fn pages_walk_on_past_a_deleted_cursor(s: Arc<dyn Store>) {
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(
            s.create_user(new_user(&format!("c{i}@example.com")))
                .await
                .unwrap()
                .id,
        );
    }
    let page = s.list_users(PageRequest::first(2)).await.unwrap();
    let (cursor, last) = page
        .items
        .last()
        .map(|(seq, u)| (*seq, u.id.clone()))
        .unwrap();
    s.delete_user(&last).await.unwrap();
    let next = s
        .list_users(PageRequest {
            first: 2,
            after: Some(cursor),
        })
        .await
        .unwrap();
    assert_eq!(ids(&next.items, |u| &u.id), users[2..4].to_vec());
    assert!(
        next.has_previous_page,
        "the first user still lies before the cursor"
    );
    assert_eq!(next.total_count, 5);

    let mut posts = Vec::new();
    for i in 0..6 {
        posts.push(
            s.create_post("u", format!("p{i}"), String::new())
                .await
                .unwrap()
                .id,
        );
    }
    let page = s.list_posts(None, PageRequest::first(2)).await.unwrap();
    let (cursor, last) = page
        .items
        .last()
        .map(|(seq, p)| (*seq, p.id.clone()))
        .unwrap();
    s.delete_post(&last).await.unwrap();
    let next = s
        .list_posts(
            None,
            PageRequest {
                first: 2,
                after: Some(cursor),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        ids(&next.items, |p| &p.id),
        vec![posts[3].clone(), posts[2].clone()]
    );
    assert!(next.has_previous_page);
}

async fn page_flags_at_the_edges(s: Arc<dyn Store>) {
    // An empty or unknown list.
    for page in [
        s.list_users(PageRequest::first(5)).await.unwrap(),
        s.list_users(PageRequest {
            first: 5,
            after: Some(3),
        })
        .await
        .unwrap(),
    ] {
        assert_eq!(
            (
                page.items.len(),
                page.total_count,
                page.has_next_page,
                page.has_previous_page
            ),
            (0, 0, false, false)
        );
    }
    let unknown = s
        .list_comments(
            "nothing",
            PageRequest {
                first: 5,
                after: Some(1),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            unknown.items.len(),
            unknown.total_count,
            unknown.has_next_page,
            unknown.has_previous_page
        ),
        (0, 0, false, false)
    );

    let mut users = Vec::new();
    let mut posts = Vec::new();
    for i in 0..3 {
        users.push(
            s.create_user(new_user(&format!("e{i}@example.com")))
                .await
                .unwrap(),
        );
        posts.push(
            s.create_post("u", format!("p{i}"), String::new())
                .await
                .unwrap(),
        );
    }
    let user_page = s.list_users(PageRequest::first(3)).await.unwrap();
    let user_seqs: Vec<u64> = user_page.items.iter().map(|(seq, _)| *seq).collect();
    let post_page = s.list_posts(None, PageRequest::first(3)).await.unwrap();
    let post_seqs: Vec<u64> = post_page.items.iter().map(|(seq, _)| *seq).collect();

    // A page of nothing still tells whether there is more.
    let zero = s.list_users(PageRequest::first(0)).await.unwrap();
    assert_eq!(
        (
            zero.items.len(),
            zero.total_count,
            zero.has_next_page,
            zero.has_previous_page
        ),
        (0, 3, true, false)
    );
    let zero = s
        .list_posts(
            None,
            PageRequest {
                first: 0,
                after: Some(post_seqs[0]),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (zero.items.len(), zero.has_next_page, zero.has_previous_page),
        (0, true, true)
    );

    // Exactly `first` left: no next page.
    let exact = s.list_users(PageRequest::first(3)).await.unwrap();
    assert_eq!((exact.items.len(), exact.has_next_page), (3, false));
    let exact = s
        .list_users(PageRequest {
            first: 2,
            after: Some(user_seqs[0]),
        })
        .await
        .unwrap();
    assert_eq!(
        (
            exact.items.len(),
            exact.has_next_page,
            exact.has_previous_page
        ),
        (2, false, true)
    );

    // After the end: empty, with everything behind.
    let end = s
        .list_users(PageRequest {
            first: 5,
            after: Some(user_seqs[2]),
        })
        .await
        .unwrap();
    assert_eq!(
        (
            end.items.len(),
            end.total_count,
            end.has_next_page,
            end.has_previous_page
        ),
        (0, 3, false, true)
    );
    let end = s
        .list_posts(
            None,
            PageRequest {
                first: 5,
                after: Some(post_seqs[2]),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            end.items.len(),
            end.total_count,
            end.has_next_page,
            end.has_previous_page
        ),
        (0, 3, false, true)
    );

    // A cursor before the start of an oldest-first list has nothing behind
    // it; one beyond the newest item of a newest-first list neither.
    let from_zero = s
        .list_users(PageRequest {
            first: 5,
            after: Some(0),
        })
        .await
        .unwrap();
    assert_eq!(
        (from_zero.items.len(), from_zero.has_previous_page),
        (3, false)
    );
    let from_future = s
        .list_posts(
            None,
            PageRequest {
                first: 5,
                after: Some(u64::from(u32::MAX)),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (from_future.items.len(), from_future.has_previous_page),
        (3, false)
    );
}

async fn batches_keep_order_and_mark_missing_ids(s: Arc<dyn Store>) {
    let a = s.create_user(new_user("a@example.com")).await.unwrap();
    let b = s.create_user(new_user("b@example.com")).await.unwrap();
    let asked = [b.id.clone(), "missing".into(), a.id.clone(), b.id.clone()];
    assert_eq!(
        s.get_users(&asked).await.unwrap(),
        vec![Some(b.clone()), None, Some(a.clone()), Some(b.clone())]
    );
    assert_eq!(s.get_users(&[]).await.unwrap(), vec![]);

    let p = s.create_post("u", "p".into(), String::new()).await.unwrap();
    let q = s.create_post("u", "q".into(), String::new()).await.unwrap();
    let asked = ["missing".into(), q.id.clone(), p.id.clone()];
    assert_eq!(
        s.get_posts(&asked).await.unwrap(),
        vec![None, Some(q.clone()), Some(p.clone())]
    );
    assert_eq!(s.get_posts(&[]).await.unwrap(), vec![]);
    // An id of another kind is missing, not a post.
    assert_eq!(
        s.get_posts(slice::from_ref(&a.id)).await.unwrap(),
        vec![None]
    );

    let c = s
        .create_channel("o", "c".into(), false, Vec::new())
        .await
        .unwrap();
    let asked = [c.id.clone(), "missing".into(), c.id.clone()];
    assert_eq!(
        s.get_channels(&asked).await.unwrap(),
        vec![Some(c.clone()), None, Some(c.clone())]
    );
    assert_eq!(s.get_channels(&[]).await.unwrap(), vec![]);
}

async fn concurrent_creates_get_distinct_positions(s: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.create_post("u", format!("p{i}"), String::new())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut created = HashSet::new();
    for task in tasks {
        created.insert(task.await.unwrap().id);
    }
    let page = s.list_posts(None, PageRequest::first(100)).await.unwrap();
    assert_eq!(page.total_count, 40);
    let seqs: HashSet<u64> = page.items.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs.len(), 40, "every post has a position of its own");
    let listed: HashSet<String> = page.items.into_iter().map(|(_, p)| p.id).collect();
    assert_eq!(listed, created);
}

async fn topic_readers_are_kept_per_topic_until_replaced(s: Arc<dyn Store>) {
    assert_eq!(s.topic_readers("orders").await.unwrap(), None);
    s.set_topic_readers("orders", &TopicReaders::Public)
        .await
        .unwrap();
    assert_eq!(
        s.topic_readers("orders").await.unwrap(),
        Some(TopicReaders::Public)
    );
    // Another topic, even one whose name extends this one, is untouched.
    assert_eq!(s.topic_readers("orders:eu").await.unwrap(), None);

    // Replaced, not merged; the list keeps its order and odd ids intact.
    let users = TopicReaders::Users(vec![
        "u2".into(),
        "u1".into(),
        "quo\"te".into(),
        "ünï".into(),
    ]);
    s.set_topic_readers("orders", &users).await.unwrap();
    assert_eq!(s.topic_readers("orders").await.unwrap(), Some(users));
    s.set_topic_readers("orders:eu", &TopicReaders::Authenticated)
        .await
        .unwrap();
    assert_eq!(
        s.topic_readers("orders:eu").await.unwrap(),
        Some(TopicReaders::Authenticated)
    );
    s.set_topic_readers("orders", &TopicReaders::Users(Vec::new()))
        .await
        .unwrap();
    assert_eq!(
        s.topic_readers("orders").await.unwrap(),
        Some(TopicReaders::Users(Vec::new()))
    );
}
