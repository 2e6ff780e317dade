//! HTTP: one shared client per connect timeout and proxy setting, safe
//! defaults, and redirects followed by hand so that every hop is checked
//! (scheme, downgrade, credentials).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Response, StatusCode, Url};

use crate::error::{Error, Result, TimeoutKind};
use crate::guard::Guard;
use crate::journal;
use crate::proxy::Proxies;
use crate::retry::parse_retry_after;

pub const MAX_REDIRECTS: usize = 10;
const USER_AGENT: &str = concat!("surefetch/", env!("CARGO_PKG_VERSION"));
/// Headers that must not follow a redirect to another host.
const CREDENTIAL_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
];

/// The shared HTTP clients, by connect timeout and proxy settings.
type Clients = HashMap<(Duration, Arc<Proxies>), Client>;
static CLIENTS: Mutex<Option<Clients>> = Mutex::new(None);

/// Drops every shared client (their connections belong to a runtime that is gone).
pub fn forget_clients() {
    *CLIENTS.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// The shared HTTP client (one per connect timeout and proxy setting, so
/// connections are reused across calls) and what it was built with.
#[derive(Clone)]
pub struct Http {
    client: Client,
    connect_timeout: Duration,
    proxies: Arc<Proxies>,
}

impl Http {
    /// The client for `connect_timeout` and the proxy settings the environment
    /// has now (see `proxy`: curl's rules, read at every call).
    pub fn shared(connect_timeout: Duration) -> Result<Self> {
        let proxies = Arc::new(Proxies::from_env()?);
        let mut clients = CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
        let clients = clients.get_or_insert_with(Default::default);
        let key = (connect_timeout, Arc::clone(&proxies));
        let client = match clients.get(&key) {
            Some(client) => client.clone(),
            None => {
                // reqwest's own reading of the environment is off (`no_proxy()`).
                let mut builder = Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .user_agent(USER_AGENT)
                    .no_proxy();
                if !proxies.is_empty() {
                    let rules = Arc::clone(&proxies);
                    builder = builder.proxy(reqwest::Proxy::custom(move |url| {
                        rules.for_url(url).map(|proxy| proxy.url.clone())
                    }));
                }
                let client = builder.build().map_err(|e| {
                    Error::network(format!("could not set up HTTP: {}", describe(&e)), false)
                })?;
                clients.insert(key, client.clone());
                client
            }
        };
        Ok(Self {
            client,
            connect_timeout,
            proxies,
        })
    }

    /// Sends a GET and follows up to `MAX_REDIRECTS` redirects, checking each hop: one
    /// that leaves the origin drops the credential headers, and carries instead the
    /// `credentials` of its host, if any. Non-success statuses become `Error::Http`.
    pub async fn open(
        &self,
        url: &Url,
        headers: &HeaderMap,
        credentials: &HostCredentials,
        guard: &Guard,
    ) -> Result<Opened> {
        let mut url = url.clone();
        let mut headers = headers.clone();
        for _ in 0..=MAX_REDIRECTS {
            let request = self.client.get(url.clone()).headers(headers.clone());
            let response = guard
                .read(request.send())
                .await?
                .map_err(|e| self.transport_error(&e, &url))?;
            let status = response.status();
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        Error::network(
                            format!(
                                "redirect from {} without a usable Location header",
                                redact(&url)
                            ),
                            false,
                        )
                    })?;
                let next = redirect_target(&url, location)?;
                journal::note(
                    journal::Level::Info,
                    format!(
                        "{} redirected ({}) to {}",
                        redact(&url),
                        status.as_u16(),
                        redact(&next)
                    ),
                );
                if !same_origin(&url, &next) {
                    for name in &CREDENTIAL_HEADERS {
                        headers.remove(name);
                    }
                    if let Some(value) = next.host_str().and_then(|h| credentials.for_host(h)) {
                        journal::note(
                            journal::Level::Info,
                            format!(
                                "using the netrc entry for {}",
                                next.host_str().unwrap_or("")
                            ),
                        );
                        headers.insert(header::AUTHORIZATION, value.clone());
                    }
                }
                url = next;
                continue;
            }
            // 416 answers a range request: the caller reads its Content-Range; 304
            // answers a conditional request, and only a conditional one.
            let conditional = headers.contains_key(header::IF_NONE_MATCH)
                || headers.contains_key(header::IF_MODIFIED_SINCE);
            if !status.is_success()
                && status != StatusCode::RANGE_NOT_SATISFIABLE
                && !(status == StatusCode::NOT_MODIFIED && conditional)
            {
                return Err(status_error(&response, &url));
            }
            return Ok(Opened {
                response,
                url,
                headers,
            });
        }
        Err(Error::network(
            format!(
                "more than {MAX_REDIRECTS} redirects starting at {}: the server is misconfigured or loops",
                redact(&url)
            ),
            false,
        ))
    }

    /// Maps a transport error to ours: connect failures and cut bodies are retryable.
    pub fn transport_error(&self, e: &reqwest::Error, url: &Url) -> Error {
        if e.is_timeout() && e.is_connect() {
            // Only the connect timeout is set on the client; read timeouts are ours.
            return Error::Timeout {
                kind: TimeoutKind::Connect,
                after: self.connect_timeout,
            };
        }
        let shown = redact(url);
        let proxy = self.proxies.for_url(url);
        let message = match proxy {
            Some(proxy) if e.is_connect() && reached_nothing(e) => format!(
                "could not connect to the proxy {} (from {}) for {shown}: {}: check the proxy, or unset {} (or list the host in NO_PROXY) to connect directly",
                proxy.shown(),
                proxy.from,
                root_cause(e),
                proxy.from
            ),
            Some(proxy) if e.is_connect() => format!(
                "the proxy {} (from {}) did not open a connection to {shown}: {}: check the proxy, its credentials and its logs",
                proxy.shown(),
                proxy.from,
                describe(e)
            ),
            Some(proxy) => format!(
                "request to {shown} through the proxy {} (from {}) failed: {}",
                proxy.shown(),
                proxy.from,
                describe(e)
            ),
            None => String::new(),
        };
        if let Some(proxy) = proxy {
            let message = hide_password(hide_password(message, url), &proxy.url);
            return Error::network(message, true);
        }
        let message = if e.is_connect() {
            format!(
                "could not connect to {shown}: {}: check the URL and that the server is up",
                root_cause(e)
            )
        } else if e.is_body() || e.is_decode() {
            format!(
                "the connection broke while reading from {shown}: {}",
                root_cause(e)
            )
        } else {
            format!("request to {shown} failed: {}", describe(e))
        };
        Error::network(hide_password(message, url), true)
    }
}

