//! Deterministic simulation of the delivery core: paysync's real engine,
//! dispatcher, ledger, follow chains, limiter, committer and transactions over
//! in-memory fakes of Kafka and the processor, on one thread in virtual time
//! (tokio's paused clock), with every fault drawn from a seed. A seed replays
//! exactly; a failing one prints the command that replays it.
//!
//!     cargo test --test sim                        # the CI seeds of each guarantee
//!     PAYSYNC_SIM_SEEDS=1000000 cargo test --release --test sim -- --nocapture
//!     PAYSYNC_SIM_SEED=1234 PAYSYNC_SIM_GUARANTEE=exactly_once \
//!         cargo test --test sim replay -- --ignored --nocapture

mod clients;
mod cluster;
mod conformance;
mod connector;
mod faults;
mod model;
mod world;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;
use std::time::Duration;

use world::{Outcome, Plan, World};

/// Seeds each guarantee runs in CI.
const CI_SEEDS: u64 = 2_000;

thread_local! {
    /// Panics on this thread that were not injected.
    static UNEXPECTED_PANICS: Cell<u64> = const { Cell::new(0) };
}

/// Counts panics that escape the injected ones (those print as usual).
fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let injected = info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|m| m.contains("(injected)"));
            if !injected {
                UNEXPECTED_PANICS.with(|c| c.set(c.get() + 1));
                default(info);
            }
        }));
    });
}

/// Runs one seed on a fresh single-threaded runtime with a paused clock.
pub fn run(seed: u64, exactly_once: bool) -> Outcome {
    watch_panics();
    if let Ok(filter) = std::env::var("PAYSYNC_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    UNEXPECTED_PANICS.with(|c| c.set(0));
    let plan = Plan::draw(seed, exactly_once);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let mut outcome = runtime.block_on(async move {
        // Every random draw and wall-clock read of the code under test comes
        // from this thread's seeded generator and tokio's virtual clock.
        fastrand::seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        paysync::clock::simulate(world::EPOCH_MS);
        World::new(plan).run().await
    });
    drop(runtime);
    let panics = UNEXPECTED_PANICS.with(Cell::get);
    if panics > 0 {
        outcome
            .violations
            .push(format!("{panics} panic(s) escaped (not injected)"));
    }
    outcome
}

fn guarantee_name(exactly_once: bool) -> &'static str {
    if exactly_once {
        "exactly_once"
    } else {
        "at_least_once"
    }
}

