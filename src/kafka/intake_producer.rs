//! The webhook intake's own idempotent producer (never a transactional one,
//! whose transaction could still abort after the processor was answered 200):
//! one request record, acknowledged within a timeout or not stored. A fatal
//! error rebuilds the producer, at most [`MAX_REBUILDS`] times in
//! [`REBUILD_WINDOW`]; past that the intake is no longer alive (its liveness
//! fails, so the orchestrator restarts it).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::clock::Instant;
use crate::codec::request::EncodedRecord;
use crate::intake::{Store, StoreError, StoreHealth};

/// Rebuilds allowed within [`REBUILD_WINDOW`].
pub const MAX_REBUILDS: usize = 5;
/// The window over which rebuilds are counted.
pub const REBUILD_WINDOW: Duration = Duration::from_secs(600);

struct Current {
    generation: u64,
    producer: Arc<FutureProducer>,
}

/// The intake's producer, rebuilt after a fatal error.
pub struct IntakeProducer {
    config: ClientConfig,
    current: RwLock<Current>,
    rebuilds: Mutex<VecDeque<Instant>>,
    dead: Mutex<Option<String>>,
    on_rebuild: Box<dyn Fn() + Send + Sync>,
}

impl IntakeProducer {
    /// A producer of `config`; `on_rebuild` counts rebuilds.
    pub fn new(
        config: ClientConfig,
        on_rebuild: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Self, KafkaError> {
        let producer = Arc::new(config.create()?);
        Ok(IntakeProducer {
            config,
            current: RwLock::new(Current {
                generation: 0,
                producer,
            }),
            rebuilds: Mutex::new(VecDeque::new()),
            dead: Mutex::new(None),
            on_rebuild,
        })
    }

    /// The producer in use (tests inject faults through it).
    #[doc(hidden)]
    pub fn client(&self) -> Arc<FutureProducer> {
        read(&self.current).producer.clone()
    }

    fn take(&self) -> (u64, Arc<FutureProducer>) {
        let c = read(&self.current);
        (c.generation, c.producer.clone())
    }

    /// The producer of `generation` hit a fatal error: rebuild it, unless
    /// another caller already did, or the budget of rebuilds is spent.
    fn fatal(&self, generation: u64, reason: &str) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.generation != generation {
            return;
        }
        let now = Instant::now();
        let mut rebuilds = lock(&self.rebuilds);
        while rebuilds
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= REBUILD_WINDOW)
        {
            rebuilds.pop_front();
        }
        if rebuilds.len() >= MAX_REBUILDS {
            let why = format!(
                "the webhook intake's producer failed fatally {} times within {} s (last: {reason}); restart the process",
                MAX_REBUILDS + 1,
                REBUILD_WINDOW.as_secs()
            );
            tracing::error!("{why}");
            *lock(&self.dead) = Some(why);
            return;
        }
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                rebuilds.push_back(now);
                let old = std::mem::replace(&mut current.producer, Arc::new(fresh));
                current.generation += 1;
                (self.on_rebuild)();
                tracing::warn!(
                    reason,
                    rebuilds_in_window = rebuilds.len(),
                    "the webhook intake's producer hit a fatal error; rebuilt it"
                );
                // Closing a producer can wait on the network: not on this thread.
                std::thread::spawn(move || drop(old));
            }
            Err(e) => {
                let why = format!(
                    "the webhook intake's producer failed fatally ({reason}) and cannot be rebuilt: {e}"
                );
                tracing::error!("{why}");
                *lock(&self.dead) = Some(why);
            }
        }
    }

    async fn send(
        &self,
        topic: &str,
        record: &EncodedRecord,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        if let Some(why) = lock(&self.dead).clone() {
            return Err(StoreError::NotStored(why));
        }
        let (generation, producer) = self.take();
        let headers = record
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value.as_slice()),
                })
            });
        let out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .key(record.key.as_slice())
            .payload(record.value.as_slice())
            .headers(headers);
        let delivery = match producer.send_result(out) {
            Ok(d) => d,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(StoreError::Busy)
            }
            Err((e, _)) => return Err(self.failed(generation, &producer, &e)),
        };
        match tokio::time::timeout(timeout, delivery).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((e, _)))) => Err(self.failed(generation, &producer, &e)),
            Ok(Err(_)) => Err(StoreError::NotStored("the producer went away".into())),
            Err(_) => Err(StoreError::TimedOut),
        }
    }

    fn failed(&self, generation: u64, producer: &FutureProducer, e: &KafkaError) -> StoreError {
        let text = e.to_string();
        if producer.client().fatal_error().is_some()
            || matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::Fatal))
        {
            self.fatal(generation, &text);
        }
        StoreError::NotStored(text)
    }
}

impl Store for IntakeProducer {
    fn store<'a>(
        &'a self,
        topic: &'a str,
        record: &'a EncodedRecord,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.send(topic, record, timeout))
    }

    fn health(&self) -> StoreHealth {
        if let Some(why) = lock(&self.dead).clone() {
            return StoreHealth {
                alive: Err(why.clone()),
                ready: Err(why),
            };
        }
        // A fatal error found while no webhook arrives is rebuilt from here.
        let (generation, producer) = self.take();
        if let Some((_, reason)) = producer.client().fatal_error() {
            self.fatal(generation, &reason);
            if let Some(why) = lock(&self.dead).clone() {
                return StoreHealth {
                    alive: Err(why.clone()),
                    ready: Err(why),
                };
            }
        }
        StoreHealth {
            alive: Ok(()),
            ready: Ok(()),
        }
    }

    fn flush(&self, timeout: Duration) {
        let _ = self.client().flush(timeout);
    }
}

fn read(l: &RwLock<Current>) -> std::sync::RwLockReadGuard<'_, Current> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