fn status_error(response: &Response, url: &Url) -> Error {
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    Error::Http {
        status: response.status().as_u16(),
        url: redact(url),
        retry_after,
    }
}

/// `url` as it may be shown: a password in its userinfo, and the values of query
/// parameters named like credentials (`CREDENTIAL_PARAMETERS`: presigned URLs'
/// signatures, `token`, `api_key`...), become `***`, so that no message, log line
/// or file another user can read carries them. The same rule as Python's
/// `surefetch.errors.redact_url`.
pub fn redact(url: &Url) -> String {
    let query = url.query().map(redact_query);
    if url.password().is_none() && query.as_deref() == url.query() {
        return url.to_string();
    }
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.set_query(query.as_deref());
    shown.to_string()
}

/// Query parameters whose values are credentials (compared without case).
pub const CREDENTIAL_PARAMETERS: &[&str] = &[
    "access_token",
    "api_key",
    "apikey",
    "auth",
    "client_secret",
    "key",
    "password",
    "passwd",
    "secret",
    "sig",
    "signature",
    "token",
    "x-amz-credential",
    "x-amz-security-token",
    "x-amz-signature",
    "x-goog-credential",
    "x-goog-signature",
];

/// A query string with the values of credential parameters replaced by `***`.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if !value.is_empty() && is_credential(name) => {
                format!("{name}=***")
            }
            Some((name, value)) => match nested_url_redacted(value) {
                Some(shown) => format!("{name}={shown}"),
                None => pair.to_owned(),
            },
            None => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A URL given as a query value (`?next=https://user:pw@...`, encoded or not) with its