fn replay_command(seed: u64, exactly_once: bool) -> String {
    format!(
        "PAYSYNC_SIM_SEED={seed} PAYSYNC_SIM_GUARANTEE={} cargo test --test sim replay -- --ignored --nocapture",
        guarantee_name(exactly_once)
    )
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs the seeds of one guarantee; fails on the first violation with the
/// command that replays it, and when a fault class was never injected.
fn seeds(exactly_once: bool) {
    let from = env_u64("PAYSYNC_SIM_FROM", 0);
    let count = env_u64("PAYSYNC_SIM_SEEDS", CI_SEEDS);
    let started = std::time::Instant::now();
    let mut counts: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
    let mut settle = Duration::ZERO;
    let mut answered = 0;
    let mut repeats = 0;
    for seed in from..from + count {
        let outcome = run(seed, exactly_once);
        if !outcome.violations.is_empty() {
            panic!(
                "seed {seed} ({}) broke an invariant:\n  {}\nplan: {:?}\nreplay: {}",
                guarantee_name(exactly_once),
                outcome.violations.join("\n  "),
                outcome.plan,
                replay_command(seed, exactly_once)
            );
        }
        for (k, n) in outcome.counts {
            *counts.entry(k).or_default() += n;
        }
        settle = settle.max(outcome.settled_in.unwrap_or_default());
        answered += outcome.answered;
        repeats += outcome.repeats;
    }
    println!(
        "sim {}: {count} seeds from {from} in {:.1}s wall; {answered} requests answered, {repeats} repeats; at rest at most {}s after faults stopped",
        guarantee_name(exactly_once),
        started.elapsed().as_secs_f64(),
        settle.as_secs()
    );
    println!(
        "| fault | injected at | {} | can break |",
        guarantee_name(exactly_once)
    );
    println!("|---|---|---|---|");
    let mut missing = Vec::new();
    for row in faults::TABLE {
        let applies = match row.point {
            p if p.starts_with("txn.") => exactly_once,
            "produce" | "consumer.commit" => !exactly_once,
            _ => true,
        };
        if !applies {
            continue;
        }
        let n = counts.get(&(row.point, row.fault)).copied().unwrap_or(0);
        println!("| {} | {} | {n} | {} |", row.fault, row.point, row.breaks);
        if n == 0 {
            missing.push(format!("{} at {}", row.fault, row.point));
        }
    }
    // A full CI run must reach every fault class; a shorter one (a replay, a
    // partial range) is not held to it.
    if count >= CI_SEEDS {
        assert!(
            missing.is_empty(),
            "fault classes never injected over {count} seeds: {}",
            missing.join(", ")
        );
    }
}

#[test]
fn exactly_once_holds_for_every_seed() {
    seeds(true);
}

#[test]
fn at_least_once_holds_for_every_seed() {
    seeds(false);
}

/// Seeds the long runs broke, beyond the CI range, replayed on every run:
/// 8137 and 22942 (before the fixes of a chain counted as ended before its
/// end was acknowledged, and of `paysync_in_flight` set by one engine over the
/// others), 69585 (a false alarm: a place held after a refusal was still held
/// when the run came to rest; the check now waits for the hold to end).
#[test]
fn seeds_the_long_runs_broke_hold() {
    for (seed, exactly_once) in [(8137, false), (22942, true), (69585, true)] {
        let outcome = run(seed, exactly_once);
        assert!(
            outcome.violations.is_empty(),
            "seed {seed} ({}): {:?}\nreplay: {}",
            guarantee_name(exactly_once),
            outcome.violations,
            replay_command(seed, exactly_once)
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    for exactly_once in [true, false] {
        for seed in 0..8 {
            let a = run(seed, exactly_once);
            let b = run(seed, exactly_once);
            assert!(
                a.trace.len() > 10,
                "a trace worth comparing: {}",
                a.trace.len()
            );
            let n = a.trace.len().max(b.trace.len());
            if let Some(i) = (0..n).find(|i| a.trace.get(*i) != b.trace.get(*i)) {
                let around = |t: &[String]| t[i.saturating_sub(3)..(i + 3).min(t.len())].to_vec();
                panic!(
                    "seed {seed} ({}) replays differently from line {i}: {:#?} then {:#?}",
                    guarantee_name(exactly_once),
                    around(&a.trace),
                    around(&b.trace)
                );
            }
            assert_eq!(a.counts, b.counts);
            assert_eq!(a.settled_in, b.settled_in);
        }
    }
}

/// Each hole this project fixed, brought back behind a test-only switch, is
/// found by the simulation within the CI seeds of a guarantee: how many
/// seeds each took. Holes the simulation cannot express are covered by the
/// tests the README lists beside this table.
#[cfg(feature = "mutations")]
#[test]
fn mutations_are_found() {
    const MUTATIONS: &[(&str, bool, &str)] = &[
        (
            "refusal_rewinds_one_partition",
            true,
            "a record refused when queued rewinds only its partition",
        ),
        (
            "commit_retry_resends_offsets",
            true,
            "a timed-out commit is retried by sending the positions again",
        ),
        (
            "rebuild_falls_back_to_ledger",
            true,
            "after a rebuild, unreadable committed positions fall back to the ledger's",
        ),
        (
            "stall_retry_anytime",
            true,
            "a stalled record is retried before the work ahead of it committed",
        ),
        (
            "stall_retry_with_handovers",
            true,
            "hand-overs join a stalled record's own transaction",
        ),
        (
            "revoke_keeps_open_records",
            true,
            "a revocation leaves its partitions' records in the open transaction",
        ),
        (
            "commit_partial_job",
            true,
            "a transaction commits half of a job's records",
        ),
        (
            "probe_leak",
            false,
            "a circuit breaker probe dropped unrecorded",
        ),
        (
            "throttled_forever",
            false,
            "a request throttled forever never ends",
        ),
        (
            "retry_after_unchecked",
            false,
            "an absurd Retry-After overflows the limiter",
        ),
        (
            "event_not_fitted",
            false,
            "an event over the record limit only for its raw fields is refused",
        ),
        (
            "second_stall_replaces_first",
            true,
            "a second refused record in a stalled partition replaces the first",
        ),
    ];
    let mut missed = Vec::new();
    println!("| hole | guarantee | seeds until found |");
    println!("|---|---|---|");
    let only = std::env::var("PAYSYNC_SIM_MUTATION").ok();
    for (name, exactly_once, what) in MUTATIONS {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        paysync::mutation::set(Some(name));
        let budget = env_u64("PAYSYNC_SIM_SEEDS", CI_SEEDS);
        let found = (0..budget).find(|seed| !run(*seed, *exactly_once).violations.is_empty());
        paysync::mutation::set(None);
        match found {
            Some(seed) => println!(
                "| {what} (`{name}`) | {} | {} |",
                guarantee_name(*exactly_once),
                seed + 1
            ),
            None => {
                println!(
                    "| {what} (`{name}`) | {} | not found |",
                    guarantee_name(*exactly_once)
                );
                missed.push(*name);
            }
        }
    }
    assert!(
        missed.is_empty(),
        "holes the simulation did not find: {missed:?}"
    );
}

/// A hole the long run found (seed 8137 of 100,000, before its fix), which the
/// CI seeds do not reach: its check takes 10,000 seeds
/// (`cargo test --release --features mutations --test sim long_mutations -- --ignored`).
#[cfg(feature = "mutations")]
#[test]
#[ignore = "a long run: cargo test --release --features mutations --test sim long_mutations -- --ignored"]
fn long_mutations_are_found() {
    let name = "chain_ended_before_acknowledged";
    paysync::mutation::set(Some(name));
    let found = (0..20_000).find(|seed| !run(*seed, false).violations.is_empty());
    paysync::mutation::set(None);
    println!("| a chain counts as ended before its end was acknowledged (`{name}`) | at_least_once | {found:?} |");
    assert!(found.is_some(), "{name} was not found in 20,000 seeds");
}

#[test]
#[ignore = "replays one seed: PAYSYNC_SIM_SEED=<n> PAYSYNC_SIM_GUARANTEE=exactly_once|at_least_once"]
fn replay() {
    let seed = env_u64("PAYSYNC_SIM_SEED", 0);
    let exactly_once = std::env::var("PAYSYNC_SIM_GUARANTEE").as_deref() != Ok("at_least_once");
    let outcome = run(seed, exactly_once);
    for line in &outcome.trace {
        println!("{line}");
    }
    println!("plan: {:?}", outcome.plan);
    println!("counts: {:?}", outcome.counts);
    println!("at rest after faults: {:?}", outcome.settled_in);
    println!(
        "answered: {}, repeats: {}",
        outcome.answered, outcome.repeats
    );
    assert!(
        outcome.violations.is_empty(),
        "{}",
        outcome.violations.join("\n")
    );
}
