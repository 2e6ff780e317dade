//! Proxies from the environment, by curl's rules.
//!
//! - `http_proxy` serves `http://` URLs, `https_proxy` serves `https://` URLs,
//!   and `all_proxy` serves both when the scheme's own variable is unset.
//! - Each name is read in lower case first, then in upper case (`HTTPS_PROXY`,
//!   `ALL_PROXY`, `NO_PROXY`), as curl does. `HTTP_PROXY` in upper case, which
//!   curl ignores, is honoured as Python's urllib and uv honour it, except in a
//!   CGI program (`REQUEST_METHOD` set), where it can come from a client's
//!   `Proxy:` header ("httpoxy"). An empty value counts as unset.
//! - A proxy without a scheme is `http://`; `http` and `https` proxies work;
//!   any other scheme (socks) is refused with a clear error, never bypassed.
//! - `no_proxy` lists the hosts reached directly, separated by commas or
//!   spaces: a name matches itself and its subdomains (a leading dot changes
//!   nothing), an IP address or CIDR range matches the addresses in it, and `*`
//!   means no proxy at all. Case does not matter.
//!
//! reqwest reads the same variables itself, with other rules (upper case
//! first, and a `*` that does not cover IP addresses), so surefetch turns that
//! off and installs these rules as a custom proxy.

use std::net::IpAddr;

use reqwest::Url;

use crate::error::{Error, Result};
use crate::http::redact;

/// A proxy and the variable it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Proxy {
    pub url: Url,
    pub from: &'static str,
}

/// The proxy settings of the environment (the key of the client cache too: a
/// process that changes its environment gets a client that follows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Proxies {
    http: Option<Proxy>,
    https: Option<Proxy>,
    no_proxy: NoProxy,
}

impl Proxies {
    /// The settings of this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings, reading variables with `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let first = |names: &[&'static str]| {
            names.iter().find_map(|&name| {
                var(name)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (name, v))
            })
        };
        let cgi = var("REQUEST_METHOD").is_some();
        let http_names: &[&'static str] = if cgi {
            &["http_proxy"]
        } else {
            &["http_proxy", "HTTP_PROXY"]
        };
        let all = first(&["all_proxy", "ALL_PROXY"]);
        let pick = |own: Option<(&'static str, String)>| {
            own.or_else(|| all.clone())
                .map(|(from, value)| parse_proxy(from, &value))
                .transpose()
        };
        let no_proxy = first(&["no_proxy", "NO_PROXY"])
            .map(|(_, value)| NoProxy::parse(&value))
            .unwrap_or_default();
        if no_proxy.all {
            return Ok(Self::default());
        }
        Ok(Self {
            http: pick(first(http_names))?,
            https: pick(first(&["https_proxy", "HTTPS_PROXY"]))?,
            no_proxy,
        })
    }

    /// Whether any proxy is set at all.
    pub fn is_empty(&self) -> bool {
        self.http.is_none() && self.https.is_none()
    }

    /// The proxy a request to `url` goes through, if any.
    pub fn for_url(&self, url: &Url) -> Option<&Proxy> {
        let proxy = match url.scheme() {
            "http" => self.http.as_ref(),
            "https" => self.https.as_ref(),
            _ => None,
        }?;
        let host = url.host_str()?;
        let direct = match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => self.no_proxy.has_ip(ip),
            Err(_) => self.no_proxy.has_name(host),
        };
        (!direct).then_some(proxy)
    }
}

/// A proxy URL as curl reads it: `host:port` means `http://host:port`.
fn parse_proxy(from: &'static str, value: &str) -> Result<Proxy> {
    let value = value.trim();
    let text = if value.contains("://") {
        value.to_owned()
    } else {
        format!("http://{value}")
    };
    let refuse = |why: String| {
        Error::InvalidArgument(format!(
            "the proxy {from}={:?} {why}; fix or unset {from}",
            crate::http::redact_text(&text)
        ))
    };
    let url = Url::parse(&text).map_err(|e| refuse(format!("is not a URL ({e})")))?;
    match url.scheme() {
        "http" | "https" if url.host_str().is_some_and(|h| !h.is_empty()) => {
            Ok(Proxy { url, from })
        }
        "http" | "https" => Err(refuse("has no host".into())),
        scheme => Err(refuse(format!(
            "uses {scheme}://, which surefetch does not support: use an http:// or https:// proxy"
        ))),
    }
}

impl Proxy {
    /// The proxy as it may be shown: its password hidden.
    pub fn shown(&self) -> String {
        let shown = redact(&self.url);
        match shown.strip_suffix('/') {
            Some(bare) if self.url.path() == "/" => bare.to_owned(),
            _ => shown,
        }
    }
}

/// The hosts `no_proxy` sends directly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct NoProxy {
    all: bool,
    /// Lower case, without leading or trailing dots.
    names: Vec<String>,
    /// Addresses and ranges: (network, prefix length).
    nets: Vec<(IpAddr, u8)>,
}

impl NoProxy {
    fn parse(value: &str) -> Self {
        let mut list = Self::default();
        for entry in value.split([',', ' ', '\t']).filter(|e| !e.is_empty()) {
            if entry == "*" {
                list.all = true;
                continue;
            }
            let (address, prefix) = match entry.split_once('/') {
                Some((address, prefix)) => (address, prefix.parse::<u8>().ok()),
                None => (entry, None),
            };
            let address = address.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = address.parse::<IpAddr>() {
                let bits = if ip.is_ipv4() { 32 } else { 128 };
                list.nets.push((ip, prefix.unwrap_or(bits).min(bits)));
                continue;
            }
            let name = entry.trim_matches('.').to_ascii_lowercase();
            if !name.is_empty() {
                list.names.push(name);
            }
        }
        list
    }

