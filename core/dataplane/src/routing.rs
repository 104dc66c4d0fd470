//! Request matching: the first route whose every condition holds wins.

use http::{HeaderMap, Method};
use regex::Regex;

use crate::config::{HeaderMatchConfig, MatchConfig};
use crate::Error;

#[derive(Debug)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: matches any non-empty label prefix.
    Suffix(String),
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum HeaderValueMatch {
    Present,
    Exact(String),
    Regex(Regex),
}

#[derive(Debug)]
pub(crate) struct HeaderMatch {
    name: http::HeaderName,
    value: HeaderValueMatch,
}

#[derive(Debug)]
pub struct Matcher {
    host: HostMatch,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<HeaderMatch>,
}

fn compile_regex(pattern: &str, what: &str) -> Result<Regex, Error> {
    Regex::new(pattern).map_err(|e| Error::Config(format!("{what}: invalid regex {pattern:?}: {e}")))
}

impl Matcher {
    /// Compiles a route's match block; `at` names the route in error messages.
    pub fn compile(config: &MatchConfig, at: &str) -> Result<Self, Error> {
        let host = match config.host.as_deref() {
            None | Some("*") => HostMatch::Any,
            Some(host) => match host.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(host.to_ascii_lowercase()),
            },
        };
        let path = match (&config.path, &config.path_prefix, &config.path_regex) {
            (Some(p), _, _) => PathMatch::Exact(p.clone()),
            (_, Some(p), _) if p == "/" || p.is_empty() => PathMatch::Any,
            (_, Some(p), _) => PathMatch::Prefix(p.clone()),
            (_, _, Some(r)) => PathMatch::Regex(compile_regex(r, &format!("{at}.match.path_regex"))?),
            _ => PathMatch::Any,
        };
        let methods = config
            .methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| Error::Config(format!("{at}.match.method: invalid method {m:?}")))
            })
            .collect::<Result<_, _>>()?;
        let headers = config.headers.iter().map(|h| compile_header(h, at)).collect::<Result<_, _>>()?;
        Ok(Self { host, path, methods, headers })
    }

    /// Whether matching looks at headers at all (callers without a header map skip building one).
    pub fn has_header_conditions(&self) -> bool {
        !self.headers.is_empty()
    }

    /// `host` is lower-case with any port removed.
    pub fn matches(&self, host: &str, path: &str, method: &Method, headers: &HeaderMap) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        };
        host_ok
            && match &self.path {
                PathMatch::Any => true,
                PathMatch::Exact(p) => p == path,
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
                PathMatch::Regex(r) => r.is_match(path),
            }
            && (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|h| h.matches(headers))
    }
}

pub(crate) fn compile_header(config: &HeaderMatchConfig, at: &str) -> Result<HeaderMatch, Error> {
    let name = http::HeaderName::from_bytes(config.name.as_bytes())
        .map_err(|_| Error::Config(format!("{at}.match.headers: invalid header name {:?}", config.name)))?;
    let value = match (&config.exact, &config.regex) {
        (Some(exact), _) => HeaderValueMatch::Exact(exact.clone()),
        (_, Some(r)) => HeaderValueMatch::Regex(compile_regex(r, &format!("{at}.match.headers.{name}"))?),
        _ => HeaderValueMatch::Present,
    };
    Ok(HeaderMatch { name, value })
}

impl HeaderMatch {
    /// Any one of a multi-valued header satisfying the condition is enough.
    pub(crate) fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        match &self.value {
            HeaderValueMatch::Present => values.next().is_some(),
            HeaderValueMatch::Exact(e) => values.any(|v| v.as_bytes() == e.as_bytes()),
            HeaderValueMatch::Regex(r) => values.any(|v| v.to_str().is_ok_and(|v| r.is_match(v))),
        }
    }
}

/// The request's host, lower-cased, without port: the URI authority (HTTP/2, absolute
/// form) or else the `Host` header.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> std::borrow::Cow<'a, str> {
    let raw =
        uri.host().or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok())).unwrap_or("");
    host_without_port(raw)
}

/// A `Host` value lower-cased, without port.
pub fn host_without_port(raw: &str) -> std::borrow::Cow<'_, str> {
    let without_port = if raw.starts_with('[') {
        raw.find(']').map_or(raw, |end| &raw[..=end])
    } else {
        raw.split_once(':').map_or(raw, |(host, _)| host)
    };
    if without_port.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(without_port.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(without_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(host: Option<&str>, prefix: Option<&str>, regex: Option<&str>) -> Matcher {
        let config = MatchConfig {
            host: host.map(str::to_owned),
            path: None,
            path_prefix: prefix.map(str::to_owned),
            path_regex: regex.map(str::to_owned),
            methods: vec![],
            headers: vec![],
        };
        Matcher::compile(&config, "route").unwrap()
    }

    #[test]
    fn wildcard_host_needs_a_label_before_the_suffix() {
        let m = matcher(Some("*.example.com"), None, None);
        let headers = HeaderMap::new();
        assert!(m.matches("api.example.com", "/", &Method::GET, &headers));
        assert!(!m.matches("example.com", "/", &Method::GET, &headers));
        assert!(!m.matches("api.example.org", "/", &Method::GET, &headers));
    }

    #[test]
    fn path_prefix_and_regex() {
        let headers = HeaderMap::new();
        let prefix = matcher(None, Some("/api"), None);
        assert!(prefix.matches("h", "/api/x", &Method::GET, &headers));
        assert!(!prefix.matches("h", "/ap", &Method::GET, &headers));
        let re = matcher(None, None, Some("^/v[0-9]+/"));
        assert!(re.matches("h", "/v2/x", &Method::GET, &headers));
        assert!(!re.matches("h", "/vx/", &Method::GET, &headers));
    }

    #[test]
    fn bad_regex_names_the_route() {
        let config = MatchConfig {
            host: None,
            path: None,
            path_prefix: None,
            path_regex: Some("(".into()),
            methods: vec![],
            headers: vec![],
        };
        let err = Matcher::compile(&config, "listeners[0].routes[1]").unwrap_err();
        assert!(err.to_string().contains("listeners[0].routes[1].match.path_regex"));
    }

    #[test]
    fn host_port_is_ignored() {
        let uri: http::Uri = "/x".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, "API.Example.com:8080".parse().unwrap());
        assert_eq!(request_host(&uri, &headers), "api.example.com");
        headers.insert(http::header::HOST, "[::1]:80".parse().unwrap());
        assert_eq!(request_host(&uri, &headers), "[::1]");
    }
}
