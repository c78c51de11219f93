//! Follow mode: keep re-checking a payment on its connector's schedule until its
//! status is final or the schedule is used up, with the pending re-checks held in
//! Kafka (one re-check topic per delay, read only when a partition's head is due),
//! never in memory or a database.
//!
//! Pure: the schedule, what a check decides (publish this event? schedule which
//! re-check?), and the chain state a re-check record carries in its headers. The
//! engine reads re-check topics and holds a partition's head until it is due;
//! the processor applies [`decide`] after each check.

use std::time::Duration;

use serde::Serialize;

use crate::domain::PaymentStatus;

/// Which checks of a chain are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    /// The first check, every change of status, and the chain's last check.
    Changes,
    /// Every check.
    EveryCheck,
}

/// A connector's follow schedule (`[connectors.<name>.follow]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FollowSettings {
    /// `(delay, count)` tiers after the first check; each delay counts from the
    /// previous check.
    #[serde(serialize_with = "ser_tiers")]
    pub schedule: Vec<(Duration, u32)>,
    /// Which checks are published.
    pub publish: PublishMode,
    /// Re-checks' share of an account's concurrency window while fresh requests
    /// wait (0 to 1).
    pub share: f64,
}

fn ser_tiers<S: serde::Serializer>(tiers: &[(Duration, u32)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(tiers.len()))?;
    for (d, n) in tiers {
        seq.serialize_element(&(format!("{}s", d.as_secs()), n))?;
    }
    seq.end()
}

impl FollowSettings {
    /// The delay before check `k + 1` (checks count from 1), or `None` after the
    /// last one.
    pub fn delay_after(&self, check: u32) -> Option<Duration> {
        let mut slot = check.checked_sub(1)?;
        for (delay, count) in &self.schedule {
            if slot < *count {
                return Some(*delay);
            }
            slot -= count;
        }
        None
    }

    /// How many checks a chain makes at most (the first included).
    pub fn max_checks(&self) -> u32 {
        1 + self.schedule.iter().map(|(_, n)| *n).sum::<u32>()
    }
}

/// The name of the re-check topic for `delay`: `<prefix>.<seconds>s`.
pub fn recheck_topic(prefix: &str, delay: Duration) -> String {
    format!("{prefix}.{}s", delay.as_secs())
}

/// The delay of a re-check topic named `<prefix>.<seconds>s`, if it is one.
pub fn recheck_delay(prefix: &str, topic: &str) -> Option<Duration> {
    let secs = topic
        .strip_prefix(prefix)?
        .strip_prefix('.')?
        .strip_suffix('s')?;
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || secs.starts_with('0') {
        return None;
    }
    secs.parse().ok().map(Duration::from_secs)
}

/// A record's place in Kafka: where a chain began (its event ids and default
/// request id derive from this), or the record that scheduled a re-check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl Position {
    /// `<topic>:<partition>:<offset>`.
    fn header_value(&self) -> String {
        format!("{}:{}:{}", self.topic, self.partition, self.offset)
    }

    fn parse(value: &str) -> Option<Position> {
        let mut parts = value.rsplitn(3, ':');
        let offset = parts.next()?.parse().ok()?;
        let partition = parts.next()?.parse().ok()?;
        let topic = parts.next().filter(|t| !t.is_empty())?;
        Some(Position {
            topic: topic.to_owned(),
            partition,
            offset,
        })
    }
}

/// The state a chain carries from check to check (in re-check record headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Where it began.
    pub origin: Position,
    /// The number of the check this record performs (1 for the first).
    pub check: u32,
    /// When the chain began, ms since the epoch.
    pub first_seen_ms: i64,
    /// When this check is due, ms since the epoch (`first_seen_ms` for the first).
    pub due_ms: i64,
    /// The last status the chain published, if any.
    pub last_published: Option<PaymentStatus>,
    /// The record that scheduled this check (absent for the first, and in
    /// re-check records written before this header existed).
    pub scheduled_by: Option<Position>,
    /// An end marker, not a check: the chain ended at this check number.
    pub ended_at: Option<u32>,
}

/// What one check of a chain decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Publish this check's event.
    pub publish: bool,
    /// The chain continues: the delay until the next check.
    pub next: Option<Duration>,
    /// The chain ends here, and how.
    pub end: Option<ChainEnd>,
}