/// own secrets hidden, shown decoded; None when it has none (or is no URL).
fn nested_url_redacted(value: &str) -> Option<String> {
    let inner = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
    if !inner.contains("://") {
        return None;
    }
    let shown = redact_text(&inner);
    (shown != inner).then_some(shown)
}

fn is_credential(name: &str) -> bool {
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    CREDENTIAL_PARAMETERS
        .iter()
        .any(|known| name.eq_ignore_ascii_case(known))
}

/// `url` (possibly unparsable text) as it may be shown; see `redact`.
pub fn redact_text(url: &str) -> String {
    match Url::parse(url) {
        Ok(parsed) => redact(&parsed),
        // Not a URL: hide anything between "//" and an "@" that looks like userinfo.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}***{}", &url[..scheme_end + 3], &url[at..])
            }
            _ => url.to_owned(),
        },
    }
}

/// Parses a URL, accepting only http and https.
pub fn parse_url(url: &str) -> Result<Url> {
    let parsed = Url::parse(url)
        .map_err(|e| Error::InvalidArgument(format!("invalid URL {:?}: {e}", redact_text(url))))?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some() => Ok(parsed),
        "http" | "https" => Err(Error::InvalidArgument(format!(
            "invalid URL {:?}: no host",
            redact(&parsed)
        ))),
        scheme => Err(Error::InvalidArgument(format!(
            "unsupported URL scheme {scheme:?} in {:?}: only http and https are allowed",
            redact(&parsed)
        ))),
    }
}

/// Turns caller-supplied headers into a header map, with the safe defaults.
pub fn request_headers(extra: &[(String, String)]) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (name, value) in extra {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::InvalidArgument(format!("invalid header name {name:?}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| Error::InvalidArgument(format!("invalid value for header {name}")))?;
        headers.append(name, value);
    }
    // The file must hold the bytes the server has, never a re-encoded form.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    Ok(headers)
}

/// `Authorization` values by host, for the hops of a redirect that leave the origin
/// (from netrc: one per machine; the host `""` stands for its `default` entry), as
/// requests applies netrc to where a redirect leads.
#[derive(Debug, Clone, Default)]
pub struct HostCredentials(Vec<(String, HeaderValue)>);

impl HostCredentials {
    /// From `(host, value)` pairs; a value that cannot be sent is an
    /// `InvalidArgument` that names the host, never the value.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self> {
        let mut parsed = Vec::with_capacity(pairs.len());
        for (host, value) in pairs {
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                Error::InvalidArgument(format!("invalid credentials for host {host:?}"))
            })?;
            value.set_sensitive(true);
            parsed.push((host.to_ascii_lowercase(), value));
        }
        Ok(Self(parsed))
    }

    /// The value for `host`: its own entry, else the default one.
    fn for_host(&self, host: &str) -> Option<&HeaderValue> {
        let host = host.to_ascii_lowercase();
        let find = |wanted: &str| self.0.iter().find(|(h, _)| h == wanted).map(|(_, v)| v);
        find(&host).or_else(|| find(""))
    }
}

/// The response that ends a redirect chain, the URL that gave it, and the
/// headers sent there (credentials dropped if a redirect left the origin).
pub struct Opened {
    pub response: Response,
    pub url: Url,
    pub headers: HeaderMap,
}

/// Where a redirect leads, refusing other schemes and https → http downgrades.
fn redirect_target(from: &Url, location: &str) -> Result<Url> {
    let next = from.join(location).map_err(|e| {
        Error::network(
            format!(
                "bad redirect from {} to {:?}: {e}",
                redact(from),
                redact_text(location)
            ),
            false,
        )
    })?;
    let refused = |why: String| {
        Error::network(
            format!(
                "refused redirect from {} to {}: {why}",
                redact(from),
                redact(&next)
            ),
            false,
        )
    };
    match (from.scheme(), next.scheme()) {
        (_, "http" | "https") if next.host_str().is_none() => Err(refused("no host".into())),
        ("https", "http") => Err(refused("a downgrade from https to plain http".into())),
        (_, "http" | "https") => Ok(next),
        (_, scheme) => Err(refused(format!(
            "scheme {scheme:?} is not allowed, only http and https"
        ))),
    }
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.host_str() == b.host_str() && a.port_or_known_default() == b.port_or_known_default()
}

