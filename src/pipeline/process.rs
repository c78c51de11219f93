//! What one consumed message becomes. [`Processor::prepare`] decodes and routes it
//! (pure): a status check for a known connector and account, or a rejection.
//! [`Processor::process`] performs the check (with retries) and builds the records
//! to publish, in order: an Avro event keyed by transaction id and, in follow mode,
//! the re-check record of the chain's next check; or a dead letter that keeps the
//! original key, value and headers and adds the `paysync-*` headers.

use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;

use crate::clock::now_ms;
use crate::codec::{
    decode_request, DecodeOptions, EventEncoder, RawHeader, RejectCode, Rejection, SourcePosition,
};
use crate::connectors::gateway::Gateway;
use crate::connectors::limit::Priority;
use crate::connectors::retry::CheckResult;
use crate::connectors::HttpRequest;
use crate::domain::event::{check_event_id, check_integrity, Envelope, FailureCode, SecretFields};
use crate::domain::{PaymentStatus, PaymentStatusEvent, StatusCheckRequest};
use crate::pipeline::follow::{self, Chain, ChainEnd, FollowSettings};
use crate::pipeline::ledger::Epoch;
use crate::pipeline::record::{
    Destination, Handler, Incoming, Milestone, Outgoing, PipelineJob, RecordHeader, Work,
};
use crate::telemetry::{Metrics, Outcome};

/// Follow mode for every connector that has it, and the re-check topics.
#[derive(Debug, Clone, Default)]
pub struct FollowPlan {
    /// Follow settings by connector name (connectors without are absent).
    pub by_connector: HashMap<String, Arc<FollowSettings>>,
    /// The re-check topic of each delay.
    pub topics: std::collections::BTreeMap<std::time::Duration, Arc<str>>,
}

/// Content type of events.
pub const EVENT_CONTENT_TYPE: &str = "application/avro";

/// Turns messages into records.
pub struct Processor {
    connectors: HashMap<String, Arc<Gateway>>,
    decode: DecodeOptions,
    encoder: EventEncoder,
    secrets: SecretFields,
    metrics: Arc<Metrics>,
    max_record_bytes: usize,
    follow: FollowPlan,
    /// Where the chains seen lately stand, so that a repeated check does not
    /// fork its chain.
    marks: std::sync::Mutex<follow::ChainMarks>,
    /// At least once: guard chains against repeated checks (chain marks, end
    /// markers). Exactly once needs neither.
    guards: bool,
}

/// How many chains each processor remembers (about 100 bytes each).
const CHAIN_MARKS: usize = 100_000;

impl Processor {
    /// A processor over these connectors. Dead letters are cut to
    /// `max_record_bytes` (the producer's `message.max.bytes`).
    pub fn new(
        connectors: HashMap<String, Arc<Gateway>>,
        decode: DecodeOptions,
        encoder: EventEncoder,
        secrets: SecretFields,
        metrics: Arc<Metrics>,
        max_record_bytes: usize,
    ) -> Self {
        Processor {
            connectors,
            decode,
            encoder,
            secrets,
            metrics,
            max_record_bytes,
            follow: FollowPlan::default(),
            marks: std::sync::Mutex::new(follow::ChainMarks::new(CHAIN_MARKS)),
            guards: true,
        }
    }