/// How a chain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainEnd {
    /// At a final status.
    Final,
    /// The schedule was used up.
    Exhausted,
}

impl ChainEnd {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            ChainEnd::Final => "final",
            ChainEnd::Exhausted => "exhausted",
        }
    }
}

/// What check `chain.check` decides, given its outcome: `Some(status)` when the
/// connector answered (with whether that status is final for it), `None` for a
/// failed check. A failed check inside a chain publishes nothing and takes the
/// next slot; a chain that ends on a failure publishes that failure. A chain
/// never goes on from a final status.
pub fn decide(
    settings: &FollowSettings,
    chain: &Chain,
    outcome: Option<(PaymentStatus, bool)>,
) -> Decision {
    let next = settings.delay_after(chain.check);
    match outcome {
        Some((_, true)) => Decision {
            publish: true,
            next: None,
            end: Some(ChainEnd::Final),
        },
        Some((status, false)) => Decision {
            publish: next.is_none()
                || settings.publish == PublishMode::EveryCheck
                || chain.last_published != Some(status),
            next,
            end: next.is_none().then_some(ChainEnd::Exhausted),
        },
        None => Decision {
            publish: next.is_none(),
            next,
            end: next.is_none().then_some(ChainEnd::Exhausted),
        },
    }
}

/// Where each chain lately seen by this process stands, so that a repeated check
/// does not fork its chain.
///
/// A check is repeated when its offset was not committed before a crash or a
/// rebalance, or when its predecessor was repeated and published its re-check
/// record again. The repeat may see a newer status than the first run did (a
/// payment that became final meanwhile) while the first run's successor is
/// already in a re-check topic: without this both would carry the chain on and
/// the chain would end twice. The rules, per origin:
///
/// - a check below the highest one claimed is skipped: that higher check exists
///   only because this one's records were all acknowledged;
/// - a check equal to the highest is skipped once it is done (a duplicate record),
///   and taken again when it never finished (abandoned in a rebalance);
/// - a check above a chain's end is skipped;
/// - a check whose chain moved past it while it ran publishes nothing.
///
/// One mutex, so claims from several re-check topics are ordered. Bounded (the
/// oldest chains are forgotten first); a forgotten chain, or one whose checks are
/// owned by another instance, falls back to at-least-once: a repeat carries the
/// same `event_id`.
#[derive(Debug)]
pub struct ChainMarks {
    capacity: usize,
    order: std::collections::VecDeque<Position>,
    marks: std::collections::HashMap<Position, Mark>,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The highest check claimed.
    check: u32,
    /// Its records were all acknowledged.
    done: bool,
    /// It ends the chain: its records, which say so, were acknowledged.
    ended: bool,
    /// It will end the chain once its records are acknowledged. A run that is
    /// abandoned (its partition revoked while it published) never ended it:
    /// a check after it must still run.
    ending: bool,
}

impl ChainMarks {
    /// Remembers up to `capacity` chains.
    pub fn new(capacity: usize) -> Self {
        ChainMarks {
            capacity: capacity.max(1),
            order: std::collections::VecDeque::new(),
            marks: std::collections::HashMap::new(),
        }
    }

    /// Before check `chain.check` runs: true to run it, false to skip it.
    pub fn claim(&mut self, chain: &Chain) -> bool {
        let k = chain.check;
        match self.marks.get_mut(&chain.origin) {
            None => {
                self.remember(chain.origin.clone(), k);
                true
            }
            Some(m) if k < m.check || (k > m.check && m.ended) => false,
            Some(m) if k == m.check => {
                m.ending = false;
                !m.done
            }
            Some(m) => {
                *m = Mark {
                    check: k,
                    done: false,
                    ended: false,
                    ending: false,
                };
                true
            }
        }
    }

    /// After the check ran, before anything is published: false when a later
    /// check of the chain was claimed meanwhile (publish nothing). `ends` marks
    /// the chain as ended here.
    pub fn settle(&mut self, chain: &Chain, ends: bool) -> bool {
        match self.marks.get_mut(&chain.origin) {
            Some(m) if m.check > chain.check => false,
            Some(m) => {
                m.ending = ends;
                #[cfg(feature = "mutations")]
                if crate::mutation::on("chain_ended_before_acknowledged") {
                    m.ended |= ends;
                }
                true
            }
            None => true,
        }
    }

