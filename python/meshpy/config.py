"""The sidecar config file: typed models, loading, validation and the JSON handed to the core.

Users write YAML in a friendly shape (durations like ``2s``, sizes like ``64KiB``, a header
value or a ``{regex: ...}`` mapping). Validation reports every problem as
``<field path>: <message>``; `SidecarConfig.to_core_json` then emits one normalized shape
with every default filled in, so the Rust core never has to guess.
"""

import difflib
import ipaddress
import json
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .errors import ConfigError

if TYPE_CHECKING:
    from .filters import FilterSet

__all__ = [
    "Admin",
    "Cluster",
    "ConfigError",
    "FilterRef",
    "HeaderMatch",
    "Identity",
    "Limits",
    "Listener",
    "Route",
    "RouteMatch",
    "SidecarConfig",
    "Tls",
    "is_mesh_bootstrap",
    "json_schema",
    "load_config",
    "loads_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]


def _show(value: object) -> str:
    """How a user's value is quoted back in messages, in YAML terms."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


# --- scalar types: parsed from the friendly form, stored normalized -------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Far beyond any sensible timeout, and far below what the core's timers can represent.
_MAX_DURATION = 365 * 24 * 3600.0


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as ``250ms``, ``1.5s``, ``1m30s``."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"expected a non-negative duration, got {_show(value)}")
        if text and _DURATION_PART.sub("", text) == "":
            seconds = sum(
                float(number) * _DURATION_UNITS[unit]
                for number, unit in _DURATION_PART.findall(text)
            )
        else:
            try:
                seconds = float(text)
            except ValueError:
                seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(
            f"expected a duration such as 250ms, 2s, 1m or a number of seconds, got {_show(value)}"
        )
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {_show(value)}")
    if seconds > _MAX_DURATION:
        raise ValueError(f"expected a duration of at most 8760h (one year), got {_show(value)}")
    # Nanosecond resolution, so "100ms" is exactly 0.1 and not 0.1 plus float noise.
    return round(seconds, 9)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "kib": 2**10,
    "mb": 10**6,
    "mib": 2**20,
    "gb": 10**9,
    "gib": 2**30,
}
_MAX_SIZE = 2**63 - 1  # the core stores sizes as 64-bit integers


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as ``512B``, ``64KiB``, ``1.5MB``.

    KB, MB, GB are powers of 1000; KiB, MiB, GiB powers of 1024.
    """
    size: Decimal | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = Decimal(value)
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match and match[2].lower() in _SIZE_UNITS:
            size = Decimal(match[1]) * _SIZE_UNITS[match[2].lower()]
    if size is None:
        raise ValueError(
            "expected a size such as 65536, 64KiB or 1MB (units B, KB, KiB, MB, MiB, GB, GiB),"
            f" got {_show(value)}"
        )
    if size != size.to_integral_value():
        raise ValueError(f"expected a whole number of bytes, got {_show(value)}")
    if size <= 0:
        raise ValueError(f"expected a positive size, got {_show(value)}")
    if size > _MAX_SIZE:
        raise ValueError(f"expected a size below 8 EiB, got {_show(value)}")
    return int(size)


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"expected a positive integer, got {_show(value)}")


def _one_of(choices: Any) -> BeforeValidator:
    """Check membership in a Literal's values with a message that lists them all."""
    allowed: tuple[str, ...] = get_args(choices)

    def check(value: object) -> object:
        if isinstance(value, str) and value in allowed:
            return value
        raise ValueError(f"expected one of {', '.join(allowed)}, got {_show(value)}")

    return BeforeValidator(check)


_SOCKET = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})", re.ASCII)
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?",
    re.ASCII | re.IGNORECASE,
)
_DOTTED_DIGITS = re.compile(r"[0-9.]+")


