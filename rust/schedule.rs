//! How a transfer is cut into units and shared among connections.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::Url;

use crate::buffer::BLOCK_SIZE;
use crate::response::{Known, Validator};

/// Each later range request asks for at most this much; units are multiples of
/// the block size, so every connection writes page-aligned blocks.
pub const MAX_UNIT: u64 = 4 << 20;
/// Below this size one connection is enough when the caller did not choose.
pub const AUTO_PARALLEL_MIN: u64 = 16 << 20;
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

    pub fn queue_is_empty(&self) -> bool {
        self.queue.lock().map_or(true, |q| q.is_empty())
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

/// How many connections a transfer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Exactly this many (the caller's choice, or one where ranges cannot help).
    Fixed(u32),
    /// Start with one and add more while they raise the total rate, up to `cap`.
    Adaptive { cap: u32 },
}

/// One connection unless ranges work (the first answer was a `206`) and can be
/// validated; then the caller's count, or, for a file of at least
/// `AUTO_PARALLEL_MIN` bytes, as many as help, up to eight.
pub fn connection_plan(
    requested: Option<u32>,
    size: Option<u64>,
    ranged: bool,
    resumable: bool,
) -> Plan {
    if !ranged || !resumable {
        return Plan::Fixed(1);
    }
    match (requested, size) {
        (Some(n), _) => Plan::Fixed(n),
        (None, Some(size)) if size >= AUTO_PARALLEL_MIN => Plan::Adaptive {
            cap: AUTO_CONNECTIONS,
        },
        _ => Plan::Fixed(1),
    }
}

/// The first connection is given this long before its rate is measured, and
/// measured over `FIRST_WINDOW`: short, because every moment spent on one
/// connection is lost when the server limits each connection.
const FIRST_WARMUP: Duration = Duration::from_millis(50);
const FIRST_WINDOW: Duration = Duration::from_millis(150);
/// Connections that join are given this long (to connect and start) before
/// their effect is measured, over `RAMP_WINDOW`.
const RAMP_WARMUP: Duration = Duration::from_millis(250);
const RAMP_WINDOW: Duration = Duration::from_millis(400);
/// More connections must raise the rate by this factor to be kept.
const RAMP_GAIN: f64 = 1.2;
/// One connection this fast (bytes/s) is past what a network path usually
/// limits a connection to: more connections rarely help and cost CPU (on
/// loopback eight are slower than one), so they are added one doubling at a
/// time. Below it, the cap is tried at once.
const CAREFUL_ABOVE: f64 = 256e6;
/// Trying more connections is not worth it when the transfer would end sooner
/// than this at the rate measured (seconds).
const WORTH_TRYING: f64 = 1.0;

/// Decides how many connections an adaptive transfer runs. It measures one
/// connection; below `CAREFUL_ABOVE` it tries the cap at once and keeps as many
/// connections as the rate they reach needs (a server that limits each
/// connection: all of them; a full link: about as many as filled it), or goes
/// back to one when they did not raise the rate by `RAMP_GAIN`. Above it, it
/// doubles while each doubling raises the rate by `RAMP_GAIN`, and goes back to
/// the last count that helped otherwise. Never above the cap.
#[derive(Debug)]
pub struct Ramp {
    cap: u32,
    active: u32,
    /// The rate (bytes/s) of one connection, once measured.
    single: Option<f64>,
    /// The rate measured with `active / 2` connections (doubling only).
    previous: Option<f64>,
    /// Bytes this transfer still had to fetch when the ramp began, if known, and
    /// the byte count of the first tick (what `tick`'s counts start from).
    left: Option<u64>,
    base: Option<u64>,
    phase: Phase,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    WarmingUp {
        until: Instant,
        window: Duration,
    },
    Measuring {
        since: Instant,
        bytes: u64,
        window: Duration,
    },
    Settled,
}

impl Ramp {
    /// A ramp up to `cap` connections for a transfer with `left` bytes to fetch.
    pub fn new(cap: u32, now: Instant, left: Option<u64>) -> Self {
        Self {
            cap: cap.max(1),
            active: 1,
            single: None,
            previous: None,
            left,
            base: None,
            phase: if cap <= 1 {
                Phase::Settled
            } else {
                Phase::WarmingUp {
                    until: now + FIRST_WARMUP,
                    window: FIRST_WINDOW,
                }
            },
        }
    }

    pub fn settled(&self) -> bool {
        matches!(self.phase, Phase::Settled)
    }

