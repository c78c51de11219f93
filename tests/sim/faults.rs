//! Fault schedules drawn from the seed: at each injection point a fake asks
//! whether to fail, and how. Every injection is counted by (fault class,
//! injection point), so the harness can show which faults the seeds reached and
//! fail when a class was never injected.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// One row of the fault table: a fault class at an injection point, and the
/// invariants it can break.
pub struct FaultClass {
    pub point: &'static str,
    pub fault: &'static str,
    pub breaks: &'static str,
}

/// Every fault the simulation injects. The coverage check fails when one of
/// these was never injected over the CI seeds of its guarantee.
pub const TABLE: &[FaultClass] = &[
    // The transactional producer (exactly once).
    FaultClass {
        point: "txn.send",
        fault: "queue_full",
        breaks: "liveness",
    },
    FaultClass {
        point: "txn.send",
        fault: "refused_too_large",
        breaks: "exactly once (a refused record's partition rewound alone), liveness",
    },
    FaultClass {
        point: "txn.send",
        fault: "refused_unknown_topic",
        breaks: "exactly once, liveness (stall, retried alone)",
    },
    FaultClass {
        point: "txn.send",
        fault: "refused_not_authorized",
        breaks: "exactly once, liveness (stall, retried alone)",
    },
    FaultClass {
        point: "txn.send",
        fault: "fatal",
        breaks: "exactly once (rebuild), liveness",
    },
    FaultClass {
        point: "txn.delivery",
        fault: "refused",
        breaks: "exactly once (abort, redo without it)",
    },
    FaultClass {
        point: "txn.delivery",
        fault: "refused_too_large",
        breaks: "exactly once (publish_refused once; a re-check ends its chain)",
    },
    FaultClass {
        point: "txn.send_offsets",
        fault: "timeout",
        breaks: "exactly once (positions sent twice)",
    },
    FaultClass {
        point: "txn.send_offsets",
        fault: "abortable",
        breaks: "exactly once (abort rewinds every partition)",
    },
    FaultClass {
        point: "txn.send_offsets",
        fault: "fenced",
        breaks: "exactly once, liveness (one rebuild, then stop)",
    },
    FaultClass {
        point: "txn.commit",
        fault: "timeout_not_landed",
        breaks: "exactly once (commit retried alone)",
    },
    FaultClass {
        point: "txn.commit",
        fault: "timeout_landed",
        breaks: "exactly once (an unknown outcome: rebuild asks the broker)",
    },
    FaultClass {
        point: "txn.commit",
        fault: "abortable",
        breaks: "exactly once",
    },
    FaultClass {
        point: "txn.commit",
        fault: "fatal_landed",
        breaks: "exactly once (rewinding to the ledger's positions repeats it)",
    },
    FaultClass {
        point: "txn.commit",
        fault: "fatal_not_landed",
        breaks: "exactly once (lost work)",
    },
    FaultClass {
        point: "txn.commit",
        fault: "fenced",
        breaks: "exactly once, liveness",
    },
    FaultClass {
        point: "txn.commit",
        fault: "hang",
        breaks: "liveness (the transaction outlives its timeout: fenced)",
    },
    FaultClass {
        point: "txn.abort",
        fault: "timeout",
        breaks: "liveness",
    },
    FaultClass {
        point: "txn.abort",
        fault: "fatal",
        breaks: "exactly once (rebuild)",
    },
    FaultClass {
        point: "txn.rebuild",
        fault: "fail",
        breaks: "liveness (rebuild retried, bounded)",
    },
    // The idempotent producer (at least once).
    FaultClass {
        point: "produce",
        fault: "retriable_not_landed",
        breaks: "nothing lost",
    },
    FaultClass {
        point: "produce",
        fault: "retriable_landed",
        breaks: "repeats only after a fault",
    },
    FaultClass {
        point: "produce",
        fault: "refused_too_large",
        breaks: "nothing lost (publish_refused)",
    },
    FaultClass {
        point: "produce",
        fault: "refused_unknown_topic",
        breaks: "liveness (stall until accepted)",
    },
    FaultClass {
        point: "produce",
        fault: "refused_not_authorized",
        breaks: "liveness (stall until accepted)",
    },
    FaultClass {
        point: "produce",
        fault: "fatal",
        breaks: "liveness (unhealthy: restarted)",
    },
    // The consumer and its group.
    FaultClass {
        point: "consumer.commit",
        fault: "refused",
        breaks: "nothing lost, liveness",
    },
    FaultClass {
        point: "consumer.committed",
        fault: "unavailable",
        breaks: "exactly once (no fallback to own positions)",
    },
    FaultClass {
        point: "group",
        fault: "rebalance",
        breaks: "exactly once, nothing lost",
    },
    FaultClass {
        point: "group",
        fault: "lost",
        breaks: "exactly once (zombie fenced by generation)",
    },
    FaultClass {
        point: "member",
        fault: "crash",
        breaks: "exactly once, nothing lost, liveness",
    },
    // The connector.
    FaultClass {
        point: "connector",
        fault: "429",
        breaks: "liveness (throttling is lag)",
    },
    FaultClass {
        point: "connector",
        fault: "429_absurd_retry_after",
        breaks: "no panic, liveness",
    },
    FaultClass {
        point: "connector",
        fault: "429_malformed_retry_after",
        breaks: "no panic",
    },
    FaultClass {
        point: "connector",
        fault: "429_http_date",
        breaks: "liveness",
    },
    FaultClass {
        point: "connector",
        fault: "429_forever",
        breaks: "liveness (one payment, not the account)",
    },
    FaultClass {
        point: "connector",
        fault: "503",
        breaks: "liveness",
    },
    FaultClass {
        point: "connector",
        fault: "outage",
        breaks: "liveness (the circuit opens, requests wait; its probe must be answered)",
    },
    FaultClass {
        point: "connector",
        fault: "500",
        breaks: "no FAILURE for a technical failure",
    },
    FaultClass {
        point: "connector",
        fault: "timeout",
        breaks: "liveness",
    },
    FaultClass {
        point: "connector",
        fault: "transport",
        breaks: "liveness",
    },
    FaultClass {
        point: "connector",
        fault: "body_near_limit",
        breaks: "exactly once (an event over the record limit)",
    },
    FaultClass {
        point: "connector",
        fault: "body_over_limit",
        breaks: "no panic",
    },
    FaultClass {
        point: "connector",
        fault: "panic_in_translation",
        breaks: "no panic escapes, nothing lost",
    },
    FaultClass {
        point: "connector",
        fault: "404",
        breaks: "webhook checks publish nothing",
    },
];

