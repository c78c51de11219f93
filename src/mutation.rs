//! Test-only switches that bring back holes this project fixed, so that the
//! deterministic simulation can show it finds each one (`cargo test
//! --features mutations --test sim mutations`). Compiled only with the
//! `mutations` feature, which no release enables. Per thread: the simulation
//! runs on one thread, and tests on other threads are not affected.

use std::cell::RefCell;

thread_local! {
    static ACTIVE: RefCell<Option<&'static str>> = const { RefCell::new(None) };
}

/// Brings back the hole `name` on this thread (`None`: none).
pub fn set(name: Option<&'static str>) {
    ACTIVE.with(|a| *a.borrow_mut() = name);
}

/// True when the hole `name` is back on this thread.
pub fn on(name: &str) -> bool {
    ACTIVE.with(|a| *a.borrow() == Some(name))
}
