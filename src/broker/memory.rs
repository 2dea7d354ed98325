//! The in-memory broker: one node, no Redis. Publishing hands the event
//! straight to this node's sink.

use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;

use super::{Broker, BrokerError, EventSink};
use crate::event::{now_ms, topic, EventId, NewEvent, SharedEvent};

#[derive(Default)]
pub struct MemoryBroker {
    sink: OnceLock<Arc<dyn EventSink>>,
    /// The last id handed out: ids are ordered node-wide, hence per topic.
    last_id: Mutex<Option<EventId>>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn start(&self, sink: Arc<dyn EventSink>) {
        let _ = self.sink.set(sink);
    }

    async fn publish(&self, event: NewEvent) -> Result<Arc<SharedEvent>, BrokerError> {
        if !topic::is_valid(&event.topic) {
            return Err(BrokerError::InvalidTopic(event.topic));
        }
        // The id is taken and the event dispatched under one lock so that
        // subscribers see events in id order.
        let mut last = self.last_id.lock().unwrap_or_else(|p| p.into_inner());
        let id = EventId::next(*last, now_ms());
        *last = Some(id);
        let shared = SharedEvent::new(event.stamp(id));
        if let Some(sink) = self.sink.get() {
            sink.dispatch(shared.clone());
        }
        Ok(shared)
    }

    async fn subscribe(&self, _topic: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    fn release(&self, _topic: &str) {}

    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}