    /// Given the bytes transferred so far at `now`, how many connections to run.
    pub fn tick(&mut self, now: Instant, bytes: u64) -> u32 {
        let base = *self.base.get_or_insert(bytes);
        match self.phase {
            Phase::Settled => {}
            Phase::WarmingUp { until, window } if now >= until => {
                self.phase = Phase::Measuring {
                    since: now,
                    bytes,
                    window,
                };
            }
            Phase::WarmingUp { .. } => {}
            Phase::Measuring {
                since,
                bytes: at_start,
                window,
            } => {
                let elapsed = now.saturating_duration_since(since);
                if elapsed >= window {
                    let rate = bytes.saturating_sub(at_start) as f64 / elapsed.as_secs_f64();
                    let done = bytes.saturating_sub(base);
                    self.measured(rate, now, done);
                }
            }
        }
        self.active
    }

    fn measured(&mut self, rate: f64, now: Instant, done: u64) {
        let Some(single) = self.single else {
            self.single = Some(rate);
            self.previous = Some(rate);
            let remaining = self
                .left
                .map(|left| left.saturating_sub(done) as f64 / rate.max(1.0));
            if remaining.is_some_and(|seconds| seconds < WORTH_TRYING) {
                self.settle(1); // it ends before more connections could pay for themselves
                return;
            }
            let next = if rate >= CAREFUL_ABOVE { 2 } else { self.cap };
            self.grow_to(next, now);
            return;
        };
        let before = self.previous.unwrap_or(single);
        if rate < before * RAMP_GAIN {
            self.settle(if self.doubling(single) {
                self.active / 2
            } else {
                1
            });
        } else if !self.doubling(single) {
            // As many as the rate reached needs, at the rate one connection had.
            let needed = (rate / single.max(1.0)).ceil() as u32;
            self.settle(needed.clamp(2, self.active));
        } else if self.active >= self.cap {
            self.settle(self.active);
        } else {
            self.previous = Some(rate);
            self.grow_to(self.active * 2, now);
        }
    }

    fn doubling(&self, single: f64) -> bool {
        single >= CAREFUL_ABOVE
    }

    fn grow_to(&mut self, count: u32, now: Instant) {
        self.active = count.clamp(1, self.cap);
        self.phase = Phase::WarmingUp {
            until: now + RAMP_WARMUP,
            window: RAMP_WINDOW,
        };
    }

    fn settle(&mut self, count: u32) {
        self.active = count.max(1);
        self.phase = Phase::Settled;
    }
}

/// The first connection of an adaptive transfer streams one open response
/// until more connections join; then it stops at a cut (`end`) a little ahead
/// of where it is (`at`), and the rest is queued as units.
#[derive(Debug)]
pub struct Stretch {
    pub at: AtomicU64,
    pub end: AtomicU64,
}

impl Stretch {
    pub fn new(range: &Range<u64>) -> Self {
        Self {
            at: AtomicU64::new(range.start),
            end: AtomicU64::new(range.end),
        }
    }

    /// Moves the end to a block boundary at least `ahead` bytes past where the
    /// stream is; returns the range given up, if any.
    pub fn cut(&self, ahead: u64) -> Option<Range<u64>> {
        let block = BLOCK_SIZE as u64;
        let mut end = self.end.load(Ordering::Acquire);
        loop {
            let at = self.at.load(Ordering::Acquire);
            let cut = at.saturating_add(ahead).div_ceil(block) * block;
            if cut >= end {
                return None;
            }
            match self
                .end
                .compare_exchange(end, cut, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(cut..end),
                Err(now) => end = now,
            }
        }
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
        let adaptive = Plan::Adaptive {
            cap: AUTO_CONNECTIONS,
        };
        assert_eq!(connection_plan(None, big, true, true), adaptive);
        assert_eq!(
            connection_plan(None, Some(AUTO_PARALLEL_MIN - 1), true, true),
            Plan::Fixed(1)
        );
        assert_eq!(
            connection_plan(Some(4), Some(10), true, true),
            Plan::Fixed(4)
        );
        assert_eq!(connection_plan(Some(4), big, false, true), Plan::Fixed(1));
        assert_eq!(connection_plan(Some(4), big, true, false), Plan::Fixed(1));
        assert_eq!(connection_plan(None, None, true, true), Plan::Fixed(1));
    }