    /// An end marker: the chain ended at check `at` (in this process or another,
    /// before a crash).
    pub fn note_end(&mut self, origin: &Position, at: u32) {
        let ended = Mark {
            check: at,
            done: true,
            ended: true,
            ending: true,
        };
        match self.marks.get_mut(origin) {
            None => {
                self.remember(origin.clone(), at);
                if let Some(m) = self.marks.get_mut(origin) {
                    *m = ended;
                }
            }
            Some(m) if m.check <= at => *m = ended,
            Some(_) => {}
        }
    }

    /// The check's records were all acknowledged.
    pub fn done(&mut self, chain: &Chain) {
        if let Some(m) = self.marks.get_mut(&chain.origin) {
            if m.check == chain.check {
                m.done = true;
                m.ended |= m.ending;
            }
        }
    }

    fn remember(&mut self, origin: Position, check: u32) {
        self.order.push_back(origin.clone());
        self.marks.insert(
            origin,
            Mark {
                check,
                done: false,
                ended: false,
                ending: false,
            },
        );
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.marks.remove(&old);
            }
        }
    }
}

/// Header names of a re-check record's chain state (the README documents them).
pub mod headers {
    /// `<topic>:<partition>:<offset>` of the request that began the chain.
    pub const ORIGIN: &str = "paysync-follow-origin";
    /// The number of the check this record performs.
    pub const CHECK: &str = "paysync-follow-check";
    /// When the chain began, ms since the epoch.
    pub const FIRST_SEEN: &str = "paysync-follow-first-seen";
    /// When this check is due, ms since the epoch.
    pub const DUE: &str = "paysync-follow-due";
    /// The last status the chain published (absent before the first).
    pub const LAST_STATUS: &str = "paysync-follow-last-status";
    /// `<topic>:<partition>:<offset>` of the record whose check scheduled this one;
    /// the re-check is not taken before that record is committed.
    pub const SCHEDULED_BY: &str = "paysync-follow-scheduled-by";
    /// On an end marker: the check number at which the chain ended.
    pub const ENDED: &str = "paysync-follow-ended";
    /// Every chain header (removed before new ones are written).
    pub const ALL: &[&str] = &[
        ORIGIN,
        CHECK,
        FIRST_SEEN,
        DUE,
        LAST_STATUS,
        SCHEDULED_BY,
        ENDED,
    ];
}

/// Why a re-check record's chain headers cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("re-check header `{0}` is missing or malformed")]
pub struct ChainHeaderError(pub &'static str);

fn find<'a>(hs: &'a [(Vec<u8>, Option<Vec<u8>>)], name: &str) -> Option<&'a str> {
    hs.iter()
        .rev()
        .find(|(k, _)| k == name.as_bytes())
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// When a re-check record is due, from its headers (the engine holds the head of
/// a re-check partition until then). `None` when the header is absent or bad: the
/// record is then due at once and fails decoding as a chain.
pub fn due_ms(hs: &[(Vec<u8>, Option<Vec<u8>>)]) -> Option<i64> {
    find(hs, headers::DUE)?.parse().ok()
}

/// The record that scheduled a re-check record, from its headers.
pub fn scheduled_by(hs: &[(Vec<u8>, Option<Vec<u8>>)]) -> Option<Position> {
    Position::parse(find(hs, headers::SCHEDULED_BY)?)
}

impl Chain {
    /// The chain a new request starts (check 1).
    pub fn start(origin: Position, now_ms: i64) -> Chain {
        Chain {
            origin,
            check: 1,
            first_seen_ms: now_ms,
            due_ms: now_ms,
            last_published: None,
            scheduled_by: None,
            ended_at: None,
        }
    }

