//! Dead letters as `paysync redrive` sees them (pure): a letter's reason and
//! redrive count, read from paysync's own headers (the last of each name, since
//! a dead letter appends paysync's headers after the input's own); which letters
//! a run sends; the headers a redriven request carries; and where each reason's
//! redrive stands per partition ([`Coverage`], kept in the commit metadata of the
//! redrive group, so a letter goes back once whatever filters earlier runs used).
//!
//! Letters fall in two groups. Those whose reason can succeed once something
//! outside the record changes (an account added, a connector back, a bug fixed)
//! are sent by a run without `--reason`. Those whose bytes can never be processed
//! as they are (not JSON, no id, too large, ...) are sent only when `--reason`
//! names them, so a plain redrive never loops them through the dead-letter topic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::codec::RejectCode;

/// A header as bytes: name, and value (null when the producer sent none).
pub type Header = (Vec<u8>, Option<Vec<u8>>);

/// Header names paysync writes on dead letters and redriven requests.
pub mod headers {
    /// Why the record was dead-lettered.
    pub const ERROR_CODE: &str = "paysync-error-code";
    /// How many times the letter was redriven before (0 when never).
    pub const REDRIVE_COUNT: &str = "paysync-redrive-count";
    /// `<topic>:<partition>:<offset>` of the letter a redriven request came from.
    pub const REDRIVEN_FROM: &str = "paysync-redriven-from";
    /// The value was cut to fit the record limit: it cannot be sent back as it was.
    pub const VALUE_TRUNCATED: &str = "paysync-value-truncated";
    /// Every header paysync writes starts with this (stripped before a redrive).
    pub const PREFIX: &[u8] = b"paysync-";
}

/// A letter's reason, as redrive groups it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// One of paysync's own codes.
    Code(RejectCode),
    /// No `paysync-error-code` at all.
    None,
    /// A code this version does not know.
    Other,
}

impl Reason {
    /// Every reason, codes first.
    pub fn all() -> impl Iterator<Item = Reason> {
        RejectCode::ALL
            .iter()
            .map(|c| Reason::Code(*c))
            .chain([Reason::None, Reason::Other])
    }

    /// Its name on the command line, in reports and in the position metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Code(c) => c.as_str(),
            Reason::None => "none",
            Reason::Other => "other",
        }
    }

    /// The reason with this name.
    pub fn parse(name: &str) -> Option<Reason> {
        Reason::all().find(|r| r.as_str() == name)
    }

    /// A letter of this reason can succeed once something outside the record
    /// changes: a run without `--reason` sends it.
    pub fn recoverable(self) -> bool {
        match self {
            Reason::Code(c) => c.recoverable(),
            Reason::None | Reason::Other => false,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn last<'a>(hs: &'a [Header], name: &str) -> Option<&'a [u8]> {
    hs.iter()
        .rev()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| v.as_deref().unwrap_or_default())
}

/// A letter's reason: paysync's own `paysync-error-code`, the last one (the
/// input's own headers come first, so one the input carried never counts).
pub fn reason(hs: &[Header]) -> Reason {
    match last(hs, headers::ERROR_CODE) {
        None => Reason::None,
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(Reason::parse)
            .filter(|r| *r != Reason::None && *r != Reason::Other)
            .unwrap_or(Reason::Other),
    }
}

/// How many times the record was redriven: paysync's own last
/// `paysync-redrive-count` (0 when absent or not a number).
pub fn redrive_count(hs: &[Header]) -> u32 {
    last(hs, headers::REDRIVE_COUNT)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The redrive count a dead letter of this input carries: the input's own when
/// it is a redriven request (it has `paysync-redriven-from`), else 0. A dead
/// letter writes it after the input's headers, so it is the one redrive reads.
pub fn count_to_carry(input: &[Header]) -> u32 {
    if last(input, headers::REDRIVEN_FROM).is_some() {
        redrive_count(input)
    } else {
        0
    }
}

/// Which reasons a run sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// No `--reason`: the recoverable ones.
    Recoverable,
    /// `--reason` named these.
    Named(BTreeSet<Reason>),
}