def _ip(text: str, *, bracketed: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.IPv6Address(text) if bracketed else ipaddress.IPv4Address(text)
    except ValueError:
        return None
    # Zone ids ("%eth0") are not understood by the core's socket address parser.
    return None if bracketed and "%" in text else ip


def _socket_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _listen_address(value: object) -> str:
    match = _SOCKET.fullmatch(value) if isinstance(value, str) else None
    if match:
        bracketed = match["v6"] is not None
        ip = _ip(match["v6"] if bracketed else match["host"], bracketed=bracketed)
        port = int(match["port"])
        if ip is not None:
            if port > 65535:
                raise ValueError(f"expected a port between 0 and 65535, got {_show(value)}")
            return _socket_text(ip, port)
    raise ValueError(f"expected IP:port such as 127.0.0.1:8080, got {_show(value)}")


def _endpoint(value: object) -> str:
    match = _SOCKET.fullmatch(value) if isinstance(value, str) else None
    if match:
        port = int(match["port"])
        if match["v6"] is not None:
            ip = _ip(match["v6"], bracketed=True)
            host = None if ip is None else f"[{ip}]"
        elif _DOTTED_DIGITS.fullmatch(match["host"]):
            ip = _ip(match["host"], bracketed=False)
            host = None if ip is None else str(ip)
        else:
            host = match["host"] if _HOSTNAME.fullmatch(match["host"]) else None
        if host is not None:
            if not 0 < port <= 65535:
                raise ValueError(f"expected a port between 1 and 65535, got {_show(value)}")
            return f"{host}:{port}"
    raise ValueError(
        f"expected host:port such as 127.0.0.1:8081 or payments.internal:8080, got {_show(value)}"
    )


def _host_match(value: object) -> str:
    if isinstance(value, str):
        host = value.lower()
        wildcard = host.startswith("*.")
        name = host.removeprefix("*.")
        if _HOSTNAME.fullmatch(name) and not _DOTTED_DIGITS.fullmatch(name):
            return host
        if not wildcard and _ip(host, bracketed=False) is not None:
            return host
        if host.startswith("[") and host.endswith("]"):
            ip = _ip(host[1:-1], bracketed=True)
            if ip is not None:
                return f"[{ip}]"
        bare, _, port = host.rpartition(":")
        if port.isascii() and port.isdigit() and _HOSTNAME.fullmatch(bare.removeprefix("*.")):
            raise ValueError(f"the port is ignored when matching hosts; write {bare!r}")
    raise ValueError(
        "expected a host name such as payments or a wildcard such as *.example.com,"
        f" got {_show(value)}"
    )


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {_show(value)}")
    return value


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regex {value!r}: {exc}") from None
    return value


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: methods, header names


def _methods(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"expected a method such as GET or a list of methods, got {_show(value)}")
    if not items:
        raise ValueError("expected at least one method (omit method to match any method)")
    methods: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _TOKEN.fullmatch(item):
            raise ValueError(f"expected an HTTP method such as GET, got {_show(item)}")
        if item.upper() not in methods:
            methods.append(item.upper())
    return methods


def _header_match_input(value: object) -> object:
    """A bare string is shorthand for ``{exact: ...}``."""
    if isinstance(value, str):
        return {"exact": value}
    if isinstance(value, Mapping):
        return value
    hint = ' (quote it in YAML, e.g. "1")' if isinstance(value, int | float) else ""
    raise ValueError(
        f"expected a value string or a mapping with regex or present, got {_show(value)}{hint}"
    )


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]*")


def _name_check(pattern: re.Pattern[str], allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(
                f"expected a name of {allowed} starting with a letter or digit, got {_show(value)}"
            )
        return value

    return check


_name = _name_check(_NAME, "letters, digits, '.', '_' and '-'")
_route_name = _name_check(_ROUTE_NAME, "letters, digits, '.', '_', '-' and '/'")


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?|(\d+(\.\d+)?(ms|s|m|h))+)\s*$"},
    ],
    "description": "Seconds, or a string such as 250ms, 2s, 1m, 1h, 1.5s.",
}
_SIZE_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KkMmGg][Ii]?[Bb]|[Bb])?\s*$"},
    ],
    "description": "Bytes, or a string such as 512B, 64KiB, 1MB (KB=1000, KiB=1024).",
}


Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]
PositiveInt = Annotated[
    int, BeforeValidator(_positive_int), WithJsonSchema({"type": "integer", "minimum": 1})
]
Name = Annotated[
    str, AfterValidator(_name), WithJsonSchema({"type": "string", "pattern": f"^{_NAME.pattern}$"})
]
RouteName = Annotated[
    str,
    AfterValidator(_route_name),
    WithJsonSchema({"type": "string", "pattern": f"^{_ROUTE_NAME.pattern}$"}),
]
ListenAddress = Annotated[
    str,
    BeforeValidator(_listen_address),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:15001", "[::1]:15001"]}),
]
Endpoint = Annotated[
    str,
    BeforeValidator(_endpoint),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:8081", "payments.internal:8080"]}),
]
HostMatchValue = Annotated[
    str,
    BeforeValidator(_host_match),
    WithJsonSchema({"type": "string", "examples": ["payments", "*.example.com"]}),
]
PathValue = Annotated[
    str, AfterValidator(_path), WithJsonSchema({"type": "string", "pattern": "^/"})
]
Regex = Annotated[str, AfterValidator(_regex)]
Methods = Annotated[
    list[str],
    BeforeValidator(_methods),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ],
            "examples": ["GET", ["GET", "HEAD"]],
        }
    ),
]


def _filter_ref_input(value: object) -> object:
    """`module:Class` alone, or a one-key mapping `{module:Class: {arguments}}`."""
    if isinstance(value, str):
        return {"path": value, "args": {}}
    if isinstance(value, Mapping) and len(value) == 1:
        ((path, args),) = value.items()
        return {"path": path, "args": {} if args is None else args}
    raise ValueError(
        "expected an import path such as plugins.tenant:RequireTenant, or a one-key mapping"
        f" from it to its arguments, got {_show(value)}"
    )


def _import_path(value: str) -> str:
    from .filters import import_path_error  # the filter API needs the compiled core

    error = import_path_error(value)
    if error:
        raise ValueError(error)
    return value


