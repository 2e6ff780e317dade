//! Sets of byte ranges: which parts of a part file are written, which are missing.

use std::ops::Range;

/// Sorted, disjoint, non-adjacent half-open byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// From `[start, end)` pairs in any order, overlapping or not; empty ones are dropped.
    pub fn from_pairs(pairs: &[[u64; 2]]) -> Self {
        let mut set = Self::new();
        for &[start, end] in pairs {
            set.insert(start..end);
        }
        set
    }

    pub fn to_pairs(&self) -> Vec<[u64; 2]> {
        self.ranges.iter().map(|r| [r.start, r.end]).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range<u64>> {
        self.ranges.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total bytes covered.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The highest end of any range (0 when empty).
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r.end)
    }

    /// Adds `range`, merging it with the ranges it overlaps or touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let first = self.ranges.partition_point(|r| r.end < range.start);
        let last = self.ranges.partition_point(|r| r.start <= range.end);
        let merged = if first < last {
            self.ranges[first].start.min(range.start)..self.ranges[last - 1].end.max(range.end)
        } else {
            range
        };
        self.ranges.splice(first..last, [merged]);
    }

    /// The end of the range that contains `offset`, if one does.
    pub fn covered_until(&self, offset: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|r| r.end <= offset);
        self.ranges
            .get(i)
            .filter(|r| r.start <= offset)
            .map(|r| r.end)
    }

    /// Whether `[0, size)` is covered.
    pub fn covers(&self, size: u64) -> bool {
        size == 0 || self.covered_until(0).is_some_and(|end| end >= size)
    }

    /// What is not covered within `[0, size)`.
    pub fn missing(&self, size: u64) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut at = 0;
        for r in &self.ranges {
            if r.start >= size {
                break;
            }
            if r.start > at {
                gaps.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < size {
            gaps.push(at..size);
        }
        gaps
    }

    /// Keeps only what lies below `size`, and cuts each range's end down to a
    /// multiple of `align` (unless it ends at `size`), so resumed writes stay aligned.
    pub fn clamp_aligned(&self, size: u64, align: u64) -> Self {
        let mut out = Self::new();
        for r in &self.ranges {
            let end = r.end.min(size);
            let end = if end == size { end } else { end - end % align };
            out.insert(r.start..end);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_overlapping_and_touching_ranges() {
        let mut set = RangeSet::new();
        set.insert(10..20);
        set.insert(30..40);
        set.insert(20..25);
        assert_eq!(set.to_pairs(), vec![[10, 25], [30, 40]]);
        set.insert(0..5);
        set.insert(24..30);
        assert_eq!(set.to_pairs(), vec![[0, 5], [10, 40]]);
        set.insert(3..50);
        assert_eq!(set.to_pairs(), vec![[0, 50]]);
        set.insert(7..7);
        assert_eq!(set.len(), 50);
    }

    #[test]
    fn missing_and_coverage() {
        let set = RangeSet::from_pairs(&[[4, 8], [0, 2], [10, 12]]);
        assert_eq!(set.missing(16), vec![2..4, 8..10, 12..16]);
        assert_eq!(set.missing(11), vec![2..4, 8..10]);
        assert_eq!(set.covered_until(5), Some(8));
        assert_eq!(set.covered_until(8), None);
        assert!(!set.covers(12));
        assert!(RangeSet::from_pairs(&[[0, 12]]).covers(12));
        assert!(RangeSet::new().covers(0));
    }

    #[test]
    fn clamp_aligned_trims_unaligned_ends() {
        let set = RangeSet::from_pairs(&[[0, 5000], [8192, 9000], [12288, 20000]]);
        assert_eq!(
            set.clamp_aligned(20000, 4096).to_pairs(),
            vec![[0, 4096], [12288, 20000]]
        );
        assert_eq!(
            set.clamp_aligned(15000, 4096).to_pairs(),
            vec![[0, 4096], [12288, 15000]]
        );
    }
}
