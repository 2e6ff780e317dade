//! Which responses may be used, and for what: the one rule every attempt,
//! connection and retry applies before a byte of a body is written.
//!
//! - A `200` is the whole representation (RFC 9110 §15.3.1). One that carries
//!   `Content-Range`, or whose length contradicts the total already known for
//!   the same validator, is not: it is never installed.
//! - A `206` (RFC 9110 §15.3.7, §14.4) is spliced into a part only if it carries
//!   the validator the part was recorded with (the strong ETag, else the
//!   Last-Modified date; §8.8), states the same total, and its `Content-Range`
//!   covers the range asked for. One that starts a little earlier is used, its
//!   first bytes skipped.
//! - Anything else cannot be used. `Untrusted` means the part cannot be trusted
//!   (another version, or no way to tell): discard it and start over. `Misfit`
//!   means the right version but not the bytes asked for: the server mishandles
//!   ranges, so ask with fewer of them (one connection, then no `Range` at all).

use std::ops::Range;

use reqwest::header::{self, HeaderMap};

use crate::http::{self, ContentRange};

/// A representation's version as far as a client can tell: what `If-Range` sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validator {
    /// A strong entity tag (a weak one never validates a range, RFC 9110 §13.1.5).
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// How a response's validator compares with a known one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Same,
    Other,
    /// The response lacks the validator the known version was recorded with.
    Missing,
}

impl Validator {
    pub fn of(headers: &HeaderMap) -> Self {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            etag: get(header::ETAG).filter(|tag| !tag.starts_with("W/")),
            last_modified: get(header::LAST_MODIFIED),
        }
    }

    /// The value for `If-Range`: the strong ETag, else Last-Modified.
    pub fn if_range(&self) -> Option<&str> {
        self.etag.as_deref().or(self.last_modified.as_deref())
    }

    /// Compares `theirs` with this version on the validator this one would send
    /// in `If-Range` (the ETag when there is one, else Last-Modified).
    pub fn compare(&self, theirs: &Validator) -> Comparison {
        let (ours, theirs) = match (&self.etag, &self.last_modified) {
            (Some(ours), _) => (ours, &theirs.etag),
            (None, Some(ours)) => (ours, &theirs.last_modified),
            (None, None) => return Comparison::Missing,
        };
        match theirs {
            Some(theirs) if theirs == ours => Comparison::Same,
            Some(_) => Comparison::Other,
            None => Comparison::Missing,
        }
    }
}

/// What a request asked for.
#[derive(Debug, Clone)]
pub struct Asked {
    /// `None`: a plain request (no `Range`). An end of `u64::MAX` is open (`bytes=a-`).
    pub range: Option<Range<u64>>,
    /// How many bytes before the range's start a `206` may begin and still be used.
    pub max_skip: u64,
}

/// What is already known of the representation: the version a part was recorded
/// with, or that an earlier response of this call established.
#[derive(Debug, Clone)]
pub struct Known {
    pub validator: Validator,
    pub total: u64,
}

/// The parts of a response that the rule reads.
#[derive(Debug, Clone)]
pub struct Seen {
    pub status: u16,
    /// `None`: no `Content-Range`; `Some(None)`: one that does not parse.
    pub content_range: Option<Option<ContentRange>>,
    pub validator: Validator,
    pub content_length: Option<u64>,
}

impl Seen {
    pub fn of(response: &reqwest::Response) -> Self {
        Self {
            status: response.status().as_u16(),
            content_range: response
                .headers()
                .contains_key(header::CONTENT_RANGE)
                .then(|| http::content_range(response)),
            validator: Validator::of(response.headers()),
            content_length: response.content_length(),
        }
    }
}

/// What a response may be used for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The whole representation from byte 0; `total` is its announced length.
    Whole {
        total: Option<u64>,
    },
    /// Bytes `body` of the representation (`total` bytes in all, when known); the
    /// caller skips those before the range it asked for.
    Part {
        body: Range<u64>,
        total: Option<u64>,
    },
    Unusable(Unusable),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// Another version, or nothing to tell which: the part cannot be trusted.
    Untrusted(String),
    /// The right version but not the bytes asked for: ranges are mishandled.
    Misfit(String),
}

