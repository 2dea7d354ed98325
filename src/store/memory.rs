//! The in-memory store: one node, no Redis. One `std::sync::Mutex` over
//! plain maps; no critical section awaits.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::Utc;

use super::*;

/// Positions of one list, in insertion order.
#[derive(Default)]
struct Index {
    by_seq: BTreeMap<u64, String>,
}

#[derive(Clone, Copy)]
enum Direction {
    OldestFirst,
    NewestFirst,
}

impl Index {
    fn insert(&mut self, seq: u64, id: String) {
        self.by_seq.insert(seq, id);
    }

    fn remove(&mut self, seq: u64) {
        self.by_seq.remove(&seq);
    }

    fn page(&self, req: PageRequest, dir: Direction) -> (Vec<(u64, String)>, usize, bool, bool) {
        let take = req.first;
        let (mut items, has_prev): (Vec<(u64, String)>, bool) = match (dir, req.after) {
            (Direction::OldestFirst, None) => (
                self.by_seq
                    .iter()
                    .take(take + 1)
                    .map(|(s, i)| (*s, i.clone()))
                    .collect(),
                false,
            ),
            (Direction::OldestFirst, Some(after)) => (
                self.by_seq
                    .range((Bound::Excluded(after), Bound::Unbounded))
                    .take(take + 1)
                    .map(|(s, i)| (*s, i.clone()))
                    .collect(),
                self.by_seq.range(..=after).next().is_some(),
            ),
            (Direction::NewestFirst, None) => (
                self.by_seq
                    .iter()
                    .rev()
                    .take(take + 1)
                    .map(|(s, i)| (*s, i.clone()))
                    .collect(),
                false,
            ),
            (Direction::NewestFirst, Some(after)) => (
                self.by_seq
                    .range(..after)
                    .rev()
                    .take(take + 1)
                    .map(|(s, i)| (*s, i.clone()))
                    .collect(),
                self.by_seq.range(after..).next().is_some(),
            ),
        };
        let has_next = items.len() > take;
        items.truncate(take);
        (items, self.by_seq.len(), has_next, has_prev)
    }
}

struct Row<T> {
    seq: u64,
    value: T,
}

#[derive(Default)]
struct Data {
    seq: u64,
    users: HashMap<String, Row<User>>,
    emails: HashMap<String, String>,
    user_index: Index,
    posts: HashMap<String, Row<Post>>,
    post_index: Index,
    posts_by_author: HashMap<String, Index>,
    comments: HashMap<String, Row<Comment>>,
    comments_by_post: HashMap<String, Index>,
    channels: HashMap<String, Row<Channel>>,
    channel_index: Index,
    messages: HashMap<String, Row<Message>>,
    messages_by_channel: HashMap<String, Index>,
    notifications: HashMap<String, Row<Notification>>,
    notifications_by_user: HashMap<String, Index>,
    topic_readers: HashMap<String, TopicReaders>,
}

impl Data {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

#[derive(Default)]
pub struct MemoryStore {
    data: Mutex<Data>,
    calls: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many store calls were made (proves batching in tests).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Data> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn page_of<T: Clone>(
    index: Option<&Index>,
    rows: &HashMap<String, Row<T>>,
    req: PageRequest,
    dir: Direction,
) -> Page<T> {
    let Some(index) = index else {
        return Page::empty();
    };
    let (ids, total_count, has_next_page, has_previous_page) = index.page(req, dir);
    Page {
        items: ids
            .into_iter()
            .filter_map(|(seq, id)| rows.get(&id).map(|row| (seq, row.value.clone())))
            .collect(),
        total_count,
        has_next_page,
        has_previous_page,
    }
}

fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert_user(&self, user: User) -> StoreResult<User> {
        let mut d = self.lock();
        let key = email_key(&user.email);
        if d.emails.contains_key(&key) {
            return Err(StoreError::Conflict { field: "email" });
        }
        let seq = d.next_seq();
        d.emails.insert(key, user.id.clone());
        d.user_index.insert(seq, user.id.clone());
        d.users.insert(
            user.id.clone(),
            Row {
                seq,
                value: user.clone(),
            },
        );
        Ok(user)
    }