    /// A job's records were all acknowledged: its chain's check is done.
    pub fn done(&self, job: &PipelineJob) {
        if !self.guards {
            return;
        }
        if let Work::Check {
            chain: Some(chain), ..
        } = &job.work
        {
            self.marks().done(chain);
        }
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, follow::ChainMarks> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn skipped(&self, request: &StatusCheckRequest, chain: &Chain, why: &str) -> Vec<Outgoing> {
        self.metrics.follow_check_skipped(&request.connector);
        tracing::info!(check = chain.check, "{why}; skipped");
        Vec::new()
    }

    /// The same processor with (at least once) or without (exactly once) the
    /// follow-mode guards against repeated checks: chain marks and end markers.
    /// Exactly once, a check's records and its input offset commit together, so
    /// a check is never repeated with visible effects and a chain cannot fork.
    pub fn with_repeat_guards(mut self, guards: bool) -> Self {
        self.guards = guards;
        self
    }

    /// The same processor with follow mode for the connectors in `plan`.
    pub fn with_follow(mut self, plan: FollowPlan) -> Self {
        self.follow = plan;
        self
    }

    /// Decodes and routes a message (no I/O). A panic while decoding (a bug) is
    /// contained: the message becomes an `internal_error` dead letter.
    pub fn prepare(&self, incoming: Incoming, epoch: Epoch) -> PipelineJob {
        let routed = std::panic::catch_unwind(AssertUnwindSafe(|| self.route(&incoming)));
        let (key, work) = routed.unwrap_or_else(|panic| {
            let message = panic_message(panic.as_ref());
            self.metrics.internal_error();
            tracing::error!(panic = %message, "decoding a request panicked (a bug); it is dead-lettered as internal_error");
            (
                None,
                Work::Reject(Rejection::new(
                    RejectCode::InternalError,
                    format!("decoding failed: {message}"),
                )),
            )
        });
        PipelineJob {
            incoming,
            epoch,
            key,
            work,
        }
    }

    fn route(&self, incoming: &Incoming) -> (Option<String>, Work) {
        let headers: Vec<RawHeader<'_>> = incoming
            .headers
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
            .collect();
        // A re-check carries its chain; its request id defaults from the chain's origin.
        let recheck = if incoming.recheck {
            match Chain::from_headers(&incoming.headers) {
                Ok(chain) => Some(chain),
                Err(e) => {
                    return (
                        None,
                        Work::Reject(Rejection::new(RejectCode::InvalidHeader, e.to_string())),
                    )
                }
            }
        } else {
            None
        };
        let origin = recheck
            .as_ref()
            .map_or_else(|| incoming.position(), |c| c.origin.clone());
        let position = SourcePosition {
            topic: &origin.topic,
            partition: origin.partition,
            offset: origin.offset,
        };
        let routed = decode_request(incoming.value.as_deref(), &headers, position, &self.decode)
            .and_then(|request| {
                let connector = self.connectors.get(&request.connector).ok_or_else(|| {
                    Rejection::new(
                        RejectCode::UnknownConnector,
                        format!("connector `{}` is not configured", request.connector),
                    )
                })?;
                let http = connector.prepare(&request)?;
                Ok((request, http, connector.clone()))
            });
        match routed {
            Ok((request, http, connector)) => {
                let chain = match recheck {
                    Some(chain) => Some(chain),
                    None if request.follow => {
                        if self.follow.by_connector.contains_key(&request.connector) {
                            Some(Chain::start(origin, now_ms()))
                        } else {
                            // Checked once; the event says so (next_check_at null).
                            self.metrics.follow_unavailable(&request.connector);
                            None
                        }
                    }
                    None => None,
                };
                (
                    Some(format!(
                        "{}/{}",
                        request.connector, request.connector_transaction_id
                    )),
                    Work::Check {
                        request: Box::new(request),
                        http: Box::new(http),
                        connector,
                        chain,
                    },
                )
            }
            Err(rejection) => (None, Work::Reject(rejection)),
        }
    }

    /// Runs a job to the records it publishes, in order (an event and/or a
    /// re-check record, or one dead letter). A panic while checking (a bug) is
    /// contained: the job becomes an `internal_error` dead letter with the
    /// original bytes, and the partition moves on.
    pub async fn process(&self, job: &PipelineJob) -> Vec<Outgoing> {
        match AssertUnwindSafe(self.run(job)).catch_unwind().await {
            Ok(out) => out,
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                self.metrics.internal_error();
                tracing::error!(panic = %message, "processing panicked (a bug); the record is dead-lettered as internal_error");
                vec![self.dead_letter(
                    &job.incoming,
                    RejectCode::InternalError,
                    &format!("processing failed: {message}"),
                )]
            }
        }
    }