_ListenerProtocol = Literal["http", "tcp"]
_LbPolicy = Literal["p2c_ewma", "round_robin", "least_request"]
_OnError = Literal["fail_closed", "fail_open"]
_UpstreamProtocol = Literal["auto", "http1", "http2"]
_MtlsMode = Literal["strict", "permissive"]
_UpstreamTls = Literal["mesh"]
_MinTls = Literal["1.2", "1.3"]
_AuthzAction = Literal["allow", "deny"]
ListenerProtocol = Annotated[_ListenerProtocol, _one_of(_ListenerProtocol)]
LbPolicy = Annotated[_LbPolicy, _one_of(_LbPolicy)]
UpstreamProtocol = Annotated[_UpstreamProtocol, _one_of(_UpstreamProtocol)]
OnError = Annotated[_OnError, _one_of(_OnError)]
MtlsMode = Annotated[_MtlsMode, _one_of(_MtlsMode)]
AuthzAction = Annotated[_AuthzAction, _one_of(_AuthzAction)]
UpstreamTls = Annotated[_UpstreamTls, _one_of(_UpstreamTls)]
MinTls = Annotated[_MinTls, _one_of(_MinTls)]

_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(/[^/\s]+)+", re.ASCII)


def _spiffe_id(value: str) -> str:
    if not _SPIFFE_ID.fullmatch(value):
        raise ValueError(
            "expected a SPIFFE ID such as spiffe://example.org/ns/shop/sa/payments,"
            f" got {_show(value)}"
        )
    return value


SpiffeId = Annotated[
    str,
    AfterValidator(_spiffe_id),
    WithJsonSchema({"type": "string", "pattern": f"^{_SPIFFE_ID.pattern}$"}),
]


def _identity_pattern(value: str) -> str:
    """A SPIFFE ID, or a prefix of one ending in ``/*`` (``spiffe://example.org/ns/ops/*``)."""
    prefix = value[:-2] if value.endswith("/*") else value
    trust_domain_only = value.endswith("/*") and re.fullmatch(r"spiffe://[a-z0-9._-]+", prefix)
    if "*" in prefix or not (trust_domain_only or _SPIFFE_ID.fullmatch(prefix)):
        raise ValueError(
            "expected a SPIFFE ID such as spiffe://example.org/ns/shop/sa/frontend or a prefix"
            f" ending in /* such as spiffe://example.org/ns/shop/*, got {_show(value)}"
        )
    return value


def _authz_path(value: str) -> str:
    """An exact path, or a prefix written with one trailing ``*``."""
    if not value.startswith("/") or "*" in value[:-1]:
        raise ValueError(
            "expected an exact path such as /orders or a prefix ending in * such as /catalog/*,"
            f" got {_show(value)}"
        )
    return value


def _not_empty_list(value: list[Any]) -> list[Any]:
    if not value:
        raise ValueError("expected at least one item (omit the condition to match anything)")
    return value


IdentityPattern = Annotated[
    str,
    AfterValidator(_identity_pattern),
    WithJsonSchema({"type": "string", "examples": ["spiffe://example.org/ns/shop/*"]}),
]
AuthzPath = Annotated[
    str,
    AfterValidator(_authz_path),
    WithJsonSchema({"type": "string", "examples": ["/orders", "/catalog/*"]}),
]


def _config_relative(value: str, info: ValidationInfo) -> str:
    """An absolute path: relative ones are taken from the config file's directory."""
    if not value:
        raise ValueError("expected a file path")
    # The core may run with another working directory, so it only ever sees absolute paths.
    base = (info.context or {}).get("base_dir") or Path.cwd()
    return os.path.normpath(Path(base) / Path(value).expanduser())


# --- models: the shape users write ------------------------------------------------------------


class _Model(BaseModel):
    # Strict: YAML already yields real types, so "100" where a number belongs is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True)


class Admin(_Model):
    """The admin listener: /ready, /live, /config and /metrics."""

    listen: ListenAddress = Field(description="IP:port to serve the admin endpoints on.")


class Tls(_Model):
    """Serve HTTPS on this listener (ALPN h2 and http/1.1)."""

    cert: str = Field(
        description="PEM certificate chain; a relative path is relative to the config file."
    )
    key: str = Field(description="PEM private key; a relative path is relative to the config file.")
    session_resumption: bool = Field(
        default=True,
        description="Let returning clients resume their session (TLS 1.3 tickets, TLS 1.2 "
        "session IDs) from an in-memory cache, skipping the certificate exchange; false makes "
        "every connection a full handshake.",
    )

    _absolute = field_validator("cert", "key")(_config_relative)


def _ca_dir(value: str, info: ValidationInfo) -> str:
    """An absolute path to a meshpy CA directory that loads (its files, its expiry not checked)."""
    from .ca import CAError, CertificateAuthority

    path = _config_relative(value, info)
    try:
        CertificateAuthority.load(path)
    except CAError as exc:
        raise ValueError(str(exc)) from None
    return path


