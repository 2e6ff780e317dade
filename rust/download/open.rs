//! Asking: each request of an attempt (a resume, a fresh start, a plain GET,
//! one unit), and what its answer may be used for (`crate::response::judge`).

use std::ops::Range;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::StatusCode;

use super::{ranges_refused, validator_of_sidecar, Body, Job, Kept, Mode, Start, UNIT_MAX_SKIP};
use crate::error::{Error, Result};
use crate::http;
use crate::http::ContentRange;
use crate::response::{judge, Asked, Comparison, Known, Seen, Unusable, Validator, Verdict};
use crate::schedule::{Target, Transfer};

impl Job<'_> {
    /// `base` with `Range` (an end of `u64::MAX` asks to the end) and `If-Range`.
    pub(super) fn ranged(
        base: &HeaderMap,
        range: &Range<u64>,
        validator: Option<&Validator>,
    ) -> HeaderMap {
        let mut headers = base.clone();
        let value = if range.end == u64::MAX {
            format!("bytes={}-", range.start)
        } else {
            format!("bytes={}-{}", range.start, range.end - 1)
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(header::RANGE, value);
        }
        if let Some(tag) = validator.and_then(Validator::if_range) {
            if let Ok(value) = HeaderValue::from_str(tag) {
                headers.insert(header::IF_RANGE, value);
            }
        }
        headers
    }

    /// Asks for the first range `kept` is missing, under the validator it was
    /// recorded with (`If-Range`).
    pub(super) async fn open_kept(&self, kept: Kept) -> Result<(Start, Option<Kept>)> {
        let size = kept.sidecar.size.unwrap_or(0);
        let Some(missing) = kept.ranges.missing(size).into_iter().next() else {
            return Ok((Start::Complete, Some(kept)));
        };
        // Open-ended to the end of the file: no large range end for servers to trip on.
        let end = if missing.end >= size {
            u64::MAX
        } else {
            missing.end
        };
        let asked = Asked {
            range: Some(missing.start..end),
            max_skip: u64::MAX,
        };
        let known = kept.known();
        self.set_known(known.clone());

        let validator = validator_of_sidecar(&kept.sidecar);
        crate::journal::note(
            crate::journal::Level::Info,
            format!(
                "{}: resuming at byte {} of {size} (If-Range {})",
                self.shown_url,
                missing.start,
                validator.if_range().unwrap_or("-")
            ),
        );
        let headers = Self::ranged(&self.headers, &(missing.start..end), Some(&validator));
        let opened = match self
            .http
            .open(&self.url, &headers, &self.host_credentials, &self.guard)
            .await
        {
            Err(Error::Http { status, .. }) if ranges_refused(status) => {
                return Ok((self.open_plain().await?, None));
            }
            other => other?,
        };
        let seen = Seen::of(&opened.response);
        match judge(&asked, known.as_ref(), &seen) {
            Verdict::Part { body, total } => {
                let target = Target {
                    url: opened.url,
                    headers: opened.headers,
                };
                let body = Body {
                    response: opened.response,
                    start: body.start,
                    holds_until: body.end,
                };
                let asked = missing.start..end;
                let start = Start::Partial {
                    body,
                    asked,
                    total,
                    target,
                };
                Ok((start, Some(kept)))
            }
            // The server ignored the range, or If-Range saw another version:
            // this body is the whole (current) file, so start over with it.
            Verdict::Whole { total } => {
                let target = Target {
                    url: opened.url,
                    headers: opened.headers,
                };
                Ok((Start::Whole(opened.response, total, target), None))
            }
            Verdict::Unusable(Unusable::Untrusted(detail)) => Err(self.changed(detail)),
            Verdict::Unusable(Unusable::Misfit(detail)) if seen.status == 416 => {
                let _ = detail;
                Ok((self.open_plain().await?, None))
            }
            Verdict::Unusable(Unusable::Misfit(detail)) => Err(self.unusable(detail)),
        }
    }

    /// A fresh start. With several connections possible, asks for `bytes=0-`, so
    /// that a `206` tells the size and that ranges work; otherwise a plain GET.
    /// Remembers the size an answer states under a validator (even an answer that
    /// cannot be used), so that a later body of that version that ends short of it
    /// is known to be cut.
    fn learn(&self, seen: &Seen) {
        let total = match seen.content_range {
            Some(Some(ContentRange::Bytes { total, .. })) => total,
            Some(Some(ContentRange::Unsatisfied { total })) => Some(total),
            _ => None,
        };
        if let Some(total) = total.filter(|_| seen.validator.if_range().is_some()) {
            if self.known().is_none() {
                self.set_known(Some(Known {
                    validator: seen.validator.clone(),
                    total,
                }));
            }
        }
    }

    /// `headers` with the caller's revalidation validators (a fresh start only).
    fn conditional(&self, mut headers: HeaderMap) -> HeaderMap {
        let validators = [
            (header::IF_NONE_MATCH, &self.options.if_none_match),
            (header::IF_MODIFIED_SINCE, &self.options.if_modified_since),
        ];
        for (name, value) in validators {
            if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(name, value);
            }
        }
        headers
    }

    pub(super) async fn open_fresh(&self, mode: Mode) -> Result<Start> {
        if mode != Mode::Parallel {
            return self.open_plain().await;
        }
        let whole = 0..u64::MAX;
        let asked = Asked {
            range: Some(whole.clone()),
            max_skip: 0,
        };
        let headers = self.conditional(Self::ranged(&self.headers, &whole, None));
        let opened = match self
            .http
            .open(&self.url, &headers, &self.host_credentials, &self.guard)
            .await
        {
            // Ranges unusable here: ask once more without one.
            Err(Error::Http { status, .. }) if ranges_refused(status) => {
                return self.open_plain().await
            }
            other => other?,
        };
        if opened.response.status() == StatusCode::NOT_MODIFIED {
            return Err(Error::NotModified);
        }
        let target = Target {
            url: opened.url,
            headers: opened.headers,
        };
        let seen = Seen::of(&opened.response);
        self.learn(&seen);
        match judge(&asked, None, &seen) {
            Verdict::Part {
                body,
                total: Some(total),
            } => Ok(Start::Partial {
                body: Body {
                    response: opened.response,
                    start: body.start,
                    holds_until: body.end,
                },
                asked: whole,
                total: Some(total),
                target,
            }),
            Verdict::Whole { total } => Ok(Start::Whole(opened.response, total, target)),
            // An empty file has no byte 0 (416), and a range of a file of unknown
            // size cannot be split: ask again without a range.
            Verdict::Part { total: None, .. } => self.open_plain().await,
            Verdict::Unusable(Unusable::Misfit(_)) if opened.response.status() == 416 => {
                self.open_plain().await
            }
            Verdict::Unusable(Unusable::Misfit(detail) | Unusable::Untrusted(detail)) => {
                Err(self.unusable(detail))
            }
        }
    }

    /// A GET without `Range`, which must be answered with the whole file.
    pub(super) async fn open_plain(&self) -> Result<Start> {
        let known = self.known();
        let headers = self.conditional(self.headers.clone());
        let opened = self
            .http
            .open(&self.url, &headers, &self.host_credentials, &self.guard)
            .await?;
        if opened.response.status() == StatusCode::NOT_MODIFIED {
            return Err(Error::NotModified);
        }
        let asked = Asked {
            range: None,
            max_skip: 0,
        };
        let status = opened.response.status();
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Err(Error::Http {
                status: 416,
                url: http::redact(&opened.url),
                retry_after: None,
            });
        }
        match judge(&asked, known.as_ref(), &Seen::of(&opened.response)) {
            Verdict::Whole { total } => {
                let target = Target {
                    url: opened.url,
                    headers: opened.headers,
                };
                Ok(Start::Whole(opened.response, total, target))
            }
            Verdict::Part { .. } => Err(self.unusable("a plain request was answered 206".into())),
            Verdict::Unusable(Unusable::Misfit(detail) | Unusable::Untrusted(detail)) => {
                Err(self.unusable(detail))
            }
        }
    }

    /// Asks for one unit where the attempt's first request was redirected to,
    /// resolving again from the original URL when that place refuses (a signed
    /// URL that expired).
    pub(super) async fn open_unit(&self, transfer: &Transfer, unit: Range<u64>) -> Result<Body> {
        let size = transfer.size.unwrap_or(u64::MAX);
        let range = unit.start..if unit.end >= size { u64::MAX } else { unit.end };
        let target = transfer.target();
        let headers = Self::ranged(&target.headers, &range, Some(&transfer.validator));
        let opened = match self
            .http
            .open(&target.url, &headers, &self.host_credentials, &self.guard)
            .await
        {
            Err(Error::Http { status, .. })
                if matches!(status, 401 | 403 | 410) && target.url != self.url =>
            {
                let headers = Self::ranged(&self.headers, &range, Some(&transfer.validator));
                let opened = self
                    .http
                    .open(&self.url, &headers, &self.host_credentials, &self.guard)
                    .await;
                if let Ok(opened) = &opened {
                    transfer.retarget(Target {
                        url: opened.url.clone(),
                        headers: opened.headers.clone(),
                    });
                }
                opened
            }
            other => other,
        };
        let opened = match opened {
            Err(Error::Http { status, .. }) if ranges_refused(status) => {
                return Err(self.unusable_unit(format!("a range request was answered {status}")))
            }
            other => other?,
        };
        let asked = Asked {
            range: Some(range),
            max_skip: UNIT_MAX_SKIP,
        };
        let known = transfer.known();
        let seen = Seen::of(&opened.response);
        match judge(&asked, known.as_ref(), &seen) {
            Verdict::Part { body, .. } => Ok(Body {
                response: opened.response,
                start: body.start,
                holds_until: body.end,
            }),
            Verdict::Whole { .. }
                if transfer.validator.compare(&seen.validator) == Comparison::Other =>
            {
                Err(self.changed("its ETag or Last-Modified changed".into()))
            }
            Verdict::Whole { .. } => {
                Err(self.unusable_unit("a range request was answered 200".into()))
            }
            Verdict::Unusable(Unusable::Untrusted(detail)) => Err(self.changed(detail)),
            Verdict::Unusable(Unusable::Misfit(detail)) => Err(self.unusable_unit(detail)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::cancel::CancelToken;
    use crate::options::{Options, Progress};

    fn validator(etag: Option<&str>, last_modified: Option<&str>) -> Validator {
        Validator {
            etag: etag.map(str::to_owned),
            last_modified: last_modified.map(str::to_owned),
        }
    }

    fn header_of(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
        headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn a_range_asks_what_it_covers_under_the_validator_it_was_recorded_with() {
        let date = "Wed, 21 Oct 2015 07:28:00 GMT";
        // (range, the validator it was recorded with, Range asked, If-Range sent)
        type Case = (
            Range<u64>,
            Option<Validator>,
            &'static str,
            Option<&'static str>,
        );
        let cases: [Case; 5] = [
            (0..u64::MAX, None, "bytes=0-", None),
            (4096..u64::MAX, None, "bytes=4096-", None),
            (
                100..200,
                Some(validator(Some("\"v1\""), None)),
                "bytes=100-199",
                Some("\"v1\""),
            ),
            // The strong ETag wins over the date; a date alone is used when it is all.
            (
                0..1,
                Some(validator(Some("\"v1\""), Some(date))),
                "bytes=0-0",
                Some("\"v1\""),
            ),
            (
                5..10,
                Some(validator(None, Some(date))),
                "bytes=5-9",
                Some(date),
            ),
        ];
        let mut base = HeaderMap::new();
        base.insert(header::USER_AGENT, HeaderValue::from_static("t"));
        for (range, known, asked, if_range) in cases {
            let headers = Job::ranged(&base, &range, known.as_ref());
            assert_eq!(header_of(&headers, header::RANGE), Some(asked), "{range:?}");
            assert_eq!(header_of(&headers, header::IF_RANGE), if_range, "{range:?}");
            assert_eq!(header_of(&headers, header::USER_AGENT), Some("t"));
        }
        let none = Job::ranged(&base, &(0..10), Some(&validator(None, None)));
        assert_eq!(header_of(&none, header::IF_RANGE), None);
    }

    #[test]
    fn revalidation_sends_the_callers_validators_and_skips_unsendable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f.bin");
        let options = Options {
            if_none_match: Some("\"abc\"".into()),
            if_modified_since: Some("bad\nvalue".into()),
            ..Options::default()
        };
        let job = Job::new(
            "http://127.0.0.1:9/f.bin",
            Path::new(&dest),
            &options,
            CancelToken::new(),
            Progress::new(),
        )
        .unwrap();
        let headers = job.conditional(HeaderMap::new());
        assert_eq!(header_of(&headers, header::IF_NONE_MATCH), Some("\"abc\""));
        assert_eq!(header_of(&headers, header::IF_MODIFIED_SINCE), None);
        let plain = Options::default();
        let job = Job::new(
            "http://127.0.0.1:9/f.bin",
            &dest,
            &plain,
            CancelToken::new(),
            Arc::clone(&Progress::new()),
        )
        .unwrap();
        assert!(job.conditional(HeaderMap::new()).is_empty());
    }
}