    fn has_name(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.names.iter().any(|name| {
            host == *name
                || host
                    .strip_suffix(name.as_str())
                    .is_some_and(|rest| rest.ends_with('.'))
        })
    }

    fn has_ip(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|&(net, prefix)| match (net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(&net.octets(), &ip.octets(), prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => same_prefix(&net.octets(), &ip.octets(), prefix),
            _ => false,
        })
    }
}

/// Whether `a` and `b` agree on their first `bits` bits.
fn same_prefix(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let whole = bits / 8;
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = !(0xffu8 >> rest);
        a[whole] & mask == b[whole] & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(vars: &[(&str, &str)]) -> Result<Proxies> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Proxies::from_vars(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    fn via(p: &Proxies, url: &str) -> Option<(String, &'static str)> {
        p.for_url(&Url::parse(url).unwrap())
            .map(|proxy| (proxy.url.to_string(), proxy.from))
    }

    #[test]
    fn each_scheme_has_its_variable_and_all_proxy_fills_in() {
        let p = proxies(&[("https_proxy", "http://s:1"), ("ALL_PROXY", "http://all:2")]).unwrap();
        assert_eq!(
            via(&p, "https://h/x"),
            Some(("http://s:1/".into(), "https_proxy"))
        );
        assert_eq!(
            via(&p, "http://h/x"),
            Some(("http://all:2/".into(), "ALL_PROXY"))
        );
        assert_eq!(via(&proxies(&[]).unwrap(), "http://h/x"), None);
    }

    #[test]
    fn lower_case_wins_and_empty_counts_as_unset() {
        let p = proxies(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:1"),
        ])
        .unwrap();
        assert_eq!(via(&p, "https://h/").unwrap().1, "https_proxy");
        let p = proxies(&[("https_proxy", ""), ("HTTPS_PROXY", "http://upper:1")]).unwrap();
        assert_eq!(via(&p, "https://h/").unwrap().1, "HTTPS_PROXY");
    }

    #[test]
    fn upper_case_http_proxy_is_ignored_only_in_cgi() {
        let vars = [("HTTP_PROXY", "http://p:1")];
        assert!(via(&proxies(&vars).unwrap(), "http://h/").is_some());
        let cgi = [("HTTP_PROXY", "http://p:1"), ("REQUEST_METHOD", "GET")];
        assert!(via(&proxies(&cgi).unwrap(), "http://h/").is_none());
        let cgi_lower = [("http_proxy", "http://p:1"), ("REQUEST_METHOD", "GET")];
        assert!(via(&proxies(&cgi_lower).unwrap(), "http://h/").is_some());
    }

    #[test]
    fn a_star_means_no_proxy_at_all() {
        for (name, value) in [
            ("NO_PROXY", "*"),
            ("no_proxy", "*"),
            ("no_proxy", " * "),
            ("NO_PROXY", "example.org, *"),
        ] {
            let p = proxies(&[("ALL_PROXY", "http://p:1"), (name, value)]).unwrap();
            assert!(p.is_empty(), "{name}={value}");
            for url in [
                "http://127.0.0.1:8/",
                "https://[::1]/",
                "https://example.com/",
            ] {
                assert_eq!(via(&p, url), None, "{name}={value} {url}");
            }
        }
    }

    #[test]
    fn no_proxy_names_addresses_and_ranges() {
        let p = proxies(&[
            ("all_proxy", "http://p:1"),
            (
                "no_proxy",
                ".Example.org,localhost 10.0.0.0/8,::1, 192.168.1.7,fd00::/8",
            ),
        ])
        .unwrap();
        for direct in [
            "http://example.org/",
            "http://www.EXAMPLE.org./",
            "http://localhost:8080/",
            "http://10.1.2.3/",
            "http://[::1]:80/",
            "http://192.168.1.7/",
            "https://[fd12::1]/",
        ] {
            assert_eq!(via(&p, direct), None, "{direct}");
        }
        for proxied in [
            "http://notexample.org/",
            "http://example.org.evil/",
            "http://11.0.0.1/",
            "http://192.168.1.8/",
            "http://[::2]/",
            "http://mylocalhost/",
        ] {
            assert!(via(&p, proxied).is_some(), "{proxied}");
        }
    }

    #[test]
    fn proxy_urls_are_read_as_curl_reads_them() {
        let p = proxies(&[("https_proxy", "127.0.0.1:3128")]).unwrap();
        assert_eq!(via(&p, "https://h/").unwrap().0, "http://127.0.0.1:3128/");
        let err = proxies(&[("ALL_PROXY", "socks5://u:s3cret@h:1080")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("socks5") && err.contains("ALL_PROXY"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let err = proxies(&[("http_proxy", "http://")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("http_proxy"), "{err}");
        let p = proxies(&[("https_proxy", "http://u:s3cret@h:1")]).unwrap();
        let proxy = p.for_url(&Url::parse("https://x/").unwrap()).unwrap();
        assert_eq!(proxy.shown(), "http://u:***@h:1");
    }

    #[test]
    fn prefixes() {
        assert!(same_prefix(&[10, 1, 2, 3], &[10, 9, 9, 9], 8));
        assert!(!same_prefix(&[10, 1, 2, 3], &[11, 1, 2, 3], 8));
        assert!(same_prefix(&[192, 168, 1, 7], &[192, 168, 1, 200], 24));
        assert!(same_prefix(&[192, 168, 1, 7], &[192, 168, 1, 4], 29));
        assert!(!same_prefix(&[192, 168, 1, 7], &[192, 168, 1, 8], 29));
        assert!(same_prefix(&[1, 2, 3, 4], &[5, 6, 7, 8], 0));
    }
}