impl Selection {
    /// From the `--reason` arguments; an unknown name is an error that lists the
    /// known ones.
    pub fn from_args(names: &[String]) -> Result<Selection, String> {
        if names.is_empty() {
            return Ok(Selection::Recoverable);
        }
        let mut set = BTreeSet::new();
        for n in names {
            let r = Reason::parse(n).ok_or_else(|| {
                format!(
                    "--reason {n}: not a dead-letter reason; one of {}",
                    Reason::all()
                        .map(Reason::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            set.insert(r);
        }
        Ok(Selection::Named(set))
    }

    /// True when this run sends letters of `reason`.
    pub fn includes(&self, reason: Reason) -> bool {
        match self {
            Selection::Recoverable => reason.recoverable(),
            Selection::Named(set) => set.contains(&reason),
        }
    }

    /// The reasons this run sends.
    pub fn reasons(&self) -> Vec<Reason> {
        Reason::all().filter(|r| self.includes(*r)).collect()
    }
}

/// Where each reason's redrive stands in one partition of the dead-letter topic:
/// letters of a reason below its offset were handled by an earlier run (sent,
/// or skipped for good: truncated, redriven too often). Kept as the commit
/// metadata of the redrive group; the committed offset itself is the lowest of
/// them (everything below it is handled for every reason).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage(BTreeMap<Reason, i64>);

/// The version tag of the encoded [`Coverage`].
const COVERAGE_TAG: &str = "paysync-redrive/1";

impl Coverage {
    /// Every reason covered up to `offset` (a position committed by a version
    /// of paysync that kept no metadata: its runs sent every reason).
    pub fn all_up_to(offset: i64) -> Coverage {
        Coverage(Reason::all().map(|r| (r, offset)).collect())
    }

    /// The offset below which `reason` is handled.
    pub fn covered(&self, reason: Reason) -> i64 {
        self.0.get(&reason).copied().unwrap_or(0)
    }

    /// Where a run for `selection` starts reading (the lowest of its reasons).
    pub fn start(&self, selection: &Selection) -> i64 {
        selection
            .reasons()
            .into_iter()
            .map(|r| self.covered(r))
            .min()
            .unwrap_or(0)
    }

    /// A run for `selection` handled every letter below `to`.
    pub fn advance(&mut self, selection: &Selection, to: i64) {
        for r in selection.reasons() {
            let c = self.0.entry(r).or_insert(0);
            *c = (*c).max(to);
        }
    }

    /// The offset below which every reason is handled (the committed offset).
    pub fn base(&self) -> i64 {
        Reason::all().map(|r| self.covered(r)).min().unwrap_or(0)
    }

    /// As commit metadata: `paysync-redrive/1 unknown_merchant=12 none=5`
    /// (reasons at 0 left out; at most ~25 entries, well under Kafka's 4 KB).
    pub fn encode(&self) -> String {
        let mut out = String::from(COVERAGE_TAG);
        for (r, o) in self.0.iter().filter(|(_, o)| **o > 0) {
            out.push(' ');
            out.push_str(r.as_str());
            out.push('=');
            out.push_str(&o.to_string());
        }
        out
    }

    /// From commit metadata written by [`Coverage::encode`]. An empty string is a
    /// position without metadata (`None`: the caller decides what it means).
    pub fn decode(metadata: &str) -> Result<Option<Coverage>, String> {
        let metadata = metadata.trim();
        if metadata.is_empty() {
            return Ok(None);
        }
        let mut parts = metadata.split(' ');
        if parts.next() != Some(COVERAGE_TAG) {
            return Err(format!(
                "commit metadata `{}` was not written by paysync redrive",
                metadata.chars().take(60).collect::<String>()
            ));
        }
        let mut map = BTreeMap::new();
        for part in parts.filter(|p| !p.is_empty()) {
            let (name, offset) = part
                .split_once('=')
                .ok_or_else(|| format!("malformed position `{part}`"))?;
            let reason = Reason::parse(name).ok_or_else(|| format!("unknown reason `{name}`"))?;
            let offset: i64 = offset
                .parse()
                .ok()
                .filter(|o| *o >= 0)
                .ok_or_else(|| format!("malformed offset in `{part}`"))?;
            map.insert(reason, offset);
        }
        Ok(Some(Coverage(map)))
    }
}

/// What a run does with one letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it back; the redriven request carries this count.
    Send {
        /// The new `paysync-redrive-count`.
        count: u32,
    },
    /// An earlier run already handled it (`--force` sends it again).
    Handled,
    /// Not one of the reasons this run sends.
    NotSelected,
    /// Its value was cut to fit: it cannot be sent back as it was (listed).
    Truncated,
    /// Redriven `--max-redrives` times already (listed).
    TooManyRedrives {
        /// How many times it was redriven.
        count: u32,
    },
}

/// A run's choices.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The reasons it sends.
    pub selection: Selection,
    /// Send letters earlier runs handled.
    pub force: bool,
    /// Skip letters redriven this many times.
    pub max_redrives: u32,
}

impl Policy {
    /// The verdict on the letter at `offset` with `hs`, given where its partition's
    /// redrive stands.
    pub fn decide(&self, hs: &[Header], offset: i64, coverage: &Coverage) -> (Reason, Verdict) {
        let reason = reason(hs);
        if !self.selection.includes(reason) {
            return (reason, Verdict::NotSelected);
        }
        if !self.force && offset < coverage.covered(reason) {
            return (reason, Verdict::Handled);
        }
        if last(hs, headers::VALUE_TRUNCATED).is_some() {
            return (reason, Verdict::Truncated);
        }
        let count = redrive_count(hs);
        if count >= self.max_redrives {
            return (reason, Verdict::TooManyRedrives { count });
        }
        (reason, Verdict::Send { count: count + 1 })
    }
}

/// The headers a redriven request carries: the letter's own minus every
/// `paysync-*` header, plus where it came from and its redrive count.
pub fn redriven_headers(letter: &[Header], from: &str, count: u32) -> Vec<Header> {
    let mut out: Vec<Header> = letter
        .iter()
        .filter(|(k, _)| !k.starts_with(headers::PREFIX))
        .cloned()
        .collect();
    out.push((
        headers::REDRIVEN_FROM.as_bytes().to_vec(),
        Some(from.as_bytes().to_vec()),
    ));
    out.push((
        headers::REDRIVE_COUNT.as_bytes().to_vec(),
        Some(count.to_string().into_bytes()),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &str) -> Header {
        (name.as_bytes().to_vec(), Some(value.as_bytes().to_vec()))
    }

    fn policy(reasons: &[&str]) -> Policy {
        Policy {
            selection: Selection::from_args(
                &reasons.iter().map(|r| (*r).to_owned()).collect::<Vec<_>>(),
            )
            .unwrap(),
            force: false,
            max_redrives: 3,
        }
    }

    #[test]
    fn the_reason_is_paysyncs_last_error_code_never_the_inputs() {
        // Audit: the input carried its own `paysync-error-code: unknown_merchant`
        // and a filter read the first such header.
        let letter = [
            h("paysync-error-code", "unknown_merchant"),
            h("x-request-id", "r"),
            h("paysync-error-code", "invalid_json"),
        ];
        assert_eq!(reason(&letter), Reason::Code(RejectCode::InvalidJson));
        assert_eq!(reason(&[h("x", "y")]), Reason::None);
        assert_eq!(
            reason(&[h("paysync-error-code", "from_the_future")]),
            Reason::Other
        );
        assert_eq!(reason(&[h("paysync-error-code", "none")]), Reason::Other);
        let (r, v) = policy(&["unknown_merchant"]).decide(&letter, 0, &Coverage::default());
        assert_eq!(
            (r, v),
            (Reason::Code(RejectCode::InvalidJson), Verdict::NotSelected)
        );
    }

    #[test]
    fn without_reason_only_letters_that_can_succeed_later_are_sent() {
        let p = policy(&[]);
        let recoverable = [
            "unknown_merchant",
            "unknown_connector",
            "unsupported_payment_method",
            "internal_error",
            "publish_refused",
        ];
        for code in Reason::all().map(Reason::as_str) {
            let (_, v) = p.decide(&[h("paysync-error-code", code)], 0, &Coverage::default());
            let sent = matches!(v, Verdict::Send { .. });
            assert_eq!(sent, recoverable.contains(&code), "{code}");
        }
        let (_, v) = p.decide(&[h("x", "no reason at all")], 0, &Coverage::default());
        assert_eq!(v, Verdict::NotSelected);
        // Named, even a permanent one is sent.
        let (_, v) = policy(&["invalid_json"]).decide(
            &[h("paysync-error-code", "invalid_json")],
            0,
            &Coverage::default(),
        );
        assert_eq!(v, Verdict::Send { count: 1 });
        assert!(Selection::from_args(&["nonsense".into()]).is_err());
    }

    #[test]
    fn a_letter_is_sent_once_whatever_filters_earlier_runs_used() {
        // Audit: each filter had its own position, so an unfiltered run after
        // `--reason unknown_merchant` sent those letters again.
        let merchant = [h("paysync-error-code", "unknown_merchant")];
        let internal = [h("paysync-error-code", "internal_error")];
        let mut cov = Coverage::default();
        let first = policy(&["unknown_merchant"]);
        assert!(matches!(
            first.decide(&merchant, 5, &cov).1,
            Verdict::Send { .. }
        ));
        assert_eq!(first.decide(&internal, 6, &cov).1, Verdict::NotSelected);
        cov.advance(&first.selection, 10);
        let plain = policy(&[]);
        assert_eq!(plain.decide(&merchant, 5, &cov).1, Verdict::Handled);
        assert!(
            matches!(plain.decide(&internal, 6, &cov).1, Verdict::Send { .. }),
            "a letter the first run did not select is still sent"
        );
        assert_eq!(
            cov.start(&plain.selection),
            0,
            "internal_error was never covered"
        );
        assert_eq!(cov.start(&first.selection), 10);
        let forced = Policy {
            force: true,
            ..policy(&["unknown_merchant"])
        };
        assert!(matches!(
            forced.decide(&merchant, 5, &cov).1,
            Verdict::Send { .. }
        ));
    }

    #[test]
    fn redrive_counts_stop_loops_and_come_from_paysyncs_last_header() {
        let p = policy(&[]);
        let letter = |count: &str| {
            vec![
                h("paysync-redrive-count", "0"),
                h("paysync-redriven-from", "dlq:0:1"),
                h("paysync-redrive-count", count),
                h("paysync-error-code", "unknown_merchant"),
            ]
        };
        assert_eq!(
            p.decide(&letter("2"), 0, &Coverage::default()).1,
            Verdict::Send { count: 3 }
        );
        assert_eq!(
            p.decide(&letter("3"), 0, &Coverage::default()).1,
            Verdict::TooManyRedrives { count: 3 }
        );
        // What a dead letter carries: the input's count only if it was redriven.
        assert_eq!(count_to_carry(&letter("2")), 2);
        assert_eq!(count_to_carry(&[h("paysync-redrive-count", "9")]), 0);
        let mut truncated = letter("0");
        truncated.push(h("paysync-value-truncated", "true"));
        assert_eq!(
            p.decide(&truncated, 0, &Coverage::default()).1,
            Verdict::Truncated
        );
    }

    #[test]
    fn redriven_headers_drop_paysyncs_and_say_where_from_and_how_often() {
        let letter: Vec<Header> = vec![
            h("x-request-id", "r-1"),
            h("paysync-error-code", "unknown_merchant"),
            (b"\xff\xfe".to_vec(), None),
            h("paysync-redrive-count", "1"),
        ];
        assert_eq!(
            redriven_headers(&letter, "dlq:0:3", 2),
            vec![
                h("x-request-id", "r-1"),
                (b"\xff\xfe".to_vec(), None),
                h("paysync-redriven-from", "dlq:0:3"),
                h("paysync-redrive-count", "2"),
            ]
        );
    }

    #[test]
    fn coverage_round_trips_through_commit_metadata_and_fits() {
        let mut cov = Coverage::default();
        assert_eq!(Coverage::decode(&cov.encode()).unwrap(), Some(cov.clone()));
        cov.advance(&Selection::Recoverable, 1_000_000_000_000);
        cov.advance(&Selection::from_args(&["none".into()]).unwrap(), 7);
        let text = cov.encode();
        assert_eq!(Coverage::decode(&text).unwrap(), Some(cov.clone()));
        assert_eq!(cov.base(), 0, "invalid_json was never covered");
        let all = Coverage::all_up_to(i64::MAX);
        assert!(all.encode().len() < 1024, "{}", all.encode().len());
        assert_eq!(all.base(), i64::MAX);
        assert_eq!(Coverage::decode("").unwrap(), None);
        for bad in [
            "something else",
            "paysync-redrive/1 nope=3",
            "paysync-redrive/1 none=-1",
            "paysync-redrive/1 none",
        ] {
            assert!(Coverage::decode(bad).is_err(), "{bad}");
        }
    }
}