def _ca_name(kind: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        from . import ca

        return getattr(ca, f"validate_{kind}")(value)  # InvalidNameError is a ValueError

    return check


def _ttl(value: object) -> float:
    from .ca import parse_ttl

    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a ttl such as 30s, 90m, 24h or 3650d, got {_show(value)}")
    return parse_ttl(value)


def _fraction(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1:
        return float(value)
    raise ValueError(f"expected a fraction of the lifetime between 0 and 1, got {_show(value)}")


_IDENTITY_FILES = ("cert", "key", "bundle")
_IDENTITY_ISSUE = ("ca", "service", "namespace")
_IDENTITY_EITHER = "give either cert, key and bundle, or ca, service and namespace"


class Identity(_Model):
    """This sidecar's mesh identity: a certificate whose one URI SAN is its SPIFFE ID.

    Used by `mtls` listeners and `tls: mesh` clusters. Either files (cert, key, bundle),
    re-read when they change, or, for development, a CA directory the sidecar issues its own
    certificate from (ca, service, namespace), renewed at `renew_at` of its lifetime.
    """

    cert: str | None = Field(
        default=None,
        description="PEM certificate chain, leaf first; its URI SAN"
        " spiffe://<trust-domain>/ns/<namespace>/sa/<service> is the sidecar's identity."
        " A relative path is relative to the config file.",
    )
    key: str | None = Field(default=None, description="PEM private key of the certificate.")
    bundle: str | None = Field(
        default=None,
        description="PEM CA certificates (the trust bundle) peers' certificates must chain to.",
    )
    ca: str | None = Field(
        default=None,
        description="Development only: a meshpy CA directory (root or intermediate) the sidecar"
        " issues its own certificate from, instead of cert, key and bundle.",
    )
    service: Annotated[str, AfterValidator(_ca_name("service"))] | None = Field(
        default=None, description="With ca: the service named in the issued SPIFFE ID."
    )
    namespace: Annotated[str, AfterValidator(_ca_name("namespace"))] | None = Field(
        default=None, description="With ca: the namespace named in the issued SPIFFE ID."
    )
    ttl: Annotated[
        float,
        BeforeValidator(_ttl),
        WithJsonSchema({"type": ["string", "number"], "examples": ["1h", "24h"]}),
    ] = Field(default=24 * 3600.0, description="With ca: the lifetime of each issued certificate.")
    renew_at: Annotated[
        float,
        BeforeValidator(_fraction),
        WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
    ] = Field(
        default=2 / 3,
        description="With ca: the fraction of a certificate's lifetime after which it is"
        " replaced by a new one.",
    )
    min_tls: MinTls = Field(
        default="1.3", description='Oldest TLS version accepted and offered: "1.3" or "1.2".'
    )

    _absolute = field_validator("cert", "key", "bundle")(_config_relative)
    _ca_loads = field_validator("ca")(_ca_dir)

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        files = [name for name in _IDENTITY_FILES if name in data]
        issue = [name for name in _IDENTITY_ISSUE if name in data]
        if files and issue:
            raise ValueError(f"{_IDENTITY_EITHER}, not both (found {', '.join(files + issue)})")
        wanted = _IDENTITY_ISSUE if issue else _IDENTITY_FILES
        missing = [name for name in wanted if name not in data]
        if missing:
            raise ValueError(f"{_IDENTITY_EITHER} (missing {', '.join(missing)})")
        if not issue:
            extra = [name for name in ("ttl", "renew_at") if name in data]
            if extra:
                raise ValueError(
                    f"{' and '.join(extra)} {'apply' if len(extra) > 1 else 'applies'} only to"
                    " a self-issued identity (with ca)"
                )
        return data

    @property
    def self_issued(self) -> bool:
        """Whether the sidecar issues this identity itself from the `ca` directory."""
        return self.ca is not None


class Limits(_Model):
    """Protections for an http listener against oversized or slow requests."""

    max_header_bytes: Size = Field(
        default=64 * 1024, description="Largest request head (request line and headers) accepted."
    )
    max_headers: PositiveInt = Field(default=100, description="Most request headers accepted.")
    max_body_bytes: Size | None = Field(
        default=None, description="Largest request body accepted; null means unlimited."
    )
    header_read_timeout: Duration = Field(
        default=10.0, description="Time allowed for a client to send the request head."
    )
    idle_timeout: Duration = Field(
        default=60.0, description="Keep-alive connections idle this long are closed."
    )


class HeaderMatch(_Model):
    """How one request header must match: exactly one of exact, regex or present."""

    exact: str | None = Field(default=None, description="The header's value, compared exactly.")
    regex: Regex | None = Field(
        default=None, description="A regex the header's value must contain a match of."
    )
    present: bool | None = Field(
        default=None, description="true: the header must be present, with any value."
    )

    @field_validator("exact")
    @classmethod
    def _valid_value(cls, value: str) -> str:
        if any(char in value for char in "\r\n\0"):
            raise ValueError("header values cannot contain CR, LF or NUL")
        return value

    @field_validator("present")
    @classmethod
    def _only_true(cls, value: bool) -> bool:
        if not value:
            raise ValueError("only present: true is supported")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "HeaderMatch":
        given = [self.exact is not None, self.regex is not None, self.present is not None]
        if sum(given) != 1:
            raise ValueError("expected exactly one of exact, regex, present")
        return self


HeaderMatchValue = Annotated[
    HeaderMatch,
    BeforeValidator(_header_match_input),
    GetPydanticSchema(
        get_pydantic_json_schema=lambda schema, handler: {
            "anyOf": [{"type": "string", "description": "The exact value."}, handler(schema)]
        }
    ),
]


def _header_names(headers: dict[str, HeaderMatch]) -> dict[str, HeaderMatch]:
    lowered: dict[str, HeaderMatch] = {}
    for name, match in headers.items():
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if name.lower() in lowered:
            raise ValueError(f"header {name!r} is listed twice (names are case-insensitive)")
        lowered[name.lower()] = match
    return lowered


class RouteMatch(_Model):
    """What a request must look like to take a route. Every condition given must hold."""

    host: HostMatchValue | None = Field(
        default=None,
        description="Host (case-insensitive, port ignored), or a wildcard such as *.example.com.",
    )
    path: PathValue | None = Field(default=None, description="The exact path.")
    path_prefix: PathValue | None = Field(default=None, description="A prefix of the path.")
    path_regex: Regex | None = Field(
        default=None, description="A regex the path must contain a match of; anchor with ^ and $."
    )
    method: Methods | None = Field(default=None, description="A method or a list of methods.")
    headers: dict[str, HeaderMatchValue] = Field(
        default_factory=dict,
        description="Header name -> exact value, {regex: ...} or {present: true}.",
    )

    _header_names = field_validator("headers")(_header_names)

    @model_validator(mode="after")
    def _one_path_matcher(self) -> "RouteMatch":
        if sum(p is not None for p in (self.path, self.path_prefix, self.path_regex)) > 1:
            raise ValueError("at most one of path, path_prefix, path_regex may be given")
        return self


class AuthzRule(_Model):
    """One authorization rule: every condition given must hold; within a list, any item."""

    model_config = ConfigDict(populate_by_name=True)

    name: Name = Field(description="Unique within the listener; the `rule` label of authz_*_total.")
    action: AuthzAction = Field(description="allow or deny; deny rules win over allow rules.")
    from_: Annotated[list[IdentityPattern], AfterValidator(_not_empty_list)] | None = Field(
        default=None,
        alias="from",
        description="Callers' SPIFFE IDs, or prefixes ending in /*; a caller without an"
        " identity (plaintext) never matches. Omit to match any caller.",
    )
    paths: Annotated[list[AuthzPath], AfterValidator(_not_empty_list)] | None = Field(
        default=None, description="Exact paths, or prefixes ending in * (http only)."
    )
    methods: Methods | None = Field(default=None, description="A method or a list (http only).")
    headers: dict[str, HeaderMatchValue] = Field(
        default_factory=dict,
        description="Header name -> exact value, {regex: ...} or {present: true} (http only).",
    )

    _header_names = field_validator("headers")(_header_names)


class Authz(_Model):
    """A listener's authorization policy, evaluated by the data plane for every request."""

    default: AuthzAction = Field(
        default="allow", description="What happens to a request no rule matches."
    )
    rules: list[AuthzRule] = Field(default_factory=list, description="Allow and deny rules.")


class FilterRef(_Model):
    """A filter attached to a route: its class's import path and the arguments to create it."""

    path: Annotated[str, AfterValidator(_import_path)] = Field(
        description="module:Class, importable from the config's directory, the working"
        " directory or PYTHONPATH."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the class's __init__."
    )


FilterRefValue = Annotated[
    FilterRef,
    BeforeValidator(_filter_ref_input),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "description": "module:Class, without arguments."},
                {
                    "type": "object",
                    "description": "module:Class -> its keyword arguments.",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "additionalProperties": {"anyOf": [{"type": "object"}, {"type": "null"}]},
                },
            ],
            "examples": ["plugins.request_id:CorrelationId", {"plugins.tenant:RequireTenant": {}}],
        }
    ),
]


