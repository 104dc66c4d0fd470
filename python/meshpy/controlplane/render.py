"""From the mesh's resources to what one sidecar needs: its slice of the config.

A sidecar of service S in namespace N gets:

- inbound: the authorization rules of the policies protecting S, and the filters attached
  to S, in front of its local app;
- outbound: a route per (route resource, host alias) and a default route per service, each
  to a cluster of that service's registered endpoints, reached over mTLS and checked
  against the service's SPIFFE ID.

Nothing about other services' policies or filters is sent. The agent (meshpy.agent) merges
the slice with what only the sidecar knows (listen addresses, its app, its key files).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..ca import spiffe_id
from .models import AuthorizationPolicy, FilterAttachment, Route, Service

__all__ = ["MeshState", "config_hash", "render_sidecar"]

APP_CLUSTER = "app"


@dataclass
class MeshState:
    """Everything rendering reads, as of one store revision."""

    trust_domain: str
    revision: int = 0
    services: list[Service] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    policies: list[AuthorizationPolicy] = field(default_factory=list)
    filters: list[FilterAttachment] = field(default_factory=list)
    # (namespace, service) -> endpoint addresses
    endpoints: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def service(self, namespace: str, name: str) -> Service | None:
        for service in self.services:
            if (service.metadata.namespace, service.metadata.name) == (namespace, name):
                return service
        return None


def _resolve(ref: str, namespace: str) -> tuple[str, str]:
    """``name`` in `namespace`, or ``namespace/name``, as (namespace, name)."""
    ns, _, name = ref.rpartition("/")
    return (ns or namespace, name)


def cluster_name(namespace: str, service: str) -> str:
    return f"{service}.{namespace}"


def _hosts(namespace: str, service: str, caller_namespace: str) -> list[str]:
    """The names a caller may use for a service: the bare name only within its namespace."""
    qualified = f"{service}.{namespace}"
    return [service, qualified] if namespace == caller_namespace else [qualified]


def _caller_pattern(caller: str, namespace: str, trust_domain: str) -> str:
    if caller.startswith("spiffe://"):
        return caller
    if caller == "*":
        return f"spiffe://{trust_domain}/*"
    ns, name = _resolve(caller, namespace)
    return spiffe_id(trust_domain, ns, name)


def _match(match: Any, **extra: Any) -> dict[str, Any]:
    data = match.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    return {**data, **extra}


def _inbound(state: MeshState, namespace: str, service: str) -> dict[str, Any]:
    policies = sorted(
        (
            p
            for p in state.policies
            if (p.metadata.namespace, p.spec.service) == (namespace, service)
        ),
        key=lambda p: p.metadata.name,
    )
    authz = None
    if policies:
        rules = []
        for policy in policies:
            for rule in policy.spec.rules:
                data: dict[str, Any] = {
                    "name": f"{policy.metadata.name}.{rule.name}",
                    "action": rule.action,
                }
                if rule.from_ is not None:
                    data["from"] = [
                        _caller_pattern(c, namespace, state.trust_domain) for c in rule.from_
                    ]
                if rule.paths is not None:
                    data["paths"] = rule.paths
                if rule.methods is not None:
                    data["methods"] = rule.methods
                if rule.headers:
                    data["headers"] = {
                        name: value.model_dump(mode="json", exclude_none=True)
                        for name, value in rule.headers.items()
                    }
                rules.append(data)
        # Any policy asking for deny-by-default makes it so: the stricter reading wins.
        default = "deny" if any(p.spec.default == "deny" for p in policies) else "allow"
        authz = {"default": default, "rules": rules}
    routes = []
    for attachment in sorted(state.filters, key=lambda f: f.metadata.name):
        spec = attachment.spec
        if (attachment.metadata.namespace, spec.service) != (namespace, service):
            continue
        routes.append(
            {
                "name": f"filter/{attachment.metadata.name}",
                "match": _match(spec.match),
                "cluster": APP_CLUSTER,
                "filters": [{ref.path: ref.args} for ref in spec.filters],
                "filter_timeout": spec.filter_timeout,
                "on_error": spec.on_error,
            }
        )
    routes.append({"name": "app", "cluster": APP_CLUSTER})
    return {"authz": authz, "routes": routes}


def _outbound(
    state: MeshState, namespace: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    routes: list[dict[str, Any]] = []
    used: set[tuple[str, str]] = set()

    def add_route(name: str, host: tuple[str, str], target: tuple[str, str], spec: Any) -> None:
        target_service = state.service(*target)
        if target_service is None:  # refused by the API; skipped rather than sent broken
            return
        timeout = spec.timeout if spec is not None else None
        if timeout is None:
            timeout = target_service.spec.timeout
        for alias in _hosts(*host, namespace):
            route: dict[str, Any] = {
                "name": f"{name}/{alias}",
                "match": _match(spec.match, host=alias) if spec is not None else {"host": alias},
                "cluster": cluster_name(*target),
            }
            if timeout is not None:
                route["timeout"] = timeout
            routes.append(route)
        used.add(target)

    ordered = sorted(
        state.routes,
        key=lambda r: (
            _resolve(r.spec.host, r.metadata.namespace),
            -r.spec.priority,
            r.metadata.namespace,
            r.metadata.name,
        ),
    )
    for route in ordered:
        ns = route.metadata.namespace
        add_route(
            f"route/{ns}/{route.metadata.name}",
            _resolve(route.spec.host, ns),
            _resolve(route.spec.service, ns),
            route.spec,
        )
    for service in sorted(state.services, key=lambda s: (s.metadata.namespace, s.metadata.name)):
        key = (service.metadata.namespace, service.metadata.name)
        add_route(f"service/{key[0]}/{key[1]}", key, key, None)
    clusters = []
    for ns, name in sorted(used):
        spec = state.service(ns, name).spec  # type: ignore[union-attr]
        clusters.append(
            {
                "name": cluster_name(ns, name),
                "endpoints": sorted(state.endpoints.get((ns, name), [])),
                "lb": spec.lb,
                "protocol": spec.protocol,
                "connect_timeout": spec.connect_timeout,
                "tls": "mesh",
                "server_identity": spiffe_id(state.trust_domain, ns, name),
            }
        )
    return routes, clusters


def render_sidecar(state: MeshState, namespace: str, service: str) -> dict[str, Any]:
    """The config slice for a sidecar of `service` in `namespace` (deterministic: same input,
    same output, so its hash tells whether anything changed)."""
    routes, clusters = _outbound(state, namespace)
    return {
        "inbound": _inbound(state, namespace, service),
        "outbound": {"routes": routes},
        "clusters": clusters,
    }


def config_hash(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def endpoints_by_service(entries: Iterable[Any]) -> dict[tuple[str, str], list[str]]:
    """Group ``endpoints/<ns>/<service>/<id>`` store entries by service."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for entry in entries:
        _, ns, name, _ = entry.key.split("/", 3)
        grouped.setdefault((ns, name), []).append(entry.value["address"])
    return grouped
