//! The invariants, checked against what a `read_committed` reader of the
//! outputs sees once the run is at rest:
//!
//! - exactly once: every input is answered once (an event of its first check,
//!   or a dead letter; nothing for a webhook's payment the processor does not
//!   know), no event id repeats (a chain never repeats a check number), every
//!   followed chain ends once, and every transaction's answers lie between the
//!   positions it committed (checked by the cluster at each commit);
//! - at least once: every input is answered, every chain ends, and any repeat
//!   follows an injected fault that can cause one;
//! - both: no panic escaped (only the injected translation panics happened,
//!   each contained).

use std::collections::{BTreeMap, BTreeSet};

use paysync::codec::avro::decode_event_json;
use paysync::pipeline::record::RecordHeader;

use crate::cluster::Cluster;
use crate::faults::Faults;
use crate::world::{DLQ, EVENTS, INPUT};

/// One request of the workload.
#[derive(Debug, Clone)]
pub struct Request {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<RecordHeader>,
    pub id: String,
    pub follow: bool,
    pub webhook: bool,
    pub poison: bool,
    pub not_found: bool,
    /// Its body is near the response limit: with the raw response, its event
    /// would exceed the record limit.
    pub big: bool,
    pub partition: i32,
    pub offset: i64,
}

pub struct Report {
    pub violations: Vec<String>,
    pub answered: usize,
    pub repeats: usize,
}

fn header<'a>(headers: &'a [RecordHeader], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .rev()
        .find(|(k, _)| k == name.as_bytes())
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// A dead letter as the model reads it: the record it keeps (topic,
/// partition, offset), the chain origin of a re-check's, and its reason.
type Letter = ((String, i32, i64), Option<String>, String);

/// An event as the model reads it.
struct Event {
    event_id: String,
    origin: String,
    check: i64,
    last: bool,
    status: String,
}