    /// The dead letter for a message, cut to fit the producer's record limit.
    pub fn dead_letter(&self, incoming: &Incoming, code: RejectCode, message: &str) -> Outgoing {
        dead_letter(incoming, code.as_str(), message, self.max_record_bytes)
    }

    async fn run(&self, job: &PipelineJob) -> Vec<Outgoing> {
        let (request, http, connector, chain) = match &job.work {
            Work::Reject(rejection) => {
                return vec![self.dead_letter(&job.incoming, rejection.code, &rejection.message)]
            }
            Work::Check {
                request,
                http,
                connector,
                chain,
            } => (request, http, connector, chain),
        };
        if let Some(c) = chain {
            if let Some(ended_at) = c.ended_at {
                // An end marker: remember where the chain ended; nothing to check.
                if self.guards {
                    self.marks().note_end(&c.origin, ended_at);
                }
                return Vec::new();
            }
            if self.guards && !self.marks().claim(c) {
                return self.skipped(request, c, "the chain has moved past this check");
            }
        }
        let priority = if chain.as_ref().is_some_and(|c| c.check > 1) {
            Priority::Recheck
        } else {
            Priority::Fresh
        };
        let result = check_as(connector, request, http, priority, None).await;
        let outcome = if result.outcome.is_ok() {
            Outcome::Synced
        } else {
            Outcome::ConnectorError
        };
        if let Err(failure) = &result.outcome {
            let first_check = chain.as_ref().is_none_or(|c| c.check <= 1);
            if request.from_webhook
                && first_check
                && failure.code == FailureCode::TransactionNotFound
            {
                // A webhook only names a payment: one the connector does not know
                // publishes nothing (a forged id cannot put events on the topic),
                // and no chain starts from it. (A chain it started, which found
                // the payment, ends as any chain does.)
                self.metrics.webhook_check_not_found(&request.connector);
                tracing::info!("the connector does not know the transaction a webhook named; nothing is published");
                return Vec::new();
            }
            tracing::warn!(code = failure.code.as_str(), message = %failure.message, "status check failed");
        }
        let status = result
            .outcome
            .as_ref()
            .ok()
            .map(|r| (r.status, connector.connector().is_final(r.status)));
        let now = now_ms();
        let origin = |c: &Chain| c.origin.clone();
        let (origin, check_number) = match chain {
            Some(c) => (origin(c), c.check),
            None => (job.incoming.position(), 1),
        };
        // Follow mode decides whether this check publishes and what comes next.
        let settings = self.follow.by_connector.get(&request.connector);
        let decision = match (chain, settings) {
            (Some(c), Some(s)) => Some(follow::decide(s, c, status)),
            // A re-check of a connector whose follow table is gone (a
            // configuration change): the chain ends here, published as last.
            (Some(_), None) => Some(follow::Decision {
                publish: true,
                next: None,
                end: Some(ChainEnd::Exhausted),
            }),
            _ => None,
        };
        if let (Some(c), Some(d)) = (chain, &decision) {
            if self.guards && !self.marks().settle(c, d.end.is_some()) {
                return self.skipped(request, c, "a later check of the chain ran meanwhile");
            }
        }
        let mut publish = decision.as_ref().is_none_or(|d| d.publish);
        let mut next = decision.as_ref().and_then(|d| d.next);
        let mut end = decision.as_ref().and_then(|d| d.end);
        // The chain's next record: its next check, or (at least once) an end
        // marker where the next check would have gone when it ended at a final
        // status with slots left. Built before the event: a re-check record too
        // large for the producer ends the chain at this check.
        let mut too_large = None;
        let follow_on = match (chain, next, settings) {
            (Some(c), Some(delay), _) => {
                let due = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                let last_published = match (publish, status) {
                    (true, Some((s, _))) => Some(s),
                    _ => c.last_published,
                };
                Some((
                    c,
                    delay,
                    c.next_headers(due, last_published, &job.incoming.position()),
                    false,
                ))
            }
            (Some(c), None, Some(s)) if self.guards && status.is_some_and(|(_, f)| f) => {
                s.delay_after(c.check).map(|delay| {
                    (
                        c,
                        delay,
                        c.end_marker_headers(now, &job.incoming.position()),
                        true,
                    )
                })
            }
            _ => None,
        };
        let follow_on = match follow_on {
            None => None,
            Some((c, delay, chain_headers, marker)) => {
                let Some(topic) = self.follow.topics.get(&delay) else {
                    // The plan names a topic for every delay of every schedule.
                    return vec![self.dead_letter(
                        &job.incoming,
                        RejectCode::InternalError,
                        &format!("no re-check topic for a {}s delay", delay.as_secs()),
                    )];
                };
                let input: Vec<RecordHeader> = job
                    .incoming
                    .headers
                    .iter()
                    .filter(|(k, _)| !follow::headers::ALL.iter().any(|h| k == h.as_bytes()))
                    .cloned()
                    .collect();
                match fit_recheck(
                    job.incoming.key.as_deref(),
                    job.incoming.value.as_deref(),
                    input,
                    chain_headers,
                    self.max_record_bytes,
                ) {
                    Some((headers, dropped)) => {
                        if dropped > 0 {
                            self.metrics
                                .recheck_headers_dropped(&request.connector, dropped);
                            tracing::warn!(dropped, "input headers left off the re-check record so that it fits the producer's record limit");
                        }
                        Some((c, delay, topic.clone(), headers, marker))
                    }
                    None if marker => None,
                    None => {
                        // Not even without the input's headers: the chain ends at
                        // this check, published as its last, and the request is
                        // kept as a dead letter.
                        too_large = Some(format!(
                            "the re-check record of check {} does not fit the producer's record limit ({} bytes) even without the input's headers",
                            c.check + 1,
                            self.max_record_bytes
                        ));
                        publish = true;
                        next = None;
                        end = Some(ChainEnd::Exhausted);
                        None
                    }
                }
            }
        };
        let next_due =
            next.map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
        let mut out = Vec::with_capacity(2);
        let mut milestone = end.map(|end| Milestone::ChainEnded {
            connector: request.connector.clone(),
            end,
        });
        if publish {
            let envelope = Envelope {
                event_id: check_event_id(
                    &origin.topic,
                    origin.partition,
                    origin.offset,
                    check_number,
                ),
                check_number,
                is_final: status.is_some_and(|(_, f)| f),
                next_check_at_ms: next_due,
                observed_at_ms: now,
                attempts: result.attempts,
                raw_request: Some(http.describe()),
            };
            // The outcome is not needed past here: moved, not copied.
            let mut event =
                PaymentStatusEvent::build(request, envelope, result.outcome, self.secrets);
            match self.fit_event(&mut event) {
                Fit::Fits { value, headers } => out.push(Outgoing {
                    destination: Destination::Events,
                    key: Some(event.connector_transaction_id.clone().into_bytes()),
                    value: Some(value),
                    headers,
                    label: event.status.as_str(),
                    outcome,
                    summary: status_summary(&event),
                    milestone: milestone.take(),
                }),
                // Known before producing: the broker would refuse it, so the
                // request is kept instead (its chain, if any, ends here).
                Fit::TooLarge(size) => {
                    return vec![self.dead_letter(
                        &job.incoming,
                        RejectCode::PublishRefused,
                        &format!(
                            "the event ({size} bytes) does not fit the producer's record limit ({} bytes), even without its raw connector fields",
                            self.max_record_bytes
                        ),
                    )]
                }
                // A schema/value mismatch is a bug; keep the request rather than lose it.
                Fit::Failed(e) => {
                    return vec![self.dead_letter(
                        &job.incoming,
                        RejectCode::InternalError,
                        &format!("event could not be encoded: {e}"),
                    )]
                }
            }
        }
        if let Some(why) = too_large {
            tracing::warn!(reason = %why, "the chain ends here; the request is dead-lettered as recheck_too_large");
            out.push(self.dead_letter(&job.incoming, RejectCode::RecheckTooLarge, &why));
        }
        if let Some((chain, delay, topic, headers, marker)) = follow_on {
            out.push(Outgoing {
                destination: Destination::Recheck(topic),
                key: job.incoming.key.clone(),
                value: job.incoming.value.clone(),
                headers,
                label: if marker { "end_marker" } else { "recheck" },
                outcome,
                summary: if marker {
                    Cow::Borrowed("")
                } else {
                    format!("check {} due in {}s", chain.check + 1, delay.as_secs()).into()
                },
                milestone: (!marker).then(|| Milestone::RecheckScheduled {
                    connector: request.connector.clone(),
                    delay_secs: delay.as_secs(),
                }),
            });
        }
        out
    }
}