    /// Runs a ramp against a server whose total rate with `n` connections is
    /// `rate(n)` bytes/s, ticking every 100 ms; returns the counts it asked for.
    fn ramp_against(cap: u32, rate: impl Fn(u32) -> f64) -> Vec<u32> {
        let t0 = Instant::now();
        let mut ramp = Ramp::new(cap, t0, None);
        let (mut bytes, mut active, mut seen) = (0.0, 1, vec![1]);
        for step in 1..200 {
            bytes += rate(active) * 0.1;
            active = ramp.tick(t0 + Duration::from_millis(100 * step), bytes as u64);
            if seen.last() != Some(&active) {
                seen.push(active);
            }
            if ramp.settled() {
                break;
            }
        }
        assert!(ramp.settled());
        seen
    }

    #[test]
    fn a_per_connection_limit_gets_every_connection_at_once() {
        assert_eq!(ramp_against(8, |n| 5e6 * f64::from(n)), [1, 8]);
        assert_eq!(ramp_against(4, |n| 5e6 * f64::from(n)), [1, 4]);
        // A link that four connections fill: as many as it needs, not the cap.
        assert_eq!(ramp_against(8, |n| 5e6 * f64::from(n.min(4))), [1, 8, 4]);
        assert_eq!(ramp_against(8, |n| 5e6 * f64::from(n.min(3))), [1, 8, 3]);
    }

    #[test]
    fn a_fast_connection_is_joined_one_doubling_at_a_time() {
        assert_eq!(ramp_against(8, |n| 300e6 * f64::from(n)), [1, 2, 4, 8]);
        assert_eq!(
            ramp_against(8, |n| 300e6 * f64::from(n.min(4))),
            [1, 2, 4, 8, 4]
        );
    }

    #[test]
    fn a_transfer_about_to_end_is_left_to_its_one_connection() {
        let t0 = Instant::now();
        let tick =
            |ramp: &mut Ramp, ms: u64, bytes: u64| ramp.tick(t0 + Duration::from_millis(ms), bytes);
        // 1 GB/s on one connection, 300 MB of 1 GB done by the first measurement:
        // the rest takes 0.7 s, less than trying more connections would.
        let mut fast = Ramp::new(8, t0, Some(1_000_000_000));
        for (ms, mb) in [(0, 0), (100, 100), (200, 200), (300, 300)] {
            assert_eq!(tick(&mut fast, ms, mb * 1_000_000), 1);
        }
        assert!(fast.settled());
        // The same rate with 10 GB to go: worth a doubling.
        let mut long = Ramp::new(8, t0, Some(10_000_000_000));
        for (ms, mb) in [(0, 0), (100, 100), (200, 200), (300, 300)] {
            tick(&mut long, ms, mb * 1_000_000);
        }
        assert_eq!(tick(&mut long, 300, 300_000_000), 2);
        // A slow connection with little left: not worth eight.
        let mut slow = Ramp::new(8, t0, Some(6_000_000));
        for (ms, kb) in [(0, 0), (100, 500), (200, 1000), (300, 1500)] {
            tick(&mut slow, ms, kb * 1000);
        }
        assert!(slow.settled());
        assert_eq!(tick(&mut slow, 400, 2_000_000), 1);
    }

    #[test]
    fn connections_that_do_not_help_are_given_up() {
        // Loopback: one connection is as fast as it gets.
        assert_eq!(ramp_against(8, |_| 1e9), [1, 2, 1]);
        // A slow link one connection fills.
        assert_eq!(ramp_against(8, |_| 12e6), [1, 8, 1]);
        assert_eq!(
            ramp_against(8, |n| 12e6 * if n > 1 { 1.1 } else { 1.0 }),
            [1, 8, 1]
        );
        assert_eq!(ramp_against(1, |n| 5e6 * f64::from(n)), [1]);
    }

    #[test]
    fn a_cut_leaves_the_stream_ahead_and_never_behind() {
        let stretch = Stretch::new(&(0..(64 << 20)));
        stretch.at.store(3 << 20, Ordering::Release);
        let given = stretch.cut(4 << 20).unwrap();
        assert_eq!(given, (7 << 20)..(64 << 20));
        assert_eq!(stretch.end.load(Ordering::Acquire), 7 << 20);
        stretch.at.store((6 << 20) + 5, Ordering::Release);
        assert_eq!(stretch.cut(4 << 20), None); // nothing left to give
        assert_eq!(stretch.end.load(Ordering::Acquire), 7 << 20);
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