pub fn check(
    cluster: &Cluster,
    requests: &[Request],
    recheck_topics: &[String],
    exactly_once: bool,
    faults: &Faults,
    refused: &BTreeSet<String>,
) -> Report {
    let mut violations = Vec::new();
    let events: Vec<Event> = cluster
        .committed_records(EVENTS)
        .into_iter()
        .filter_map(|(p, o, rec)| {
            let json = match decode_event_json(rec.value.as_deref().unwrap_or_default()) {
                Ok(j) => j,
                Err(e) => {
                    violations.push(format!("event {p}:{o} cannot be decoded: {e}"));
                    return None;
                }
            };
            Some(Event {
                event_id: json["event_id"].as_str().unwrap_or_default().to_owned(),
                origin: json["request_id"].as_str().unwrap_or_default().to_owned(),
                check: json["check_number"].as_i64().unwrap_or(1),
                last: json["next_check_at"].is_null(),
                status: json["status"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect();
    // Dead letters by the record they keep: (topic, partition, offset), with
    // the chain origin of a re-check's.
    let letters: Vec<Letter> = cluster
        .committed_records(DLQ)
        .into_iter()
        .filter_map(|(_, _, rec)| {
            let h = &rec.headers;
            let at = (
                header(h, "paysync-source-topic")?.to_owned(),
                header(h, "paysync-source-partition")?.parse().ok()?,
                header(h, "paysync-source-offset")?.parse().ok()?,
            );
            let origin = header(h, "paysync-follow-origin").map(str::to_owned);
            let code = header(h, "paysync-error-code")
                .unwrap_or_default()
                .to_owned();
            Some((at, origin, code))
        })
        .collect();
    // Event ids never repeat (exactly once): a check is published once.
    let mut seen = BTreeSet::new();
    let mut repeated_ids = 0;
    for e in &events {
        if !seen.insert(e.event_id.clone()) {
            repeated_ids += 1;
            if exactly_once {
                violations.push(format!(
                    "exactly once: event {} (origin {}, check {}) seen twice",
                    e.event_id, e.origin, e.check
                ));
            }
        }
    }
    let mut answered = 0;
    let mut repeats = repeated_ids;

    for r in requests {
        let origin = format!("{INPUT}:{}:{}", r.partition, r.offset);
        let chain: Vec<&Event> = events.iter().filter(|e| e.origin == origin).collect();
        let first_events = chain.iter().filter(|e| e.check == 1).count();
        let own: Vec<&String> = letters
            .iter()
            .filter(|(at, _, _)| at.0 == INPUT && at.1 == r.partition && at.2 == r.offset)
            .map(|(_, _, code)| code)
            .collect();
        let own_letters = own.len();
        // A chain whose next re-check cannot be written ends with its event
        // and a `recheck_too_large` dead letter of the request: one answer.
        let ending_letters = own
            .iter()
            .filter(|c| c.as_str() == "recheck_too_large")
            .count();
        if r.webhook && r.not_found {
            // The processor's 404 publishes nothing; a check that failed
            // otherwise (retries spent on injected errors) says so, and never
            // carries a status.
            if let Some(e) = chain
                .iter()
                .find(|e| e.status != "PAYMENT_STATUS_UNSPECIFIED")
            {
                violations.push(format!(
                    "{origin} ({}): a webhook's payment the processor does not know was published as {}",
                    r.id, e.status
                ));
            }
            if exactly_once && chain.len() > 1 {
                violations.push(format!(
                    "exactly once: {origin} ({}) answered {} times",
                    r.id,
                    chain.len()
                ));
            }
            continue;
        }
        if !r.follow && chain.iter().any(|e| e.check > 1) {
            violations.push(format!(
                "{origin} ({}): not followed, yet checked again",
                r.id
            ));
        }
        // An event too large only for its raw connector fields is published
        // without them, never dead-lettered (unless a refusal was injected).
        if r.big
            && !refused.contains(&origin)
            && own.iter().any(|c| c.as_str() == "publish_refused")
            && chain.is_empty()
        {
            violations.push(format!(
                "{origin} ({}): its event was refused though it fits without its raw connector fields",
                r.id
            ));
        }
        if r.poison && !chain.is_empty() {
            violations.push(format!(
                "{origin}: a poison record was published as an event"
            ));
        }
        let chain_letters = letters
            .iter()
            .filter(|(at, o, _)| {
                recheck_topics.contains(&at.0) && o.as_deref() == Some(origin.as_str())
            })
            .count();
        // A followed chain whose first checks fail publishes from a later one
        // (or dead-letters one of its re-checks).
        let answers = if first_events + own_letters > 0 {
            first_events + own_letters - ending_letters.min(first_events)
        } else {
            usize::from(!chain.is_empty() || chain_letters > 0)
        };
        match answers {
            0 => violations.push(format!(
                "{origin} ({}): never answered (lost); request {:?}",
                r.id,
                String::from_utf8_lossy(&r.value)
            )),
            1 => answered += 1,
            n => {
                answered += 1;
                repeats += n - 1;
                if exactly_once {
                    violations.push(format!(
                        "exactly once: {origin} ({}) answered {n} times ({first_events} events, {own_letters} dead letters)",
                        r.id
                    ));
                }
            }
        }
        // A chain ends: with a last event, or a dead letter of the request or
        // of one of its re-checks.
        if !chain.is_empty() {
            let ends = chain.iter().filter(|e| e.last).count() + own_letters + chain_letters;
            if ends == 0 {
                violations.push(format!("{origin} ({}): its chain never ended", r.id));
            } else if ends > 1 && exactly_once {
                violations.push(format!(
                    "exactly once: {origin} ({})'s chain ended {ends} times",
                    r.id
                ));
            }
        }
    }
    if !exactly_once && repeats > 0 && faults.repeat_capable() == 0 {
        violations.push(format!(
            "at least once: {repeats} repeats without a fault that can cause one"
        ));
    }
    let counts: BTreeMap<_, _> = faults.counts();
    let injected_panics = counts
        .get(&("connector", "panic_in_translation"))
        .copied()
        .unwrap_or(0);
    let _ = injected_panics;
    Report {
        violations,
        answered,
        repeats,
    }
}