/// An event encoded to fit the producer's record limit, or why it cannot be.
enum Fit {
    /// Its value and headers.
    Fits {
        value: Vec<u8>,
        headers: Vec<RecordHeader>,
    },
    /// Too large even without its raw connector fields: this many bytes.
    TooLarge(usize),
    /// It could not be encoded.
    Failed(String),
}

/// The header an event carries when its raw connector fields were left off to
/// fit the record limit: how many bytes they had.
pub const RAW_CONNECTOR_DROPPED: &str = "paysync-raw-connector-dropped";

impl Processor {
    /// Encodes `event` so that it fits `max_record_bytes`: as it is, or without
    /// its `raw_connector_*` fields (a header says so), known before anything
    /// is produced.
    fn fit_event(&self, event: &mut PaymentStatusEvent) -> Fit {
        let mut headers = vec![
            header("x-request-id", &event.request_id),
            header("x-connector", &event.connector),
            header("x-merchant-id", &event.merchant_id),
            header("content-type", EVENT_CONTENT_TYPE),
        ];
        let key = event.connector_transaction_id.len();
        let size = |value: &[u8], headers: &[RecordHeader]| {
            record_size(None, Some(value), headers).saturating_add(key)
        };
        let value = match self.encoder.encode(event) {
            Ok(v) => v,
            Err(e) => return Fit::Failed(e.to_string()),
        };
        #[cfg(feature = "mutations")]
        let unchecked = crate::mutation::on("event_not_fitted");
        #[cfg(not(feature = "mutations"))]
        let unchecked = false;
        if unchecked || size(&value, &headers) <= self.max_record_bytes {
            return Fit::Fits { value, headers };
        }
        let raw = event.raw_connector_response.take().map_or(0, |r| r.len())
            + event.raw_connector_request.take().map_or(0, |r| r.len());
        if raw == 0 {
            return Fit::TooLarge(size(&value, &headers));
        }
        headers.push(header(RAW_CONNECTOR_DROPPED, &raw.to_string()));
        let value = match self.encoder.encode(event) {
            Ok(v) => v,
            Err(e) => return Fit::Failed(e.to_string()),
        };
        let fitted = size(&value, &headers);
        if fitted > self.max_record_bytes {
            return Fit::TooLarge(fitted);
        }
        self.metrics.raw_connector_dropped(&event.connector);
        tracing::warn!(
            raw_bytes = raw,
            limit = self.max_record_bytes,
            "the event's raw connector fields were left off so that it fits the producer's record limit"
        );
        Fit::Fits { value, headers }
    }
}

