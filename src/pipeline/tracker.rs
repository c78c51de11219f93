//! Per-partition commit watermark: offsets are tracked in the order they were
//! consumed, may finish in any order, and the committable position is the first
//! unfinished offset (or one past the last finished one). It never moves past an
//! unfinished offset.

use std::collections::VecDeque;

/// Offsets of one partition that were accepted and not yet committed past.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// (offset, done), ascending.
    entries: VecDeque<(i64, bool)>,
    /// One past the highest offset ever pushed.
    next: Option<i64>,
    /// The highest finished offset.
    highest_done: Option<i64>,
    /// Entries not finished yet.
    unfinished: usize,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a consumed offset. Offsets must increase; a repeated or older offset
    /// (after a seek) is ignored and `false` returned.
    pub fn push(&mut self, offset: i64) -> bool {
        if self.next.is_some_and(|n| offset < n) {
            return false;
        }
        self.entries.push_back((offset, false));
        self.unfinished += 1;
        self.next = Some(offset.saturating_add(1));
        true
    }

    /// One past the highest offset pushed.
    pub fn next(&self) -> Option<i64> {
        self.next
    }

    /// Marks an offset finished; returns `false` if it is not tracked.
    pub fn complete(&mut self, offset: i64) -> bool {
        let Ok(i) = self.entries.binary_search_by_key(&offset, |(o, _)| *o) else {
            return false;
        };
        if self.entries[i].1 {
            return true;
        }
        self.entries[i].1 = true;
        self.unfinished -= 1;
        self.highest_done = Some(self.highest_done.map_or(offset, |h| h.max(offset)));
        while self.entries.front().is_some_and(|(_, done)| *done) {
            self.entries.pop_front();
        }
        true
    }

    /// The position to commit (the next offset to read): the first unfinished
    /// offset, or one past the last pushed offset when all are finished. `None`
    /// before anything was pushed.
    pub fn watermark(&self) -> Option<i64> {
        match self.entries.front() {
            Some((offset, _)) => Some(*offset),
            None => self.next,
        }
    }

    /// Offsets accepted and not finished.
    pub fn pending(&self) -> usize {
        self.unfinished
    }

    /// Offsets held (unfinished, or finished behind an unfinished one): the
    /// tracker's memory, which the engine bounds per partition.
    pub fn held(&self) -> usize {
        self.entries.len()
    }

    /// Highest finished offset + 1 minus the watermark: work that is done but
    /// waits for an earlier offset before it can be committed.
    pub fn gap(&self) -> i64 {
        match (self.highest_done, self.watermark()) {
            (Some(h), Some(w)) => h.saturating_add(1).saturating_sub(w).max(0),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_completion_commits_only_the_contiguous_prefix() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.watermark(), None);
        for o in 10..15 {
            t.push(o);
        }
        assert_eq!(t.watermark(), Some(10));
        // Later offsets finish first (the first request is slow).
        for o in [11, 12, 14] {
            assert!(t.complete(o));
            assert_eq!(t.watermark(), Some(10), "never past unfinished 10");
        }
        assert_eq!(t.gap(), 5);
        assert!(t.complete(11), "finishing twice is harmless");
        assert_eq!(t.pending(), 2, "10 and 13");
        assert_eq!(t.held(), 5);
        t.complete(10);
        assert_eq!(t.watermark(), Some(13));
        assert_eq!(t.gap(), 2);
        t.complete(13);
        assert_eq!(t.watermark(), Some(15));
        assert_eq!(t.pending(), 0);
        assert_eq!(t.held(), 0);
        assert_eq!(t.gap(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_fine_and_old_offsets_ignored() {
        let mut t = OffsetTracker::new();
        t.push(5);
        t.push(9); // compaction or transaction markers skipped 6..8
        assert!(!t.push(7));
        t.complete(9);
        assert_eq!(t.watermark(), Some(5));
        t.complete(5);
        assert_eq!(t.watermark(), Some(10));
        assert!(!t.complete(6));
    }

    #[test]
    fn randomized_watermark_never_passes_an_unfinished_offset() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let mut t = OffsetTracker::new();
            let n = rng.usize(1..50);
            let mut open: Vec<i64> = (0..n as i64).collect();
            for o in &open {
                t.push(*o);
            }
            rng.shuffle(&mut open);
            let mut done = std::collections::BTreeSet::new();
            for o in open {
                t.complete(o);
                done.insert(o);
                let w = t.watermark().unwrap();
                assert!(
                    (0..w).all(|x| done.contains(&x)),
                    "watermark {w} passes an unfinished offset"
                );
                assert!(!done.contains(&w) || w == n as i64);
            }
            assert_eq!(t.watermark(), Some(n as i64));
        }
    }
}
