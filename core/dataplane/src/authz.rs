//! A listener's authorization policy, compiled once per snapshot and checked once per
//! request before routing: deny rules win over allow rules, then the default action.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use http::{HeaderMap, Method};

use crate::config::{AuthzAction, AuthzConfig, AuthzRuleConfig};
use crate::metrics::{AuthzMetrics, Registry};
use crate::routing::{compile_header, HeaderMatch};
use crate::Error;

/// The series name of the default action.
pub const DEFAULT_RULE: &str = "default";

/// An exact string, or a prefix (written with a trailing `*`).
#[derive(Debug)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn compile(text: &str) -> Self {
        match text.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(text.to_owned()),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(e) => e == value,
            Self::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

struct Rule {
    name: Arc<str>,
    action: AuthzAction,
    from: Vec<Pattern>,
    paths: Vec<Pattern>,
    methods: Vec<Method>,
    headers: Vec<HeaderMatch>,
    metrics: Arc<AuthzMetrics>,
}

impl Rule {
    fn compile(
        config: &AuthzRuleConfig,
        listener: &str,
        registry: &Registry,
        at: &str,
    ) -> Result<Self, Error> {
        let methods = config
            .methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| Error::Config(format!("{at}.methods: invalid method {m:?}")))
            })
            .collect::<Result<_, _>>()?;
        let headers = config.headers.iter().map(|h| compile_header(h, at)).collect::<Result<_, _>>()?;
        Ok(Self {
            name: config.name.as_str().into(),
            action: config.action,
            from: config.from.iter().map(|f| Pattern::compile(f)).collect(),
            paths: config.paths.iter().map(|p| Pattern::compile(p)).collect(),
            methods,
            headers,
            metrics: registry.authz(listener, &config.name),
        })
    }

    fn matches_caller(&self, identity: Option<&str>) -> bool {
        self.from.is_empty() || identity.is_some_and(|id| self.from.iter().any(|p| p.matches(id)))
    }

    fn matches(&self, identity: Option<&str>, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        self.matches_caller(identity)
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
            && (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|h| h.matches(headers))
    }
}

pub struct Policy {
    default: AuthzAction,
    default_metrics: Arc<AuthzMetrics>,
    rules: Vec<Rule>,
}

/// Why a request was refused: the deny rule that matched, or the default action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Rule(Arc<str>),
    Default,
}

impl Policy {
    /// `at` names the listener's `authz` block in error messages.
    pub fn compile(
        config: &AuthzConfig,
        listener: &str,
        registry: &Registry,
        at: &str,
    ) -> Result<Self, Error> {
        let rules = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(r, listener, registry, &format!("{at}.rules[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Self { default: config.default, default_metrics: registry.authz(listener, DEFAULT_RULE), rules })
    }

    /// Decides one request and counts the decision under the deciding rule.
    pub fn check(
        &self,
        identity: Option<&str>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(), Denied> {
        self.decide(|rule| rule.matches(identity, method, path, headers))
    }

    /// Decides one TCP connection by its caller alone: tcp listeners' rules have only `from`.
    pub fn check_caller(&self, identity: Option<&str>) -> Result<(), Denied> {
        self.decide(|rule| rule.matches_caller(identity))
    }

    /// Whether every rule is a `from`-only rule, as a tcp listener needs; else the offender.
    pub fn only_from(config: &AuthzConfig) -> Result<(), usize> {
        match config
            .rules
            .iter()
            .position(|r| !r.paths.is_empty() || !r.methods.is_empty() || !r.headers.is_empty())
        {
            Some(i) => Err(i),
            None => Ok(()),
        }
    }

    fn decide(&self, matches: impl Fn(&Rule) -> bool) -> Result<(), Denied> {
        let mut allowed_by = None;
        for rule in &self.rules {
            if !matches(rule) {
                continue;
            }
            match rule.action {
                AuthzAction::Deny => {
                    rule.metrics.denied.fetch_add(1, Relaxed);
                    return Err(Denied::Rule(rule.name.clone()));
                }
                AuthzAction::Allow => {
                    allowed_by.get_or_insert(rule);
                }
            }
        }
        if let Some(rule) = allowed_by {
            rule.metrics.allowed.fetch_add(1, Relaxed);
            return Ok(());
        }
        match self.default {
            AuthzAction::Allow => {
                self.default_metrics.allowed.fetch_add(1, Relaxed);
                Ok(())
            }
            AuthzAction::Deny => {
                self.default_metrics.denied.fetch_add(1, Relaxed);
                Err(Denied::Default)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderMatchConfig;

    fn rule(name: &str, action: AuthzAction, from: &[&str], paths: &[&str]) -> AuthzRuleConfig {
        AuthzRuleConfig {
            name: name.to_owned(),
            action,
            from: from.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
            methods: vec![],
            headers: vec![],
        }
    }

    #[test]
    fn deny_wins_then_allow_then_default() {
        let registry = Registry::default();
        let mut reads = rule("reads", AuthzAction::Allow, &["spiffe://example.org/ns/shop/*"], &["/orders"]);
        reads.methods = vec!["GET".into()];
        reads.headers = vec![HeaderMatchConfig {
            name: "x-env".into(),
            exact: Some("prod".into()),
            regex: None,
            present: false,
        }];
        let config = AuthzConfig {
            default: AuthzAction::Deny,
            rules: vec![rule("no-admin", AuthzAction::Deny, &[], &["/admin/*"]), reads],
        };
        let policy = Policy::compile(&config, "inbound", &registry, "listeners[0].authz").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-env", "prod".parse().unwrap());
        let id = Some("spiffe://example.org/ns/shop/sa/frontend");
        assert_eq!(policy.check(id, &Method::GET, "/orders", &headers), Ok(()));
        assert_eq!(policy.check(id, &Method::POST, "/orders", &headers), Err(Denied::Default));
        assert_eq!(policy.check(None, &Method::GET, "/orders", &headers), Err(Denied::Default));
        assert_eq!(policy.check(id, &Method::GET, "/orders", &HeaderMap::new()), Err(Denied::Default));
        assert_eq!(
            policy.check(id, &Method::GET, "/admin/x", &headers),
            Err(Denied::Rule("no-admin".into()))
        );
        assert_eq!(registry.authz("inbound", "reads").allowed.load(Relaxed), 1);
        assert_eq!(registry.authz("inbound", DEFAULT_RULE).denied.load(Relaxed), 3);
        assert_eq!(Policy::only_from(&config), Err(0));
    }

    #[test]
    fn tcp_connections_are_decided_by_the_caller() {
        let registry = Registry::default();
        let config = AuthzConfig {
            default: AuthzAction::Deny,
            rules: vec![rule("shop", AuthzAction::Allow, &["spiffe://example.org/ns/shop/*"], &[])],
        };
        assert_eq!(Policy::only_from(&config), Ok(()));
        let policy = Policy::compile(&config, "db", &registry, "listeners[0].authz").unwrap();
        assert_eq!(policy.check_caller(Some("spiffe://example.org/ns/shop/sa/a")), Ok(()));
        assert_eq!(policy.check_caller(Some("spiffe://example.org/ns/ops/sa/a")), Err(Denied::Default));
        assert_eq!(policy.check_caller(None), Err(Denied::Default));
    }
}