class Route(_Model):
    """Where matching requests go. A listener's routes are tried in order; the first match wins."""

    name: RouteName | None = Field(
        default=None,
        description='Unique within the listener; defaults to "<listener>/<index>".',
    )
    match: RouteMatch = Field(
        default_factory=RouteMatch, description="Conditions; omitted means every request."
    )
    cluster: str = Field(description="The cluster to send matching requests to.")
    timeout: Duration | None = Field(
        default=None,
        description="Time allowed for the upstream's response headers; null means no limit.",
    )
    filters: list[FilterRefValue] = Field(
        default_factory=list,
        description="Python filters run on this route, in order (responses in reverse).",
    )
    filter_timeout: Duration = Field(
        default=0.1,
        description="Time the filters may take per phase (on_request, on_response), queueing"
        " included; async hooks are cancelled past it.",
    )
    on_error: OnError = Field(
        default="fail_closed",
        description="When a filter raises or runs out of time: fail_closed answers 500 (raised)"
        " or 503 (timed out); fail_open carries on as if the filter were not there.",
    )

    @field_validator("filter_timeout")
    @classmethod
    def _positive_budget(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("expected a duration above zero")
        return value


class Listener(_Model):
    """An address the proxy accepts connections on."""

    name: Name = Field(description="Unique listener name, used in logs and metrics.")
    listen: ListenAddress = Field(description="IP:port to bind; port 0 picks a free port.")
    protocol: ListenerProtocol = Field(
        default="http", description="http routes requests; tcp forwards bytes to one cluster."
    )
    tls: Tls | None = Field(default=None, description="Serve HTTPS (http listeners only).")
    mtls: MtlsMode | None = Field(
        default=None,
        description="Mutual TLS with the mesh identity: strict accepts only mTLS with a client"
        " certificate chaining to the identity bundle; permissive also accepts plaintext.",
    )
    limits: Limits = Field(default_factory=Limits, description="Request limits (http only).")
    authz: Authz | None = Field(
        default=None,
        description="Authorization policy: deny rules, then allow rules, then the default"
        " action (tcp listeners: per connection, `from` rules only). Without it all is allowed.",
    )
    routes: list[Route] = Field(
        default_factory=list, description="http only: tried in order, first match wins."
    )
    cluster: str | None = Field(
        default=None, description="tcp only: the cluster connections are forwarded to."
    )
    access_log: str | None = Field(
        default=None,
        description="http only: write a JSON line per request to `stderr` or to this file"
        " (relative to the config file; appended to).",
    )

    @field_validator("access_log")
    @classmethod
    def _log_target(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value == "stderr":
            return value
        return _config_relative(value, info)

    @model_validator(mode="after")
    def _default_route_names(self) -> "Listener":
        for index, route in enumerate(self.routes):
            if route.name is None:
                route.name = f"{self.name}/{index}"
        return self


class Cluster(_Model):
    """A set of upstream endpoints and how to balance and connect to them."""

    name: Name = Field(description="Unique cluster name, referenced by routes and tcp listeners.")
    endpoints: list[Endpoint] = Field(
        description="host:port of each upstream. An empty list is allowed (a mesh service whose"
        " instances are all gone): its requests get 503 naming the cluster."
    )
    lb: LbPolicy = Field(default="p2c_ewma", description="Load-balancing policy.")
    protocol: UpstreamProtocol = Field(
        default="auto",
        description="auto: the downstream request's HTTP version. http2: h2c prior knowledge,"
        " needed for gRPC behind an HTTP/1 listener.",
    )
    connect_timeout: Duration = Field(
        default=1.0, description="Time allowed to connect (and for the TLS handshake)."
    )
    tls: UpstreamTls | None = Field(
        default=None,
        description="mesh: originate mutual TLS with this sidecar's identity, verifying the"
        " endpoint's certificate against the identity bundle.",
    )
    server_identity: SpiffeId | None = Field(
        default=None,
        description="With tls: mesh, the SPIFFE ID the endpoints must present; when omitted any"
        " identity of this sidecar's trust domain is accepted.",
    )
    idle_timeout: Duration = Field(
        default=90.0,
        description=(
            "A pooled upstream connection idle this long is not reused;"
            " it is closed at the pool's next use."
        ),
    )


class SidecarConfig(_Model):
    """A meshpy sidecar: listeners that accept traffic, clusters that receive it."""

    model_config = ConfigDict(title="meshpy sidecar config")

    admin: Admin | None = Field(default=None, description="The admin endpoints; off if omitted.")
    identity: Identity | None = Field(
        default=None, description="The mesh identity for mtls listeners and tls: mesh clusters."
    )
    listeners: list[Listener] = Field(
        description="At least one listener.", json_schema_extra={"minItems": 1}
    )
    clusters: list[Cluster] = Field(default_factory=list, description="Upstream clusters.")

    @field_validator("listeners")
    @classmethod
    def _not_empty(cls, listeners: list[Listener]) -> list[Listener]:
        if not listeners:
            raise ValueError("expected at least one listener")
        return listeners

    def to_core_json(self, filters: "FilterSet | None" = None) -> str:
        """The normalized config the Rust core consumes: every key present, defaults filled in.

        `filters` holds the chains made for this config (see `meshpy.filters.build_filter_set`);
        it is required when any route has filters.
        """
        return json.dumps(
            {
                "admin": None if self.admin is None else {"listen": self.admin.listen},
                "identity": None if self.identity is None else _core_identity(self.identity),
                "listeners": [
                    _core_listener(listener, i, filters)
                    for i, listener in enumerate(self.listeners)
                ],
                "clusters": [
                    {
                        "name": cluster.name,
                        "endpoints": list(cluster.endpoints),
                        "lb": cluster.lb,
                        "protocol": cluster.protocol,
                        "connect_timeout": cluster.connect_timeout,
                        "idle_timeout": cluster.idle_timeout,
                        "tls": None
                        if cluster.tls is None
                        else {"server_identity": cluster.server_identity},
                    }
                    for cluster in self.clusters
                ],
            }
        )


def _core_identity(identity: Identity) -> dict[str, Any]:
    if identity.cert is None or identity.key is None or identity.bundle is None:
        # The Sidecar issues the certificate and fills in its files before handing it over.
        raise ValueError("identity: a self-issued identity has no certificate files yet")
    return {
        "cert": identity.cert,
        "key": identity.key,
        "bundle": identity.bundle,
        "min_tls": identity.min_tls,
    }


def _core_listener(listener: Listener, index: int, filters: "FilterSet | None") -> dict[str, Any]:
    limits = listener.limits
    return {
        "name": listener.name,
        "listen": listener.listen,
        "protocol": listener.protocol,
        "cluster": listener.cluster,
        "tls": None if listener.tls is None else listener.tls.model_dump(),
        "mtls": listener.mtls,
        "authz": None if listener.authz is None else _core_authz(listener.authz),
        "access_log": listener.access_log,
        "limits": {
            "max_header_bytes": limits.max_header_bytes,
            "max_headers": limits.max_headers,
            "max_body_bytes": limits.max_body_bytes,
            "header_read_timeout": limits.header_read_timeout,
            "idle_timeout": limits.idle_timeout,
        },
        "routes": [
            _core_route(route, _chain(filters, index, j, route))
            for j, route in enumerate(listener.routes)
        ],
    }


def _core_headers(headers: dict[str, HeaderMatch]) -> list[dict[str, Any]]:
    return [
        {"name": name, "exact": h.exact, "regex": h.regex, "present": bool(h.present)}
        for name, h in headers.items()
    ]


def _core_authz(authz: Authz) -> dict[str, Any]:
    return {
        "default": authz.default,
        "rules": [
            {
                "name": rule.name,
                "action": rule.action,
                "from": list(rule.from_ or []),
                "paths": list(rule.paths or []),
                "methods": list(rule.methods or []),
                "headers": _core_headers(rule.headers),
            }
            for rule in authz.rules
        ],
    }


def _chain(filters: "FilterSet | None", listener: int, route_index: int, route: Route) -> Any:
    if not route.filters:
        return None
    chain = filters.chain(listener, route_index) if filters is not None else None
    if chain is None:
        raise ValueError(f"no filter chain was built for route {route.name!r}")
    return chain.core_config()


def _core_route(route: Route, chain: dict[str, Any] | None) -> dict[str, Any]:
    match = route.match
    return {
        "name": route.name,
        "match": {
            "host": match.host,
            "path": match.path,
            "path_prefix": match.path_prefix,
            "path_regex": match.path_regex,
            "methods": list(match.method or []),
            "headers": _core_headers(match.headers),
        },
        "cluster": route.cluster,
        "timeout": route.timeout,
        "filters": chain,
    }


# --- checks across fields: names, references, listener kinds --------------------------------


def _listen_conflict(a: str, b: str) -> bool:
    """Whether two listen addresses cannot both be bound (same port, same or wildcard IP)."""
    ip_a, _, port_a = a.rpartition(":")
    ip_b, _, port_b = b.rpartition(":")
    if port_a != port_b or port_a == "0":
        return False
    addr_a = ipaddress.ip_address(ip_a.strip("[]"))
    addr_b = ipaddress.ip_address(ip_b.strip("[]"))
    if addr_a.version != addr_b.version:
        return False
    return addr_a == addr_b or addr_a.is_unspecified or addr_b.is_unspecified


def _cross_check(config: SidecarConfig) -> list[str]:
    errors: list[str] = []
    clusters = list(dict.fromkeys(cluster.name for cluster in config.clusters))
    known = f"known: {', '.join(clusters)}" if clusters else "no clusters are defined"

    def check_cluster(path: str, name: str) -> None:
        if name not in clusters:
            errors.append(f"{path}: unknown cluster {name!r} ({known})")

    bound: list[tuple[str, str]] = []  # (address, who) already claimed
    if config.admin is not None:
        bound.append((config.admin.listen, "the admin listener"))
    listener_names: dict[str, int] = {}
    for i, listener in enumerate(config.listeners):
        path = f"listeners[{i}]"
        if listener.name == "admin":
            errors.append(f"{path}.name: 'admin' is reserved for the admin listener")
        elif listener.name in listener_names:
            first = listener_names[listener.name]
            errors.append(
                f"{path}.name: duplicate listener name {listener.name!r} (also listeners[{first}])"
            )
        else:
            listener_names[listener.name] = i
        for address, who in bound:
            if _listen_conflict(listener.listen, address):
                errors.append(f"{path}.listen: {listener.listen} conflicts with {address} of {who}")
                break
        bound.append((listener.listen, f"listener {listener.name!r}"))
        if listener.mtls is not None:
            if config.identity is None:
                errors.append(f"{path}.mtls: needs the top-level identity (cert, key, bundle)")
            if listener.tls is not None:
                errors.append(f"{path}.mtls: cannot be combined with tls")

        rule_names: dict[str, int] = {}
        for j, rule in enumerate(listener.authz.rules if listener.authz else []):
            at = f"{path}.authz.rules[{j}].name"
            if rule.name == "default":
                errors.append(f"{at}: 'default' is reserved for the default action's metrics")
            elif rule.name in rule_names:
                first = rule_names[rule.name]
                errors.append(f"{at}: duplicate rule name {rule.name!r} (also rules[{first}])")
            rule_names.setdefault(rule.name, j)

        if listener.protocol == "tcp":
            if listener.routes:
                errors.append(
                    f"{path}.routes: not allowed on a tcp listener; it forwards to `cluster`"
                )
            if listener.access_log is not None:
                errors.append(f"{path}.access_log: not supported on a tcp listener")
            if "limits" in listener.model_fields_set:
                errors.append(f"{path}.limits: not allowed on a tcp listener")
            if listener.tls is not None:
                errors.append(f"{path}.tls: not supported on a tcp listener")
            for j, rule in enumerate(listener.authz.rules if listener.authz else []):
                for field in ("paths", "methods", "headers"):
                    if field in rule.model_fields_set:
                        errors.append(
                            f"{path}.authz.rules[{j}].{field}: not allowed on a tcp listener;"
                            " its connections are authorized by `from` only"
                        )
            if listener.cluster is None:
                errors.append(f"{path}.cluster: required for a tcp listener")
            else:
                check_cluster(f"{path}.cluster", listener.cluster)
            continue

        if listener.cluster is not None:
            errors.append(
                f"{path}.cluster: only tcp listeners take a cluster;"
                " on http listeners each route names its own"
            )
        if not listener.routes:
            errors.append(f"{path}.routes: an http listener needs at least one route")
        route_names: dict[str, int] = {}
        for j, route in enumerate(listener.routes):
            assert route.name is not None  # filled in by Listener
            if route.name in route_names:
                errors.append(
                    f"{path}.routes[{j}].name: duplicate route name {route.name!r}"
                    f" (also routes[{route_names[route.name]}])"
                )
            route_names.setdefault(route.name, j)
            check_cluster(f"{path}.routes[{j}].cluster", route.cluster)

    cluster_names: dict[str, int] = {}
    for i, cluster in enumerate(config.clusters):
        if cluster.name in cluster_names:
            first = cluster_names[cluster.name]
            errors.append(
                f"clusters[{i}].name: duplicate cluster name {cluster.name!r}"
                f" (also clusters[{first}])"
            )
        cluster_names.setdefault(cluster.name, i)
        if cluster.tls == "mesh" and config.identity is None:
            errors.append(
                f"clusters[{i}].tls: mesh needs the top-level identity (cert, key, bundle)"
            )
        if cluster.server_identity is not None and cluster.tls != "mesh":
            errors.append(f"clusters[{i}].server_identity: only used with tls: mesh")
    return errors


# --- turning pydantic's errors into "<path>: <message>" --------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _error_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for item in loc:
        if item == "[key]":  # pydantic's marker for an error in a mapping key, named in the message
            continue
        if isinstance(item, int):
            path += f"[{item}]"
        elif _PLAIN_KEY.fullmatch(item):
            path += f".{item}" if path else item
        else:
            path += f"[{item!r}]"
    return path


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


def _fields_at(root: Any, loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model found at `loc`, for suggesting a fix to an unknown key."""
    annotation: Any = root
    for item in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(item) if isinstance(item, str) else None
            if field is None:
                return []
            annotation = field.annotation
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [field.alias or name for name, field in annotation.model_fields.items()]
    return []


def _error_message(error: Any, root: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        allowed = _fields_at(root, error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field ({hint}expected one of {', '.join(allowed)})"
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {_show(value)}"
    return str(error["msg"])


def validation_errors(exc: ValidationError, root: Any) -> list[str]:
    """One ``<field path>: <message>`` line per problem pydantic found validating `root`."""
    lines = []
    for error in exc.errors(include_url=False):
        path = _error_path(error["loc"])
        message = _error_message(error, root)
        lines.append(f"{path}: {message}" if path else message)
    return lines


# --- loading ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, which PyYAML would silently overwrite."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_config(data: Mapping[str, Any], base_dir: Path | None = None) -> SidecarConfig:
    """Validate an already-parsed config; relative tls paths resolve against `base_dir` (or cwd).

    Raises ConfigError listing every problem found.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            [f"expected a mapping with listeners and clusters at the top level, got {_show(data)}"]
        )
    context = {"base_dir": Path(base_dir or Path.cwd()).absolute()}
    try:
        config = SidecarConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc, SidecarConfig)) from None
    errors = _cross_check(config) or _check_filters(config, context["base_dir"])
    if errors:
        raise ConfigError(errors)
    return config