/// Judges `seen`, the answer to `asked`, against what is `known`.
pub fn judge(asked: &Asked, known: Option<&Known>, seen: &Seen) -> Verdict {
    match seen.status {
        200 => judge_whole(known, seen),
        206 => judge_part(asked, known, seen),
        416 => {
            let total = match seen.content_range {
                Some(Some(ContentRange::Unsatisfied { total })) => Some(total),
                _ => None,
            };
            match (known, total) {
                (Some(known), Some(total)) if total != known.total => untrusted(format!(
                    "its size went from {} to {total} bytes",
                    known.total
                )),
                _ => misfit("a range request was answered 416 Range Not Satisfiable".into()),
            }
        }
        status => misfit(format!("a request was answered {status}")),
    }
}

fn judge_whole(known: Option<&Known>, seen: &Seen) -> Verdict {
    if seen.content_range.is_some() {
        return misfit("a 200 carried Content-Range: it is not the whole file".into());
    }
    if let (Some(known), Some(length)) = (known, seen.content_length) {
        if length != known.total && known.validator.compare(&seen.validator) == Comparison::Same {
            return misfit(format!(
                "a 200 of {length} bytes has the validator of the {}-byte file",
                known.total
            ));
        }
    }
    Verdict::Whole {
        total: seen.content_length,
    }
}

fn judge_part(asked: &Asked, known: Option<&Known>, seen: &Seen) -> Verdict {
    let Some(range) = asked.range.as_ref() else {
        return misfit("a request without Range was answered 206".into());
    };
    let Some(Some(ContentRange::Bytes { first, last, total })) = seen.content_range else {
        return misfit("a 206 came without a usable Content-Range".into());
    };
    if let Some(known) = known {
        match known.validator.compare(&seen.validator) {
            Comparison::Same => {}
            Comparison::Other => return untrusted("its ETag or Last-Modified changed".into()),
            Comparison::Missing => {
                return untrusted(
                    "a 206 came without the validator (ETag or Last-Modified) of the part".into(),
                )
            }
        }
        match total {
            Some(total) if total == known.total => {}
            Some(total) => {
                return untrusted(format!(
                    "its size went from {} to {total} bytes",
                    known.total
                ))
            }
            None => return untrusted("a 206 did not state the file's size".into()),
        }
    }
    let body = first..last + 1;
    if seen
        .content_length
        .is_some_and(|l| l != body.end - body.start)
    {
        return misfit(format!(
            "a 206 for bytes {first}-{last} announced a Content-Length of {}",
            seen.content_length.unwrap_or_default()
        ));
    }
    let wanted_end = total.map_or(range.end, |t| range.end.min(t));
    if body.start > range.start || body.end < wanted_end {
        return misfit(format!(
            "a 206 held bytes {first}-{last} when asked for {}",
            shown_range(range.start, wanted_end)
        ));
    }
    if range.start - body.start > asked.max_skip {
        return misfit(format!(
            "a 206 started at byte {first} when asked for {}",
            shown_range(range.start, wanted_end)
        ));
    }
    Verdict::Part { body, total }
}

fn shown_range(start: u64, end: u64) -> String {
    if end == u64::MAX {
        format!("{start}-")
    } else {
        format!("{start}-{}", end.saturating_sub(1))
    }
}

fn untrusted(detail: String) -> Verdict {
    Verdict::Unusable(Unusable::Untrusted(detail))
}