/// The headers of a re-check record so that it fits `max_record_bytes`: the
/// input's own headers (largest first) are left off until it fits, paysync's
/// chain headers always stay. `None` when it cannot fit even without them.
/// Returns the headers and how many input headers were left off.
pub fn fit_recheck(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    mut input: Vec<RecordHeader>,
    chain: Vec<RecordHeader>,
    max_record_bytes: usize,
) -> Option<(Vec<RecordHeader>, usize)> {
    let fixed = record_size(key, value, &chain);
    if fixed > max_record_bytes {
        return None;
    }
    let size = |h: &RecordHeader| {
        record_size(None, None, std::slice::from_ref(h)) - record_size(None, None, &[])
    };
    let mut total = fixed + input.iter().map(size).sum::<usize>();
    let mut dropped = 0;
    while total > max_record_bytes {
        let Some((largest, _)) = input.iter().enumerate().max_by_key(|(_, h)| size(h)) else {
            break;
        };
        total -= size(&input[largest]);
        input.remove(largest);
        dropped += 1;
    }
    input.extend(chain);
    Some((input, dropped))
}

/// A status check through a connector's gateway (retries, circuit breaker, rate
/// limits), then the integrity check of the request's amount, the same for every
/// connector. Used by the engine and by `paysync check`.
pub async fn check(
    gateway: &Gateway,
    request: &StatusCheckRequest,
    http: &HttpRequest,
    deadline: Option<tokio::time::Instant>,
) -> CheckResult {
    check_as(gateway, request, http, Priority::Fresh, deadline).await
}