def _check_filters(config: SidecarConfig, base_dir: Path) -> list[str]:
    """Import every filter class and check its arguments against its __init__."""
    from .filters import check_filter

    errors = []
    for i, listener in enumerate(config.listeners):
        for j, route in enumerate(listener.routes):
            for k, ref in enumerate(route.filters):
                try:
                    check_filter(ref.path, ref.args, base_dir)
                except ValueError as exc:
                    errors.append(f"listeners[{i}].routes[{j}].filters[{k}]: {exc}")
    return errors


def loads_config(
    text: str | bytes, base_dir: Path | None = None, source: str | None = None
) -> SidecarConfig:
    """Parse and validate YAML text; `source` names it in errors (usually the file's path)."""
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}{exc.problem or exc.context}"], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source) from None
    if data is None:
        raise ConfigError(["the config is empty"], source)
    try:
        return parse_config(data, base_dir)
    except ConfigError as exc:
        raise ConfigError(exc.errors, source) from None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror or exc}"], str(path)) from None


def load_config(path: str | os.PathLike[str]) -> SidecarConfig:
    """Load and validate a sidecar config file. Raises ConfigError naming the file and fields."""
    path = Path(path)
    return loads_config(_read_file(path), base_dir=path.parent, source=str(path))


def is_mesh_bootstrap(data: Any) -> bool:
    """Whether a sidecar file's first document is the bootstrap of a control-plane sidecar
    (meshpy.agent) rather than a config."""
    return isinstance(data, dict) and "control_plane" in data


def json_schema() -> dict[str, Any]:
    """JSON Schema of the config file, for editors (e.g. the YAML language server)."""
    schema = SidecarConfig.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