    /// The chain state of a re-check record.
    pub fn from_headers(hs: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<Chain, ChainHeaderError> {
        let bad = ChainHeaderError;
        let origin = find(hs, headers::ORIGIN)
            .and_then(Position::parse)
            .ok_or(bad(headers::ORIGIN))?;
        let scheduled_by = match find(hs, headers::SCHEDULED_BY) {
            None => None,
            Some(v) => Some(Position::parse(v).ok_or(bad(headers::SCHEDULED_BY))?),
        };
        let ended_at = match find(hs, headers::ENDED) {
            None => None,
            Some(v) => Some(
                v.parse()
                    .ok()
                    .filter(|k| *k >= 1)
                    .ok_or(bad(headers::ENDED))?,
            ),
        };
        let number = |name: &'static str| -> Result<i64, ChainHeaderError> {
            find(hs, name).and_then(|v| v.parse().ok()).ok_or(bad(name))
        };
        let check = u32::try_from(number(headers::CHECK)?)
            .ok()
            .filter(|c| *c >= 2)
            .ok_or(bad(headers::CHECK))?;
        let last_published = match find(hs, headers::LAST_STATUS) {
            None => None,
            Some(s) => Some(PaymentStatus::from_symbol(s).ok_or(bad(headers::LAST_STATUS))?),
        };
        Ok(Chain {
            origin,
            check,
            first_seen_ms: number(headers::FIRST_SEEN)?,
            due_ms: number(headers::DUE)?,
            last_published,
            scheduled_by,
            ended_at,
        })
    }