/// The faults of one run.
pub struct Faults {
    on: AtomicBool,
    rng: Mutex<fastrand::Rng>,
    /// How often each point fails while faults are on.
    rate: f64,
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Every draw at an injection point, with its virtual time (for replay
    /// comparisons).
    log: Mutex<Vec<String>>,
    started: paysync::clock::Instant,
}

impl Faults {
    pub fn new(seed: u64, rate: f64) -> Self {
        Faults {
            on: AtomicBool::new(true),
            rng: Mutex::new(fastrand::Rng::with_seed(seed ^ 0x5eed_fa17)),
            rate,
            counts: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
            started: paysync::clock::Instant::now(),
        }
    }

    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Faults stop (the liveness phase).
    pub fn stop(&self) {
        self.on.store(false, Ordering::Relaxed);
    }

    /// A draw in [0, 1).
    pub fn f64(&self) -> f64 {
        self.rng.lock().unwrap().f64()
    }

    /// A draw in `range`.
    pub fn range(&self, range: std::ops::Range<u64>) -> u64 {
        self.rng.lock().unwrap().u64(range)
    }

    /// True with probability `p`.
    pub fn chance(&self, p: f64) -> bool {
        self.f64() < p
    }

    /// At `point`, while faults are on: one of `faults` (weighted), counted, or
    /// none. The point fails with the run's rate times `scale`.
    pub fn draw(
        &self,
        point: &'static str,
        scale: f64,
        faults: &[(&'static str, f64)],
    ) -> Option<&'static str> {
        if !self.on() || faults.is_empty() {
            return None;
        }
        self.log.lock().unwrap().push(format!(
            "{:?} {point}",
            paysync::clock::Instant::now().saturating_duration_since(self.started)
        ));
        if !self.chance(self.rate * scale) {
            return None;
        }
        let total: f64 = faults.iter().map(|(_, w)| w).sum();
        let mut pick = self.f64() * total;
        for (fault, w) in faults {
            if pick < *w {
                self.count(point, fault);
                return Some(fault);
            }
            pick -= w;
        }
        None
    }

    /// Counts a fault injected outside `draw` (a crash, a payment throttled
    /// forever, ...).
    pub fn count(&self, point: &'static str, fault: &'static str) {
        *self
            .counts
            .lock()
            .unwrap()
            .entry((point, fault))
            .or_default() += 1;
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn counts(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.counts.lock().unwrap().clone()
    }

    /// Faults that can make at-least-once repeat work.
    pub fn repeat_capable(&self) -> u64 {
        self.counts()
            .iter()
            .filter(|((point, fault), _)| {
                matches!(
                    (*point, *fault),
                    ("produce", "retriable_landed")
                        | ("consumer.commit", _)
                        | ("group", _)
                        | ("member", _)
                        | ("produce", "fatal")
                )
            })
            .map(|(_, n)| n)
            .sum()
    }
}
