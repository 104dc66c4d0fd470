"""The mesh's resources: what `meshpy apply` sends and the control plane's API stores.

Files are kubectl-style YAML, one resource per document::

    kind: Service
    metadata: {name: payments, namespace: shop}
    spec: {lb: p2c_ewma, timeout: 2s}

The same models validate a file (`meshpy validate`, `meshpy apply`) and an API body, so a
file one accepts the other accepts unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    model_validator,
)

from ..ca import parse_spiffe_id, validate_namespace, validate_service
from ..config import (
    AuthzAction,
    AuthzPath,
    Duration,
    FilterRef,
    FilterRefValue,
    HeaderMatchValue,
    LbPolicy,
    Methods,
    OnError,
    RouteMatch,
    UpstreamProtocol,
    _Loader,
    validation_errors,
)
from ..errors import ConfigError

__all__ = [
    "KINDS",
    "AuthorizationPolicy",
    "FilterAttachment",
    "Metadata",
    "Resource",
    "Route",
    "Service",
    "dump_resource",
    "is_resource_file",
    "load_resources",
    "parse_resource",
    "parse_resources",
]


def _service_name(value: str) -> str:
    try:
        return validate_service(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _namespace_name(value: str) -> str:
    try:
        return validate_namespace(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


ServiceName = Annotated[str, AfterValidator(_service_name)]
NamespaceName = Annotated[str, AfterValidator(_namespace_name)]


def _service_ref(value: str) -> str:
    """``name`` (this namespace) or ``namespace/name``."""
    namespace, _, name = value.rpartition("/")
    if namespace:
        _namespace_name(namespace)
    _service_name(name)
    return value


ServiceRef = Annotated[str, AfterValidator(_service_ref)]


def _caller(value: str) -> str:
    """A service (``name`` or ``namespace/name``) or a SPIFFE ID, optionally ending in /*."""
    if value.startswith("spiffe://"):
        try:
            parse_spiffe_id(value.removesuffix("/*"))
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return value
    if value == "*":
        return value
    try:
        return _service_ref(value)
    except ValueError:
        raise ValueError(
            f"expected a service (checkout), namespace/service (shop/checkout), a SPIFFE ID"
            f" or '*', got {value!r}"
        ) from None


Caller = Annotated[str, AfterValidator(_caller)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Metadata(_Model):
    name: ServiceName = Field(description="Unique per kind within the namespace.")
    namespace: NamespaceName = Field(default="default", description="The resource's namespace.")
    version: int | None = Field(
        default=None,
        description="Set by the control plane: the store revision of the last change. Ignored"
        " on input, so a listed resource can be applied back unchanged.",
    )


class ServiceSpec(_Model):
    protocol: UpstreamProtocol = Field(
        default="auto",
        description="How sidecars speak to the service's sidecars: auto keeps the caller's"
        " HTTP version; http2 for gRPC apps called over HTTP/1.",
    )
    lb: LbPolicy = Field(default="p2c_ewma", description="How callers balance its endpoints.")
    connect_timeout: Duration = Field(default=1.0, description="Time allowed to connect.")
    timeout: Duration | None = Field(
        default=None, description="Default time allowed for a response; null means no limit."
    )


class RouteSpec(_Model):
    host: ServiceRef = Field(
        description="The service name callers use (their Host header) that this route applies to."
    )
    match: RouteMatch = Field(
        default_factory=RouteMatch,
        description="Path, method and header conditions (host comes from `host`).",
    )
    service: ServiceRef = Field(description="The service matching requests go to.")
    timeout: Duration | None = Field(
        default=None, description="Time allowed for a response; defaults to the service's."
    )
    priority: int = Field(
        default=0, description="Routes of one host are tried highest priority first, then by name."
    )

    @model_validator(mode="after")
    def _no_host_in_match(self) -> RouteSpec:
        if self.match.host is not None:
            raise ValueError("match.host is not allowed here: the route's host is `host`")
        return self


class PolicyRule(_Model):
    name: ServiceName = Field(description="Unique within the policy; names the metric's rule.")
    action: AuthzAction = Field(description="allow or deny; deny rules win.")
    from_: list[Caller] | None = Field(
        default=None,
        alias="from",
        min_length=1,
        description="Calling services (checkout, shop/checkout) or SPIFFE IDs; omit for any.",
    )
    paths: list[AuthzPath] | None = Field(
        default=None, min_length=1, description="Exact paths or prefixes ending in *."
    )
    methods: Methods | None = Field(default=None, description="A method or a list.")
    headers: dict[str, HeaderMatchValue] = Field(default_factory=dict)


class AuthorizationPolicySpec(_Model):
    service: ServiceName = Field(description="The service (in this namespace) it protects.")
    default: AuthzAction = Field(
        default="deny", description="What happens to a request no rule matches."
    )
    rules: list[PolicyRule] = Field(default_factory=list)


class FilterAttachmentSpec(_Model):
    service: ServiceName = Field(description="The service whose inbound requests it filters.")
    match: RouteMatch = Field(
        default_factory=RouteMatch, description="Which requests; omitted means all."
    )
    filters: list[FilterRefValue] = Field(
        min_length=1, description="module:Class -> arguments, importable on the sidecar's host."
    )
    filter_timeout: Duration = Field(default=0.1, description="Time per phase.")
    on_error: OnError = Field(default="fail_closed")

    @field_serializer("filters")
    def _filters_as_written(self, filters: list[FilterRef]) -> list[dict[str, Any]]:
        return [{ref.path: ref.args} for ref in filters]


class Service(_Model):
    kind: Literal["Service"] = "Service"
    metadata: Metadata
    spec: ServiceSpec = Field(default_factory=ServiceSpec)


class Route(_Model):
    kind: Literal["Route"] = "Route"
    metadata: Metadata
    spec: RouteSpec


class AuthorizationPolicy(_Model):
    kind: Literal["AuthorizationPolicy"] = "AuthorizationPolicy"
    metadata: Metadata
    spec: AuthorizationPolicySpec


class FilterAttachment(_Model):
    kind: Literal["FilterAttachment"] = "FilterAttachment"
    metadata: Metadata
    spec: FilterAttachmentSpec


Resource = Annotated[
    Service | Route | AuthorizationPolicy | FilterAttachment, Field(discriminator="kind")
]

# The API's and CLI's plural names, and what each holds.
KINDS: dict[str, type[Service | Route | AuthorizationPolicy | FilterAttachment]] = {
    "services": Service,
    "routes": Route,
    "policies": AuthorizationPolicy,
    "filters": FilterAttachment,
}
PLURALS = {model.__name__: plural for plural, model in KINDS.items()}


def parse_resource(data: Any) -> Service | Route | AuthorizationPolicy | FilterAttachment:
    """Validate one resource; raises ConfigError with one ``field: problem`` line per error."""
    if not isinstance(data, Mapping) or "kind" not in data:
        kinds = ", ".join(model.__name__ for model in KINDS.values())
        raise ConfigError([f"kind: required, one of {kinds}"])
    if data["kind"] not in PLURALS:
        kinds = ", ".join(PLURALS)
        raise ConfigError([f"kind: expected one of {kinds}, got {data['kind']!r}"])
    model = KINDS[PLURALS[data["kind"]]]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc, model)) from None


def parse_resources(
    text: str | bytes, source: str | None = None
) -> list[Service | Route | AuthorizationPolicy | FilterAttachment]:
    """Every resource of a multi-document YAML text; errors name the document and field."""
    try:
        documents = [doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}{exc.problem or exc.context}"], source) from None
    if not documents:
        raise ConfigError(["no resources in the file"], source)
    resources, errors = [], []
    for index, document in enumerate(documents):
        try:
            resources.append(parse_resource(document))
        except ConfigError as exc:
            errors += [f"document {index + 1}: {line}" for line in exc.errors]
    seen: set[tuple[str, str, str]] = set()
    for index, resource in enumerate(resources):
        key = (resource.kind, resource.metadata.namespace, resource.metadata.name)
        if key in seen:
            errors.append(
                f"document {index + 1}: {resource.kind} {key[1]}/{key[2]} is defined twice"
            )
        seen.add(key)
    if errors:
        raise ConfigError(errors, source)
    return resources


def load_resources(
    path: str | Path,
) -> list[Service | Route | AuthorizationPolicy | FilterAttachment]:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
    return parse_resources(text, str(path))


def is_resource_file(text: str | bytes) -> bool:
    """True when YAML text holds mesh resources (documents with a `kind`), not a sidecar config."""
    try:
        first = next((doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None), None)
    except yaml.YAMLError:
        return False
    return isinstance(first, Mapping) and "kind" in first


def dump_resource(
    resource: Service | Route | AuthorizationPolicy | FilterAttachment,
) -> dict[str, Any]:
    """The resource as a file would write it: parse_resource(dump_resource(r)) == r."""
    return resource.model_dump(mode="json", by_alias=True, exclude_none=True)
