//! How a transfer is cut into units and shared among connections.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use reqwest::header::HeaderMap;
use reqwest::Url;

use crate::buffer::BLOCK_SIZE;
use crate::response::{Known, Validator};

/// Each later range request asks for at most this much; units are multiples of
/// the block size, so every connection writes page-aligned blocks.
pub const MAX_UNIT: u64 = 4 << 20;
/// Below this size one connection is enough when the caller did not choose.
pub const AUTO_PARALLEL_MIN: u64 = 64 << 20;
pub const AUTO_CONNECTIONS: u32 = 8;
/// Where requests go once redirects are resolved, and with which headers
/// (credentials already dropped if a redirect left the origin).
#[derive(Clone)]
pub struct Target {
    pub url: Url,
    pub headers: HeaderMap,
}

/// The transfer of one version of the file, once its size and validator are known.
pub struct Transfer {
    pub size: Option<u64>,
    pub validator: Validator,
    /// Units not yet taken by a connection, lowest offset first.
    pub queue: Mutex<VecDeque<Range<u64>>>,
    /// Several connections: a failed unit is retried alone. (One connection
    /// retries through a new attempt.)
    pub parallel: AtomicBool,
    /// Resolved once per attempt; units go there directly.
    target: Mutex<Target>,
}

impl Transfer {
    pub fn new(size: Option<u64>, validator: Validator, target: Target) -> Self {
        Self {
            size,
            validator,
            queue: Mutex::new(VecDeque::new()),
            parallel: AtomicBool::new(false),
            target: Mutex::new(target),
        }
    }

    /// Range requests (to resume, retry or split) are only safe with a validator
    /// for If-Range and a known size.
    pub fn resumable(&self) -> bool {
        self.size.is_some() && self.validator.if_range().is_some()
    }

    pub fn known(&self) -> Option<Known> {
        Some(Known {
            validator: self.validator.clone(),
            total: self.size?,
        })
    }

    pub fn next_unit(&self) -> Option<Range<u64>> {
        self.queue.lock().ok()?.pop_front()
    }

    pub fn give_back(&self, range: Range<u64>) {
        if let Ok(mut queue) = self.queue.lock() {
            let at = queue.partition_point(|r| r.start < range.start);
            queue.insert(at, range);
        }
    }

    pub fn target(&self) -> Target {
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn retarget(&self, target: Target) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }
}

/// How many connections a transfer uses: one unless ranges work (the first
/// answer was a `206`) and can be validated; then the caller's count, or eight
/// for a file of at least `AUTO_PARALLEL_MIN` bytes.
pub fn connection_count(
    requested: Option<u32>,
    size: Option<u64>,
    ranged: bool,
    resumable: bool,
) -> u32 {
    if !ranged || !resumable {
        return 1;
    }
    match (requested, size) {
        (Some(n), _) => n,
        (None, Some(size)) if size >= AUTO_PARALLEL_MIN => AUTO_CONNECTIONS,
        _ => 1,
    }
}

/// About four units per connection, so that they finish close together, in
/// whole blocks of at most `MAX_UNIT`.
pub fn unit_size(size: u64, connections: u32) -> u64 {
    let block = BLOCK_SIZE as u64;
    let per = size / (u64::from(connections) * 4);
    (per / block * block).clamp(block, MAX_UNIT)
}

/// `ranges` cut into pieces of at most `step` bytes, in order.
pub fn split(ranges: Vec<Range<u64>>, step: u64) -> Vec<Range<u64>> {
    let mut units = Vec::new();
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let end = range.end.min(at.saturating_add(step));
            units.push(at..end);
            at = end;
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn units_are_whole_blocks_of_at_most_max_unit() {
        assert_eq!(unit_size(1024 * MIB, 8), MAX_UNIT);
        assert_eq!(unit_size(64 * MIB, 8), 2 * MIB);
        assert_eq!(unit_size(MIB, 8), BLOCK_SIZE as u64);
        assert_eq!(unit_size(100 * MIB + 12345, 4) % BLOCK_SIZE as u64, 0);
    }

    #[test]
    fn split_cuts_in_order_and_covers_everything() {
        let units = split(vec![0..10, 20..25], 4);
        assert_eq!(units, vec![0..4, 4..8, 8..10, 20..24, 24..25]);
        let empty: Vec<Range<u64>> = Vec::new();
        let one = |range: Range<u64>| -> Vec<Range<u64>> { std::iter::once(range).collect() };
        assert_eq!(split(one(5..5), 4), empty);
        assert_eq!(split(one(0..u64::MAX), u64::MAX), one(0..u64::MAX));
    }

    #[test]
    fn connections_only_where_ranges_work() {
        let big = Some(AUTO_PARALLEL_MIN);
        assert_eq!(connection_count(None, big, true, true), AUTO_CONNECTIONS);
        assert_eq!(
            connection_count(None, Some(AUTO_PARALLEL_MIN - 1), true, true),
            1
        );
        assert_eq!(connection_count(Some(4), Some(10), true, true), 4);
        assert_eq!(connection_count(Some(4), big, false, true), 1);
        assert_eq!(connection_count(Some(4), big, true, false), 1);
        assert_eq!(connection_count(None, None, true, true), 1);
    }

    #[test]
    fn a_unit_given_back_is_taken_first_again() {
        let target = Target {
            url: Url::parse("http://h/f").unwrap(),
            headers: HeaderMap::new(),
        };
        let transfer = Transfer::new(Some(30), Validator::default(), target);
        transfer.queue.lock().unwrap().extend([10..20, 20..30]);
        let first = transfer.next_unit().unwrap();
        assert_eq!(first, 10..20);
        transfer.give_back(15..20);
        assert_eq!(transfer.next_unit(), Some(15..20));
        assert_eq!(transfer.next_unit(), Some(20..30));
        assert_eq!(transfer.next_unit(), None);
        assert!(!transfer.resumable()); // no validator for If-Range
    }
}