    async fn get_users(&self, ids: &[String]) -> StoreResult<Vec<Option<User>>> {
        let d = self.lock();
        Ok(ids
            .iter()
            .map(|id| d.users.get(id).map(|r| r.value.clone()))
            .collect())
    }

    async fn find_user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
        let d = self.lock();
        Ok(d.emails
            .get(&email_key(email))
            .and_then(|id| d.users.get(id))
            .map(|r| r.value.clone()))
    }

    async fn update_user(&self, id: &str, patch: UserPatch) -> StoreResult<User> {
        let mut d = self.lock();
        let current = d.users.get(id).ok_or(StoreError::NotFound)?.value.clone();
        if let Some(email) = &patch.email {
            let key = email_key(email);
            if d.emails.get(&key).is_some_and(|owner| owner != id) {
                return Err(StoreError::Conflict { field: "email" });
            }
            d.emails.remove(&email_key(&current.email));
            d.emails.insert(key, id.to_owned());
        }
        let row = d.users.get_mut(id).ok_or(StoreError::NotFound)?;
        if let Some(email) = patch.email {
            row.value.email = email;
        }
        if let Some(name) = patch.name {
            row.value.name = name;
        }
        if let Some(hash) = patch.password_hash {
            row.value.password_hash = hash;
        }
        row.value.updated_at = Utc::now();
        Ok(row.value.clone())
    }

    async fn delete_user(&self, id: &str) -> StoreResult<User> {
        let mut d = self.lock();
        let row = d.users.remove(id).ok_or(StoreError::NotFound)?;
        d.emails.remove(&email_key(&row.value.email));
        d.user_index.remove(row.seq);
        Ok(row.value)
    }

    async fn list_users(&self, page: PageRequest) -> StoreResult<Page<User>> {
        let d = self.lock();
        Ok(page_of(
            Some(&d.user_index),
            &d.users,
            page,
            Direction::OldestFirst,
        ))
    }

    async fn insert_post(&self, post: Post) -> StoreResult<Post> {
        let mut d = self.lock();
        let author_id = post.author_id.as_str();
        let seq = d.next_seq();
        d.post_index.insert(seq, post.id.clone());
        d.posts_by_author
            .entry(author_id.to_owned())
            .or_default()
            .insert(seq, post.id.clone());
        d.posts.insert(
            post.id.clone(),
            Row {
                seq,
                value: post.clone(),
            },
        );
        Ok(post)
    }

    async fn get_posts(&self, ids: &[String]) -> StoreResult<Vec<Option<Post>>> {
        let d = self.lock();
        Ok(ids
            .iter()
            .map(|id| d.posts.get(id).map(|r| r.value.clone()))
            .collect())
    }

    async fn update_post(&self, id: &str, patch: PostPatch) -> StoreResult<Post> {
        let mut d = self.lock();
        let row = d.posts.get_mut(id).ok_or(StoreError::NotFound)?;
        if let Some(title) = patch.title {
            row.value.title = title;
        }
        if let Some(content) = patch.content {
            row.value.content = content;
        }
        row.value.updated_at = Utc::now();
        Ok(row.value.clone())
    }

    async fn delete_post(&self, id: &str) -> StoreResult<Post> {
        let mut d = self.lock();
        let row = d.posts.remove(id).ok_or(StoreError::NotFound)?;
        d.post_index.remove(row.seq);
        if let Some(index) = d.posts_by_author.get_mut(&row.value.author_id) {
            index.remove(row.seq);
        }
        Ok(row.value)
    }

    async fn list_posts(
        &self,
        author_id: Option<&str>,
        page: PageRequest,
    ) -> StoreResult<Page<Post>> {
        let d = self.lock();
        let index = match author_id {
            Some(author) => d.posts_by_author.get(author),
            None => Some(&d.post_index),
        };
        Ok(page_of(index, &d.posts, page, Direction::NewestFirst))
    }