/// [`check`] as `priority`: a follow-mode re-check yields to fresh requests in
/// its account's concurrency window.
pub async fn check_as(
    gateway: &Gateway,
    request: &StatusCheckRequest,
    http: &HttpRequest,
    priority: Priority,
    deadline: Option<tokio::time::Instant>,
) -> CheckResult {
    let mut result = gateway.check_with(request, http, priority, deadline).await;
    if let Ok(report) = &result.outcome {
        if let Err(failure) = check_integrity(request, report) {
            result.outcome = Err(failure);
        }
    }
    result
}

fn header(name: &str, value: &str) -> RecordHeader {
    (name.as_bytes().to_vec(), Some(value.as_bytes().to_vec()))
}

fn status_summary(event: &PaymentStatusEvent) -> Cow<'static, str> {
    match (&event.status, &event.error) {
        (PaymentStatus::PAYMENT_STATUS_UNSPECIFIED, Some(e)) => format!(
            "check failed: {}",
            e.unified_details
                .as_ref()
                .and_then(|u| u.code.as_deref())
                .unwrap_or("unknown")
        )
        .into(),
        (status, _) => Cow::Borrowed(status.as_str()),
    }
}

/// Bytes a record costs against the producer's `message.max.bytes`, with a
/// margin for the framing librdkafka adds (varints, attributes, timestamps).
pub fn record_size(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[RecordHeader]) -> usize {
    const RECORD_OVERHEAD: usize = 128;
    const HEADER_OVERHEAD: usize = 16;
    RECORD_OVERHEAD
        + key.map_or(0, <[u8]>::len)
        + value.map_or(0, <[u8]>::len)
        + headers
            .iter()
            .map(|(k, v)| HEADER_OVERHEAD + k.len() + v.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

/// The dead letter for a message: original key, value and headers, plus the
/// `paysync-*` headers of PRODUCT.md §2, cut to at most `max_record_bytes`. A
/// value that does not fit is truncated (`paysync-value-truncated: true`,
/// `paysync-original-size`); the source headers point at the full original.
/// Should the original key and headers alone not fit (a record no producer of
/// this configuration could write), the original headers are dropped
/// (`paysync-headers-dropped: <count>`) and then the key is truncated
/// (`paysync-key-truncated: true`).
pub fn dead_letter(
    incoming: &Incoming,
    code: &'static str,
    message: &str,
    max_record_bytes: usize,
) -> Outgoing {
    let mut paysync = vec![
        header("paysync-error-code", code),
        header("paysync-error-message", message),
        header("paysync-source-topic", &incoming.topic),
        header("paysync-source-partition", &incoming.partition.to_string()),
        header("paysync-source-offset", &incoming.offset.to_string()),
        header("paysync-failed-at", &crate::clock::rfc3339_now()),
        // Written by paysync after the input's own headers, so it is the one a
        // redrive reads (see `letters`): it survives dead-lettering.
        header(
            super::letters::headers::REDRIVE_COUNT,
            &super::letters::count_to_carry(&incoming.headers).to_string(),
        ),
    ];
    let mut originals = incoming.headers.clone();
    let mut key = incoming.key.clone();
    let mut value = incoming.value.clone();
    let headers_size = |originals: &[RecordHeader], paysync: &[RecordHeader]| {
        record_size(None, None, originals) + record_size(None, None, paysync)
    };
    let without_value =
        |originals: &[RecordHeader], paysync: &[RecordHeader], key: &Option<Vec<u8>>| {
            headers_size(originals, paysync) + key.as_ref().map_or(0, Vec::len)
        };
    let value_len = value.as_ref().map_or(0, Vec::len);
    if without_value(&originals, &paysync, &key) + value_len > max_record_bytes {
        if let Some(v) = &value {
            paysync.push(header("paysync-value-truncated", "true"));
            paysync.push(header("paysync-original-size", &v.len().to_string()));
        }
        if without_value(&originals, &paysync, &key) > max_record_bytes {
            paysync.push(header(
                "paysync-headers-dropped",
                &originals.len().to_string(),
            ));
            originals.clear();
        }
        let rest = without_value(&originals, &paysync, &key);
        if rest > max_record_bytes {
            paysync.push(header("paysync-key-truncated", "true"));
            let over = without_value(&originals, &paysync, &key) - max_record_bytes;
            if let Some(k) = &mut key {
                k.truncate(k.len().saturating_sub(over));
            }
        }
        let room = max_record_bytes.saturating_sub(without_value(&originals, &paysync, &key));
        if let Some(v) = &mut value {
            v.truncate(room);
        }
    }
    originals.extend(paysync);
    Outgoing {
        destination: Destination::DeadLetters,
        key,
        value,
        headers: originals,
        label: code,
        outcome: Outcome::Invalid,
        summary: format!("{code}: {message}").into(),
        milestone: None,
    }
}

/// The text of a panic payload (bounded, without control characters).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic without a message".to_owned());
    crate::connectors::sanitize(&text)
}

impl Handler for Processor {
    fn prepare(&self, incoming: Incoming, epoch: Epoch) -> PipelineJob {
        Processor::prepare(self, incoming, epoch)
    }

    fn process<'a>(
        &'a self,
        job: &'a PipelineJob,
    ) -> futures::future::BoxFuture<'a, Vec<Outgoing>> {
        Box::pin(Processor::process(self, job))
    }

    fn dead_letter(&self, incoming: &Incoming, code: RejectCode, message: &str) -> Outgoing {
        Processor::dead_letter(self, incoming, code, message)
    }

    fn done(&self, job: &PipelineJob) {
        Processor::done(self, job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Instant;

    #[test]
    fn a_recheck_record_drops_input_headers_largest_first_to_fit() {
        let h = |n: &str, len: usize| (n.as_bytes().to_vec(), Some(vec![b'x'; len]));
        let chain = vec![h("paysync-follow-check", 1)];
        let input = vec![h("small", 10), h("big", 700_000), h("middle", 300_000)];
        let (headers, dropped) = fit_recheck(
            Some(b"k"),
            Some(&[b'v'; 60_000]),
            input.clone(),
            chain.clone(),
            1_000_000,
        )
        .unwrap();
        assert_eq!(dropped, 1);
        let names: Vec<&[u8]> = headers.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(
            names,
            vec![&b"small"[..], b"middle", b"paysync-follow-check"],
            "the largest went"
        );
        let size = record_size(Some(b"k"), Some(&[b'v'; 60_000]), &headers);
        assert!(size <= 1_000_000, "{size}");
        let (headers, dropped) = fit_recheck(
            Some(b"k"),
            Some(b"v"),
            input.clone(),
            chain.clone(),
            2_000_000,
        )
        .unwrap();
        assert_eq!(
            (headers.len(), dropped),
            (4, 0),
            "nothing dropped when it fits"
        );
        assert!(
            fit_recheck(Some(&[b'k'; 999_990]), Some(b"v"), input, chain, 1_000_000).is_none(),
            "a key that alone is too large cannot be helped"
        );
    }

    #[test]
    fn dead_letter_keeps_the_original_and_adds_headers() {
        let incoming = Incoming {
            topic: Arc::from("in"),
            partition: 2,
            offset: 17,
            key: Some(b"k".to_vec()),
            value: Some(b"\xff not json".to_vec()),
            headers: vec![
                (b"trace".to_vec(), Some(b"abc".to_vec())),
                (b"\xff\xfe".to_vec(), None),
            ],
            received: Instant::now(),
            recheck: false,
        };
        let out = dead_letter(&incoming, "invalid_json", "value is not JSON", 1_000_000);
        assert_eq!(out.destination, Destination::DeadLetters);
        assert_eq!(out.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(out.value.as_deref(), Some(&b"\xff not json"[..]));
        assert_eq!(
            &out.headers[..2],
            &incoming.headers[..],
            "original headers first, byte for byte, null kept"
        );
        let h: HashMap<_, _> = out
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        assert_eq!(h["trace"], "abc");
        assert_eq!(h.get("\u{fffd}\u{fffd}").map(String::as_str), Some(""));
        assert_eq!(h["paysync-error-code"], "invalid_json");
        assert_eq!(h["paysync-source-topic"], "in");
        assert_eq!(h["paysync-source-partition"], "2");
        assert_eq!(h["paysync-source-offset"], "17");
        assert!(time::OffsetDateTime::parse(
            &h["paysync-failed-at"],
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
        assert!(!h.contains_key("paysync-value-truncated"));
    }

    fn incoming(key: usize, value: usize, headers: usize) -> Incoming {
        Incoming {
            topic: Arc::from("in"),
            partition: 0,
            offset: 5,
            key: Some(vec![b'k'; key]),
            value: Some(vec![b'v'; value]),
            headers: (0..headers)
                .map(|i| (format!("h{i}").into_bytes(), Some(vec![b'x'; 100])))
                .collect(),
            received: Instant::now(),
            recheck: false,
        }
    }

    fn header_of(out: &Outgoing, name: &str) -> Option<String> {
        out.headers
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
    }

    #[test]
    fn an_oversize_dead_letter_is_truncated_to_fit_and_says_so() {
        // Issue b: a 1,000,000-byte value plus paysync headers exceeded the
        // producer's 1,000,000-byte record limit and was retried forever.
        let limit = 1_000_000;
        let out = dead_letter(&incoming(10, 1_000_000, 3), "oversize", "too big", limit);
        let size = record_size(out.key.as_deref(), out.value.as_deref(), &out.headers);
        assert!(size <= limit, "{size} > {limit}");
        assert!(size > limit - 1000, "uses the room it has: {size}");
        assert_eq!(
            header_of(&out, "paysync-value-truncated").as_deref(),
            Some("true")
        );
        assert_eq!(
            header_of(&out, "paysync-original-size").as_deref(),
            Some("1000000")
        );
        assert_eq!(
            header_of(&out, "h2").map(|v| v.len()),
            Some(100),
            "original headers kept"
        );
        assert_eq!(out.key.as_deref(), Some(&[b'k'; 10][..]));
        let value = out.value.unwrap();
        assert!(value.iter().all(|b| *b == b'v'), "a prefix of the original");
    }

    #[test]
    fn dead_letters_fit_whatever_the_shape() {
        let limit = 64 * 1024;
        for (key, value, headers) in [
            (0, 0, 0),
            (10, 70_000, 0),
            (10, 1000, 1000),
            (100_000, 10, 0),
            (100_000, 100_000, 1000),
        ] {
            let out = dead_letter(&incoming(key, value, headers), "oversize", "m", limit);
            let size = record_size(out.key.as_deref(), out.value.as_deref(), &out.headers);
            assert!(size <= limit, "{key}/{value}/{headers}: {size}");
            assert_eq!(
                header_of(&out, "paysync-error-code").as_deref(),
                Some("oversize")
            );
            assert_eq!(
                header_of(&out, "paysync-source-offset").as_deref(),
                Some("5")
            );
        }
    }
}