fn misfit(detail: String) -> Verdict {
    Verdict::Unusable(Unusable::Misfit(detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOTAL: u64 = 3 << 20;
    const ETAG: &str = "\"v1\"";

    fn validator(etag: Option<&str>, last_modified: Option<&str>) -> Validator {
        Validator {
            etag: etag.map(str::to_owned),
            last_modified: last_modified.map(str::to_owned),
        }
    }

    fn known() -> Known {
        Known {
            validator: validator(Some(ETAG), None),
            total: TOTAL,
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Cr {
        Absent,
        Exact,
        /// Starts 64 KiB before the asked start.
        Wider,
        /// Starts after the asked start.
        Wrong,
        Garbage,
    }

    #[derive(Clone, Copy, Debug)]
    enum V {
        Same,
        Other,
        Missing,
    }

    /// A response to `bytes=START-` of the 3 MiB file, built from the table's axes.
    fn seen(status: u16, cr: Cr, v: V, length_consistent: bool, total: u64) -> Seen {
        const START: u64 = 1 << 20;
        let (first, header) = match cr {
            Cr::Absent => (0, None),
            Cr::Exact => (START, Some(Some(START))),
            Cr::Wider => (START - (64 << 10), Some(Some(START - (64 << 10)))),
            Cr::Wrong => (START + 7, Some(Some(START + 7))),
            Cr::Garbage => (START, Some(None)),
        };
        let content_range = header.map(|first| {
            first.map(|first| ContentRange::Bytes {
                first,
                last: total - 1,
                total: Some(total),
            })
        });
        let body = if status == 200 && header.is_none() {
            total
        } else {
            total - first
        };
        Seen {
            status,
            content_range,
            validator: match v {
                V::Same => validator(Some(ETAG), None),
                V::Other => validator(Some("\"v2\""), None),
                V::Missing => validator(None, None),
            },
            content_length: Some(if length_consistent { body } else { body + 1 }),
        }
    }

    fn resume() -> Asked {
        Asked {
            range: Some((1 << 20)..u64::MAX),
            max_skip: u64::MAX,
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Expect {
        Whole,
        Part(u64),
        Untrusted,
        Misfit,
    }

    fn outcome(verdict: Verdict) -> Expect {
        match verdict {
            Verdict::Whole { .. } => Expect::Whole,
            Verdict::Part { body, .. } => Expect::Part(body.start),
            Verdict::Unusable(Unusable::Untrusted(_)) => Expect::Untrusted,
            Verdict::Unusable(Unusable::Misfit(_)) => Expect::Misfit,
        }
    }

    /// status × Content-Range × validator × length, for a resume of a part known
    /// to be the 3 MiB version "v1".
    #[test]
    fn the_rule_as_a_table() {
        use Cr::*;
        use Expect::*;
        use V::*;
        let wider = (1 << 20) - (64 << 10);
        #[rustfmt::skip]
        let table: &[(u16, Cr, V, bool, Expect)] = &[
            // A 200 is the whole file, unless it carries Content-Range or its length
            // contradicts the known total under the same validator.
            (200, Absent,  Same,    true,  Whole),
            (200, Absent,  Same,    false, Misfit),
            (200, Absent,  Other,   true,  Whole),
            (200, Absent,  Other,   false, Whole),   // another version may have another size
            (200, Absent,  Missing, true,  Whole),
            (200, Absent,  Missing, false, Whole),
            (200, Exact,   Same,    true,  Misfit),
            (200, Exact,   Other,   true,  Misfit),
            (200, Exact,   Missing, true,  Misfit),
            (200, Wider,   Same,    true,  Misfit),
            (200, Wrong,   Same,    true,  Misfit),
            (200, Garbage, Same,    true,  Misfit),
            // A 206 needs the part's validator, a fitting Content-Range, a consistent length.
            (206, Exact,   Same,    true,  Part(1 << 20)),
            (206, Exact,   Same,    false, Misfit),
            (206, Exact,   Other,   true,  Untrusted),
            (206, Exact,   Missing, true,  Untrusted),
            (206, Exact,   Missing, false, Untrusted),
            (206, Wider,   Same,    true,  Part(wider)),
            (206, Wider,   Same,    false, Misfit),
            (206, Wider,   Other,   true,  Untrusted),
            (206, Wider,   Missing, true,  Untrusted),
            (206, Wrong,   Same,    true,  Misfit),
            (206, Wrong,   Other,   true,  Untrusted),
            (206, Wrong,   Missing, true,  Untrusted),
            (206, Absent,  Same,    true,  Misfit),
            (206, Absent,  Other,   true,  Misfit),
            (206, Garbage, Same,    true,  Misfit),
            (206, Garbage, Missing, true,  Misfit),
        ];
        for &(status, cr, v, consistent, ref expected) in table {
            let got = outcome(judge(
                &resume(),
                Some(&known()),
                &seen(status, cr, v, consistent, TOTAL),
            ));
            assert_eq!(
                &got, expected,
                "{status} {cr:?} {v:?} consistent={consistent}"
            );
        }
    }

    #[test]
    fn another_total_under_the_same_validator_is_never_spliced() {
        let bigger = seen(206, Cr::Exact, V::Same, true, TOTAL + 1);
        assert_eq!(
            outcome(judge(&resume(), Some(&known()), &bigger)),
            Expect::Untrusted
        );
        let unknown_total = Seen {
            content_range: Some(Some(ContentRange::Bytes {
                first: 1 << 20,
                last: TOTAL - 1,
                total: None,
            })),
            ..bigger
        };
        assert_eq!(
            outcome(judge(&resume(), Some(&known()), &unknown_total)),
            Expect::Untrusted
        );
    }

    #[test]
    fn a_wider_part_is_used_only_within_the_skip_allowed() {
        let tight = Asked {
            max_skip: 4096,
            ..resume()
        };
        let wider = seen(206, Cr::Wider, V::Same, true, TOTAL);
        assert_eq!(
            outcome(judge(&tight, Some(&known()), &wider)),
            Expect::Misfit
        );
        let whole_file = Seen {
            content_range: Some(Some(ContentRange::Bytes {
                first: 0,
                last: TOTAL - 1,
                total: Some(TOTAL),
            })),
            content_length: Some(TOTAL),
            ..wider.clone()
        };
        assert_eq!(
            outcome(judge(&tight, Some(&known()), &whole_file)),
            Expect::Misfit
        );
        assert_eq!(
            outcome(judge(&resume(), Some(&known()), &whole_file)),
            Expect::Part(0)
        );
    }

    #[test]
    fn a_short_part_or_a_206_to_a_plain_request_is_a_misfit() {
        let short = Seen {
            content_range: Some(Some(ContentRange::Bytes {
                first: 1 << 20,
                last: (2 << 20) - 1,
                total: Some(TOTAL),
            })),
            content_length: Some(1 << 20),
            ..seen(206, Cr::Exact, V::Same, true, TOTAL)
        };
        assert_eq!(
            outcome(judge(&resume(), Some(&known()), &short)),
            Expect::Misfit
        );
        // The same bytes answer a request for exactly them.
        let unit = Asked {
            range: Some((1 << 20)..(2 << 20)),
            max_skip: 0,
        };
        assert_eq!(
            outcome(judge(&unit, Some(&known()), &short)),
            Expect::Part(1 << 20)
        );
        let plain = Asked {
            range: None,
            max_skip: 0,
        };
        assert_eq!(outcome(judge(&plain, None, &short)), Expect::Misfit);
    }

    #[test]
    fn a_first_request_learns_the_version() {
        let first = Asked {
            range: Some(0..u64::MAX),
            max_skip: 0,
        };
        let whole = Seen {
            content_range: Some(Some(ContentRange::Bytes {
                first: 0,
                last: TOTAL - 1,
                total: Some(TOTAL),
            })),
            content_length: Some(TOTAL),
            ..seen(206, Cr::Exact, V::Missing, true, TOTAL)
        };
        assert_eq!(
            judge(&first, None, &whole),
            Verdict::Part {
                body: 0..TOTAL,
                total: Some(TOTAL)
            }
        );
    }

    #[test]
    fn a_416_is_a_misfit_unless_it_shows_another_size() {
        let answer = |total| Seen {
            status: 416,
            content_range: Some(Some(ContentRange::Unsatisfied { total })),
            validator: Validator::default(),
            content_length: None,
        };
        assert_eq!(
            outcome(judge(&resume(), Some(&known()), &answer(TOTAL))),
            Expect::Misfit
        );
        assert_eq!(
            outcome(judge(&resume(), Some(&known()), &answer(10))),
            Expect::Untrusted
        );
    }

    #[test]
    fn validators_compare_on_what_if_range_sends() {
        let etag = validator(Some(ETAG), Some("Mon, 01 Jan 2024 00:00:00 GMT"));
        assert_eq!(etag.compare(&validator(Some(ETAG), None)), Comparison::Same);
        assert_eq!(
            etag.compare(&validator(None, Some("Mon, 01 Jan 2024 00:00:00 GMT"))),
            Comparison::Missing
        );
        let dated = validator(None, Some("Mon, 01 Jan 2024 00:00:00 GMT"));
        assert_eq!(
            dated.compare(&validator(
                Some(ETAG),
                Some("Mon, 01 Jan 2024 00:00:00 GMT")
            )),
            Comparison::Same
        );
        assert_eq!(
            dated.compare(&validator(None, Some("Tue, 02 Jan 2024 00:00:00 GMT"))),
            Comparison::Other
        );
        assert_eq!(Validator::default().compare(&dated), Comparison::Missing);
    }
}