    async fn insert_comment(&self, comment: Comment) -> StoreResult<Comment> {
        let mut d = self.lock();
        let post_id = comment.post_id.as_str();
        if !d.posts.contains_key(post_id) {
            return Err(StoreError::NotFound);
        }
        let seq = d.next_seq();
        d.comments_by_post
            .entry(post_id.to_owned())
            .or_default()
            .insert(seq, comment.id.clone());
        d.comments.insert(
            comment.id.clone(),
            Row {
                seq,
                value: comment.clone(),
            },
        );
        Ok(comment)
    }

    async fn list_comments(&self, post_id: &str, page: PageRequest) -> StoreResult<Page<Comment>> {
        let d = self.lock();
        Ok(page_of(
            d.comments_by_post.get(post_id),
            &d.comments,
            page,
            Direction::OldestFirst,
        ))
    }

    async fn insert_channel(&self, channel: Channel) -> StoreResult<Channel> {
        let mut d = self.lock();
        let seq = d.next_seq();
        d.channel_index.insert(seq, channel.id.clone());
        d.channels.insert(
            channel.id.clone(),
            Row {
                seq,
                value: channel.clone(),
            },
        );
        Ok(channel)
    }

    async fn get_channels(&self, ids: &[String]) -> StoreResult<Vec<Option<Channel>>> {
        let d = self.lock();
        Ok(ids
            .iter()
            .map(|id| d.channels.get(id).map(|r| r.value.clone()))
            .collect())
    }

    async fn add_channel_member(&self, channel_id: &str, user_id: &str) -> StoreResult<Channel> {
        let mut d = self.lock();
        let row = d.channels.get_mut(channel_id).ok_or(StoreError::NotFound)?;
        if !row.value.member_ids.iter().any(|m| m == user_id) {
            row.value.member_ids.push(user_id.to_owned());
        }
        Ok(row.value.clone())
    }

    async fn list_channels(&self, page: PageRequest) -> StoreResult<Page<Channel>> {
        let d = self.lock();
        Ok(page_of(
            Some(&d.channel_index),
            &d.channels,
            page,
            Direction::OldestFirst,
        ))
    }

    async fn insert_message(&self, message: Message) -> StoreResult<Message> {
        let mut d = self.lock();
        let channel_id = message.channel_id.as_str();
        if !d.channels.contains_key(channel_id) {
            return Err(StoreError::NotFound);
        }
        let seq = d.next_seq();
        d.messages_by_channel
            .entry(channel_id.to_owned())
            .or_default()
            .insert(seq, message.id.clone());
        d.messages.insert(
            message.id.clone(),
            Row {
                seq,
                value: message.clone(),
            },
        );
        Ok(message)
    }

    async fn list_messages(
        &self,
        channel_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Message>> {
        let d = self.lock();
        Ok(page_of(
            d.messages_by_channel.get(channel_id),
            &d.messages,
            page,
            Direction::NewestFirst,
        ))
    }

    async fn insert_notification(&self, notification: Notification) -> StoreResult<Notification> {
        let mut d = self.lock();
        let user_id = notification.user_id.as_str();
        let seq = d.next_seq();
        d.notifications_by_user
            .entry(user_id.to_owned())
            .or_default()
            .insert(seq, notification.id.clone());
        d.notifications.insert(
            notification.id.clone(),
            Row {
                seq,
                value: notification.clone(),
            },
        );
        Ok(notification)
    }

    async fn list_notifications(
        &self,
        user_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Notification>> {
        let d = self.lock();
        Ok(page_of(
            d.notifications_by_user.get(user_id),
            &d.notifications,
            page,
            Direction::NewestFirst,
        ))
    }

    async fn mark_notification_read(&self, user_id: &str, id: &str) -> StoreResult<Notification> {
        let mut d = self.lock();
        let row = d.notifications.get_mut(id).ok_or(StoreError::NotFound)?;
        if row.value.user_id != user_id {
            return Err(StoreError::NotFound);
        }
        row.value.read = true;
        Ok(row.value.clone())
    }

    async fn set_topic_readers(&self, topic: &str, readers: &TopicReaders) -> StoreResult<()> {
        self.lock()
            .topic_readers
            .insert(topic.to_owned(), readers.clone());
        Ok(())
    }

    async fn topic_readers(&self, topic: &str) -> StoreResult<Option<TopicReaders>> {
        Ok(self.lock().topic_readers.get(topic).cloned())
    }
}