/// `text` with `url`'s password (as written in the URL, and decoded) replaced by
/// `***`: for texts of other libraries, which may quote the URL whole.
pub fn hide_password(text: String, url: &Url) -> String {
    let Some(password) = url.password().filter(|p| !p.is_empty()) else {
        return text;
    };
    let decoded = percent_decode(password);
    let text = text.replace(password, "***");
    if decoded.is_empty() {
        text
    } else {
        text.replace(&decoded, "***")
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a connect error failed before reaching anyone: its root cause is an
/// I/O error (refused, unreachable, reset, name not resolved), not a protocol
/// error from a proxy that answered (a refused tunnel).
fn reached_nothing(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.is::<std::io::Error>() || cause.to_string().contains("dns error")
}

/// The innermost cause, which names what actually went wrong ("Connection refused").
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// An error with its chain of causes, which reqwest keeps out of its `Display`.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A response's `Content-Range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes first-last/total` (total `None` for `*`): the body holds `[first, last]`.
    Bytes {
        first: u64,
        last: u64,
        total: Option<u64>,
    },
    /// `bytes */total`, with a 416.
    Unsatisfied { total: u64 },
}

pub fn content_range(response: &Response) -> Option<ContentRange> {
    let value = response
        .headers()
        .get(header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    parse_content_range(value)
}

fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes ")?.trim();
    let (span, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if span.trim() == "*" {
        return total.map(|total| ContentRange::Unsatisfied { total });
    }
    let (first, last) = span.split_once('-')?;
    let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    if first > last || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some(ContentRange::Bytes { first, last, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_urls_are_redacted() {
        for (url, shown) in [
            ("http://user:pw@h/x", "http://user:***@h/x"),
            ("http://h/x?token=abc&a=1", "http://h/x?token=***&a=1"),
            (
                "https://b.s3/x?X-Amz-Signature=zz&X-Amz-Credential=cc#f",
                "https://b.s3/x?X-Amz-Signature=***&X-Amz-Credential=***#f",
            ),
            ("http://h/x?Api%5FKey=s", "http://h/x?Api%5FKey=***"),
            ("http://h/x?throttle=1&cut=2", "http://h/x?throttle=1&cut=2"),
            ("http://h/x?key=", "http://h/x?key="),
            ("http://u:p@h/x?sig=1", "http://u:***@h/x?sig=***"),
            ("http://h/x?next=a:b@c", "http://h/x?next=a:b@c"),
            (
                "http://h/x?to=http://v:pw@h2/n&a=1",
                "http://h/x?to=http://v:***@h2/n&a=1",
            ),
            (
                "http://h/x?to=http%3A%2F%2Fv%3Apw%40h2%2Fn",
                "http://h/x?to=http://v:***@h2/n",
            ),
            (
                "http://h/x?to=http%3A%2F%2Fh2%2Fn",
                "http://h/x?to=http%3A%2F%2Fh2%2Fn",
            ),
        ] {
            assert_eq!(redact(&Url::parse(url).unwrap()), shown, "{url}");
        }
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some(ContentRange::Bytes {
                first: 0,
                last: 99,
                total: Some(1000)
            })
        );
        assert_eq!(
            parse_content_range("bytes 5-9/*"),
            Some(ContentRange::Bytes {
                first: 5,
                last: 9,
                total: None
            })
        );
        assert_eq!(
            parse_content_range("bytes */42"),
            Some(ContentRange::Unsatisfied { total: 42 })
        );
        for bad in [
            "bytes 9-5/10",
            "bytes 0-10/10",
            "items 0-1/2",
            "bytes x-1/2",
            "bytes */*",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_http_and_https() {
        assert!(parse_url("https://example.org/a").is_ok());
        assert!(parse_url("http://127.0.0.1:8080/a").is_ok());
        for bad in [
            "file:///etc/passwd",
            "ftp://h/a",
            "data:,x",
            "not a url",
            "http://",
        ] {
            assert!(
                matches!(parse_url(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn identity_encoding_is_forced() {
        let h = request_headers(&[("Accept-Encoding".into(), "gzip".into())]).unwrap();
        assert_eq!(h.get_all(header::ACCEPT_ENCODING).iter().count(), 1);
        assert_eq!(h[header::ACCEPT_ENCODING], "identity");
        assert!(request_headers(&[("bad name".into(), "v".into())]).is_err());
    }

    #[test]
    fn credentials_are_found_by_host_else_by_the_default_entry() {
        let pairs = |list: &[(&str, &str)]| {
            list.iter()
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let own = HostCredentials::parse(&pairs(&[("Mirror.Example", "Basic bQ==")])).unwrap();
        assert_eq!(own.for_host("mirror.example").unwrap(), "Basic bQ==");
        assert!(own.for_host("other.example").is_none());
        let with_default =
            HostCredentials::parse(&pairs(&[("a.example", "Basic YQ=="), ("", "Basic ZA==")]))
                .unwrap();
        assert_eq!(with_default.for_host("a.example").unwrap(), "Basic YQ==");
        assert_eq!(with_default.for_host("b.example").unwrap(), "Basic ZA==");
        assert!(with_default.for_host("b.example").unwrap().is_sensitive());
        let bad = HostCredentials::parse(&pairs(&[("h", "Basic s3cret\n")])).unwrap_err();
        assert!(!bad.to_string().contains("s3cret"), "{bad}");
    }

    #[test]
    fn redirects_are_checked_per_hop() {
        let https = Url::parse("https://h/a/b").unwrap();
        assert_eq!(
            redirect_target(&https, "c").unwrap().as_str(),
            "https://h/a/c"
        );
        assert_eq!(
            redirect_target(&https, "https://other/x").unwrap().as_str(),
            "https://other/x"
        );
        let downgrade = redirect_target(&https, "http://h/a").unwrap_err();
        assert!(downgrade.to_string().contains("downgrade"), "{downgrade}");
        let http = Url::parse("http://h/a").unwrap();
        assert!(redirect_target(&http, "https://h/a").is_ok());
        for bad in ["file:///etc/passwd", "ftp://h/x", "javascript:alert(1)"] {
            let err = redirect_target(&http, bad).unwrap_err();
            assert!(err.to_string().contains("only http and https"), "{err}");
        }
    }

    #[test]
    fn passwords_are_never_shown() {
        let url = Url::parse("https://user:s3cret@h/a?x=1").unwrap();
        assert_eq!(redact(&url), "https://user:***@h/a?x=1");
        let plain = Url::parse("https://user@h/a").unwrap();
        assert_eq!(redact(&plain), "https://user@h/a");
        assert_eq!(
            redact_text("https://u:s3cret@h:99999/"),
            "https://***@h:99999/"
        );
        let text = "error sending request for url (https://user:s3%2Fx@h/a): s3/x".to_owned();
        let url = Url::parse("https://user:s3%2Fx@h/a").unwrap();
        assert_eq!(
            hide_password(text, &url),
            "error sending request for url (https://user:***@h/a): ***"
        );
        for bad in ["ftp://u:s3cret@h/x", "https://u:s3cret@/x"] {
            let err = parse_url(bad).unwrap_err().to_string();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn origins() {
        let a = Url::parse("http://h:80/x").unwrap();
        assert!(same_origin(&a, &Url::parse("http://h/y").unwrap()));
        assert!(!same_origin(&a, &Url::parse("http://h:81/y").unwrap()));
        assert!(!same_origin(&a, &Url::parse("http://other/y").unwrap()));
    }
}