    /// The headers of the re-check record for the next check, due at `due_ms`,
    /// scheduled by the record at `by` with `last_published` as the last
    /// published status.
    pub fn next_headers(
        &self,
        due_ms: i64,
        last_published: Option<PaymentStatus>,
        by: &Position,
    ) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let h = |k: &str, v: String| (k.as_bytes().to_vec(), Some(v.into_bytes()));
        let mut out = vec![
            h(headers::ORIGIN, self.origin.header_value()),
            h(headers::SCHEDULED_BY, by.header_value()),
            h(headers::CHECK, (self.check + 1).to_string()),
            h(headers::FIRST_SEEN, self.first_seen_ms.to_string()),
            h(headers::DUE, due_ms.to_string()),
        ];
        if let Some(s) = last_published {
            out.push(h(headers::LAST_STATUS, s.as_str().to_owned()));
        }
        out
    }

    /// The headers of an end marker: written, when a chain ends at a final status
    /// with slots left, where its next check would have gone (same re-check topic,
    /// same key, so the same partition). A repeat of this check after a crash that
    /// fails (a timeout, say) would carry the chain on; its re-check lands behind
    /// the marker, which tells the re-check engine that the chain had ended.
    pub fn end_marker_headers(
        &self,
        now_ms: i64,
        by: &Position,
    ) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut out = self.next_headers(now_ms, self.last_published, by);
        out.push((
            headers::ENDED.as_bytes().to_vec(),
            Some(self.check.to_string().into_bytes()),
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PaymentStatus::*;

    fn settings(publish: PublishMode) -> FollowSettings {
        FollowSettings {
            schedule: vec![(Duration::from_secs(1), 2), (Duration::from_secs(5), 1)],
            publish,
            share: 0.3,
        }
    }

    fn chain(check: u32, last: Option<PaymentStatus>) -> Chain {
        Chain {
            origin: Position {
                topic: "in".into(),
                partition: 2,
                offset: 40,
            },
            check,
            first_seen_ms: 1_000,
            due_ms: 2_000,
            last_published: last,
            scheduled_by: None,
            ended_at: None,
        }
    }

    fn by() -> Position {
        Position {
            topic: "in.recheck.1s".into(),
            partition: 2,
            offset: 77,
        }
    }

    #[test]
    fn the_schedule_expands_tiers_in_order() {
        let s = settings(PublishMode::Changes);
        let delays: Vec<_> = (1..=5).map(|k| s.delay_after(k)).collect();
        assert_eq!(
            delays,
            vec![
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(5)),
                None,
                None
            ]
        );
        assert_eq!(s.max_checks(), 4);
        assert_eq!(s.delay_after(0), None);
        // The default (src/config/raw.rs): Hyperswitch's 60 s once, then 300 s five times.
        let d = FollowSettings {
            schedule: vec![(Duration::from_secs(60), 1), (Duration::from_secs(300), 5)],
            publish: PublishMode::Changes,
            share: 0.3,
        };
        assert_eq!(d.delay_after(1), Some(Duration::from_secs(60)));
        assert_eq!(d.delay_after(2), Some(Duration::from_secs(300)));
        assert_eq!(d.delay_after(6), Some(Duration::from_secs(300)));
        assert_eq!(d.delay_after(7), None);
        assert_eq!(d.max_checks(), 7);
    }

    #[test]
    fn changes_publish_the_first_each_change_and_the_last() {
        let s = settings(PublishMode::Changes);
        // First check: published, continues.
        let d = decide(&s, &chain(1, None), Some((STARTED, false)));
        assert!(d.publish);
        assert_eq!(d.next, Some(Duration::from_secs(1)));
        assert_eq!(d.end, None);
        // Same status again mid-chain: silent.
        let d = decide(&s, &chain(2, Some(STARTED)), Some((STARTED, false)));
        assert!(!d.publish);
        // A change: published.
        let d = decide(&s, &chain(3, Some(STARTED)), Some((AUTHORIZED, false)));
        assert!(d.publish);
        assert_eq!(d.next, Some(Duration::from_secs(5)));
        // The last slot: published even when unchanged, and the chain is exhausted.
        let d = decide(&s, &chain(4, Some(AUTHORIZED)), Some((AUTHORIZED, false)));
        assert!(d.publish);
        assert_eq!(d.next, None);
        assert_eq!(d.end, Some(ChainEnd::Exhausted));
    }

    #[test]
    fn a_final_status_ends_the_chain_at_once() {
        for publish in [PublishMode::Changes, PublishMode::EveryCheck] {
            let d = decide(&settings(publish), &chain(1, None), Some((CHARGED, true)));
            assert_eq!(
                d,
                Decision {
                    publish: true,
                    next: None,
                    end: Some(ChainEnd::Final)
                }
            );
        }
    }

    #[test]
    fn every_check_publishes_every_check() {
        let s = settings(PublishMode::EveryCheck);
        let d = decide(&s, &chain(2, Some(STARTED)), Some((STARTED, false)));
        assert!(d.publish);
        assert!(d.next.is_some());
    }

    #[test]
    fn failed_checks_are_silent_until_the_last_slot() {
        let s = settings(PublishMode::EveryCheck);
        for check in 1..=3 {
            let d = decide(&s, &chain(check, None), None);
            assert!(!d.publish, "check {check}");
            assert!(d.next.is_some());
        }
        let d = decide(&s, &chain(4, Some(STARTED)), None);
        assert!(d.publish, "a chain that ends on a failure publishes it");
        assert_eq!(d.end, Some(ChainEnd::Exhausted));
    }

    #[test]
    fn chain_headers_round_trip_and_bad_ones_are_errors() {
        let c = chain(3, Some(AUTHORIZED));
        let hs = c.next_headers(9_000, Some(AUTHORIZED), &by());
        let next = Chain::from_headers(&hs).unwrap();
        assert_eq!(next.check, 4);
        assert_eq!(next.origin, c.origin);
        assert_eq!(next.first_seen_ms, 1_000);
        assert_eq!(next.due_ms, 9_000);
        assert_eq!(next.last_published, Some(AUTHORIZED));
        assert_eq!(due_ms(&hs), Some(9_000));
        assert_eq!(next.scheduled_by, Some(by()));
        assert_eq!(scheduled_by(&hs), Some(by()));
        // A topic name with dots and colons in the origin survives.
        let mut odd = chain(2, None);
        odd.origin.topic = "a.b:c".into();
        let hs = odd.next_headers(5, None, &by());
        assert_eq!(Chain::from_headers(&hs).unwrap().origin.topic, "a.b:c");
        assert_eq!(Chain::from_headers(&hs).unwrap().last_published, None);
        for (name, value) in [
            (headers::ORIGIN, "no-colons"),
            (headers::ORIGIN, ":1:2"),
            (headers::CHECK, "1"),
            (headers::CHECK, "x"),
            (headers::DUE, "soon"),
            (headers::LAST_STATUS, "PAID"),
            (headers::SCHEDULED_BY, "in:x:1"),
            (headers::ENDED, "0"),
        ] {
            let mut hs = c.next_headers(9_000, Some(AUTHORIZED), &by());
            hs.push((name.as_bytes().to_vec(), Some(value.as_bytes().to_vec())));
            assert_eq!(
                Chain::from_headers(&hs),
                Err(ChainHeaderError(name)),
                "{name}={value}"
            );
        }
        assert!(Chain::from_headers(&[]).is_err());
    }

    #[test]
    fn a_repeated_check_does_not_fork_its_chain() {
        let mut m = ChainMarks::new(10);
        let (c2, c3, c4) = (chain(2, None), chain(3, None), chain(4, None));
        // First run: 2 then 3, both done.
        assert!(m.claim(&c2) && m.settle(&c2, false));
        m.done(&c2);
        assert!(!m.claim(&c2), "a duplicate of a done check is skipped");
        assert!(m.claim(&c3));
        assert!(!m.claim(&c2), "below the highest claimed");
        assert!(m.settle(&c3, false));
        // 3 abandoned before done (a rebalance): its repeat runs.
        assert!(m.claim(&c3));
        m.done(&c3);
        // 4 ends the chain; a 5 scheduled by an earlier run is skipped.
        assert!(m.claim(&c4) && m.settle(&c4, true));
        assert!(
            m.claim(&c4),
            "the end, not yet acknowledged, may be repeated"
        );
        assert!(m.settle(&c4, true));
        m.done(&c4);
        assert!(!m.claim(&chain(5, None)), "above the chain's end");
    }

    /// Found by the simulation: a repeat of check 1 saw a final status, marked
    /// the chain ended, and was abandoned (its partition revoked) before it
    /// published; check 2, scheduled by the first run, was then skipped as past
    /// the chain's end, and the chain never ended.
    #[test]
    fn an_end_never_acknowledged_does_not_stop_the_next_check() {
        let mut m = ChainMarks::new(10);
        let (c1, c2) = (chain(1, None), chain(2, None));
        assert!(m.claim(&c1) && m.settle(&c1, false));
        m.done(&c1);
        // The repeat of 1 runs (its offset was not committed) and would end it.
        let mut repeat = ChainMarks::new(10);
        assert!(repeat.claim(&c1) && repeat.settle(&c1, true));
        // ... but is abandoned: no `done`. Check 2 still runs.
        assert!(repeat.claim(&c2), "the chain did not end: 2 carries it on");
    }

    #[test]
    fn a_check_overtaken_while_it_ran_publishes_nothing() {
        let mut m = ChainMarks::new(10);
        let (c4, c5) = (chain(4, None), chain(5, None));
        // A repeat of 4 (its offset was not committed) and the 5 it had
        // scheduled run at the same time, from two re-check topics.
        assert!(m.claim(&c4));
        assert!(m.claim(&c5));
        assert!(!m.settle(&c4, true), "4 would end the chain a second time");
        assert!(m.settle(&c5, true));
        // Or 4 settles first and ends the chain (acknowledged): 5 is skipped.
        let mut m = ChainMarks::new(10);
        assert!(m.claim(&c4) && m.settle(&c4, true));
        m.done(&c4);
        assert!(!m.claim(&c5));
    }

    #[test]
    fn an_end_marker_stops_a_chain_carried_on_by_a_repeat() {
        // Check 3 ended the chain (final) and wrote a marker; a repeat of check 3
        // after a crash failed and scheduled check 4, behind the marker.
        let c = chain(3, Some(AUTHORIZED));
        let hs = c.end_marker_headers(5_000, &by());
        let marker = Chain::from_headers(&hs).unwrap();
        assert_eq!((marker.check, marker.ended_at), (4, Some(3)));
        let mut m = ChainMarks::new(10);
        m.note_end(&marker.origin, 3);
        assert!(!m.claim(&chain(4, None)), "the repeat's check 4 is skipped");
        assert!(
            !m.claim(&chain(3, None)),
            "and so is another copy of check 3"
        );
    }

    #[test]
    fn chain_marks_are_bounded() {
        let mut m = ChainMarks::new(2);
        let other = |offset| Chain {
            origin: Position {
                topic: "in".into(),
                partition: 0,
                offset,
            },
            ..chain(2, None)
        };
        assert!(m.claim(&other(1)));
        m.done(&other(1));
        assert!(m.claim(&other(2)) && m.claim(&other(3)));
        assert_eq!(m.marks.len(), 2);
        assert!(m.claim(&other(1)), "forgotten: at least once again");
    }

    #[test]
    fn recheck_topics_are_named_by_whole_seconds() {
        assert_eq!(
            recheck_topic("payment-status-requests.recheck", Duration::from_secs(300)),
            "payment-status-requests.recheck.300s"
        );
    }
}
