"""Python filters: the `Filter` base class, and turning a config's filter lists into chains.

A filter is a class with any of three hooks, each a plain or an `async` method:

- ``on_request(req)``: before the request goes upstream. Return a `Response` to answer
  it without contacting the upstream; mutate ``req`` (headers, path, body, ``route_to``)
  to change what goes upstream; return None to carry on.
- ``on_response(req, resp)``: when the upstream's response head arrives; mutate
  ``resp.status`` and ``resp.headers``.
- ``on_log(record)``: after the response has been sent, off the request's path.

Only the hooks a class defines are called, so a route pays for nothing else.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import TypeAdapter, ValidationError

from ._core import Headers, LogRecord, Request, Response
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import SidecarConfig

__all__ = [
    "Chain",
    "Filter",
    "FilterSet",
    "Headers",
    "LogRecord",
    "Request",
    "Response",
    "build_filter_set",
    "check_filter",
    "import_path_error",
]

HOOKS = ("on_request", "on_response", "on_log")

# module.path:Class (a dotted attribute path after the colon is allowed too)
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class Filter:
    """Base class of meshpy filters.

    Subclass it and define any of ``on_request``, ``on_response`` and ``on_log``; the
    arguments a route gives in config are passed to ``__init__`` as keyword arguments,
    once per config version. Set ``body_limit`` (bytes) to read the request body in
    ``on_request`` as ``req.body``; a larger body is refused with 413.
    """

    body_limit: ClassVar[int | None] = None

    def __repr__(self) -> str:
        return f"{type(self).__module__}:{type(self).__qualname__}"


def import_path_error(path: str) -> str | None:
    """Why `path` is not a valid filter import path, or None when it is."""
    if _IMPORT_PATH.fullmatch(path):
        return None
    return f"expected an import path such as 'plugins.tenant:RequireTenant', got {path!r}"


def _search_path(base_dir: Path | None) -> list[str]:
    # Filters live next to the config or in the directory meshpy runs from, as well as
    # anywhere on PYTHONPATH.
    dirs = [os.getcwd()]
    if base_dir is not None:
        dirs.insert(0, str(Path(base_dir).absolute()))
    return dirs


def _ensure_importable(base_dir: Path | None) -> None:
    for directory in reversed(_search_path(base_dir)):
        if directory not in sys.path:
            sys.path.insert(0, directory)


def resolve(path: str, base_dir: Path | None = None) -> type[Filter]:
    """Import the filter class `path` names (module:Class); raises ValueError saying why not."""
    error = import_path_error(path)
    if error:
        raise ValueError(error)
    module_name, _, attribute = path.partition(":")
    _ensure_importable(base_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ValueError(f"cannot import {path!r}: no module named {exc.name!r}") from None
        raise ValueError(f"cannot import {path!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise ValueError(f"cannot import {path!r}: {type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"cannot import {path!r}: {module_name} has no {part!r}") from None
    if not (isinstance(target, type) and issubclass(target, Filter)):
        raise ValueError(f"{path!r} is not a meshpy.Filter subclass")
    if not any(callable(getattr(target, hook, None)) for hook in HOOKS):
        raise ValueError(f"{path!r} defines none of on_request, on_response, on_log")
    limit = target.body_limit
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"{path!r}: body_limit must be a number of bytes or None, got {limit!r}")
    return target


def _describe(signature: inspect.Signature) -> str:
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    return ", ".join(str(p) for p in params) or "no arguments"


def _bind(cls: type[Filter], path: str, args: dict[str, Any]) -> None:
    """Check `args` against the class's __init__: names, required ones, annotated types."""
    try:
        signature = inspect.signature(cls, eval_str=True)
    except (NameError, TypeError, ValueError):
        signature = inspect.signature(cls)
    try:
        bound = signature.bind(**args)
    except TypeError as exc:
        raise ValueError(
            f"invalid arguments for {path}: {exc} (it takes: {_describe(signature)})"
        ) from None
    for name, value in bound.arguments.items():
        annotation = signature.parameters[name].annotation
        if annotation is inspect.Parameter.empty or isinstance(annotation, str):
            continue
        if signature.parameters[name].kind in (
            inspect.Parameter.VAR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            continue
        try:
            TypeAdapter(annotation).validate_python(value, strict=True)
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]["msg"]
            raise ValueError(
                f"invalid argument {name}={value!r} for {path}: {problem.lower()}"
            ) from None
        except Exception:  # an annotation pydantic cannot check is left to the filter
            continue


def check_filter(path: str, args: dict[str, Any], base_dir: Path | None = None) -> type[Filter]:
    """Resolve `path` and check `args` against its __init__; raises ValueError saying why not."""
    cls = resolve(path, base_dir)
    _bind(cls, path, args)
    return cls


@dataclass(frozen=True)
class Hook:
    """One filter's hook in a chain: its name for logs and metrics, the bound method."""

    name: str
    call: Callable[..., Any]
    is_async: bool


def _hooks(filters: Iterable[tuple[str, Filter]], hook: str) -> tuple[Hook, ...]:
    found = []
    for name, instance in filters:
        method = getattr(instance, hook, None)
        if callable(method):
            found.append(Hook(name, method, inspect.iscoroutinefunction(method)))
    return tuple(found)


_chain_ids = itertools.count(1)


class Chain:
    """One route's filters, instantiated for one config version."""

    __slots__ = (
        "body_limit",
        "filters",
        "id",
        "log_hooks",
        "names",
        "on_error",
        "request_hooks",
        "response_hooks",
        "route",
        "timeout",
    )

    def __init__(
        self,
        route: str,
        names: Sequence[str],
        filters: Sequence[Filter],
        timeout: float,
        on_error: str,
    ) -> None:
        self.id = next(_chain_ids)
        self.route = route
        self.names = tuple(names)
        self.filters = tuple(filters)
        self.timeout = timeout
        self.on_error = on_error
        pairs = list(zip(self.names, self.filters, strict=True))
        self.request_hooks = _hooks(pairs, "on_request")
        # Responses travel back through the filters in reverse, like middleware unwinding.
        self.response_hooks = _hooks(reversed(pairs), "on_response")
        self.log_hooks = _hooks(pairs, "on_log")
        limits = [f.body_limit for f in self.filters if f.body_limit is not None]
        self.body_limit = max(limits) if limits else None

    def __repr__(self) -> str:
        return f"<Chain {self.id} route={self.route!r} filters={list(self.names)}>"

    def core_config(self) -> dict[str, Any]:
        """The chain as the data plane's config describes it."""
        return {
            "chain": self.id,
            "names": list(self.names),
            "on_request": bool(self.request_hooks),
            "on_response": bool(self.response_hooks),
            "on_log": bool(self.log_hooks),
            "body_limit": self.body_limit,
            "timeout": self.timeout,
            "on_error": self.on_error,
        }


@dataclass
class FilterSet:
    """Every route's chain for one config version, and the modules their classes came from."""

    chains: dict[tuple[int, int], Chain] = field(default_factory=dict)
    modules: dict[str, ModuleType] = field(default_factory=dict)

    def chain(self, listener: int, route: int) -> Chain | None:
        return self.chains.get((listener, route))

    def handles(self) -> dict[int, Chain]:
        """Chain id -> chain, as the core takes them."""
        return {chain.id: chain for chain in self.chains.values()}


def build_filter_set(config: SidecarConfig, base_dir: Path | None = None) -> FilterSet:
    """Instantiate every route's filters. Raises ConfigError naming the route and filter."""
    filter_set = FilterSet()
    errors = []
    for i, listener in enumerate(config.listeners):
        for j, route in enumerate(listener.routes):
            instances = []
            for k, ref in enumerate(route.filters):
                at = f"listeners[{i}].routes[{j}].filters[{k}]"
                try:
                    cls = check_filter(ref.path, ref.args, base_dir)
                    instances.append(instantiate(cls, ref.path, ref.args))
                except ValueError as exc:
                    errors.append(f"{at}: {exc}")
                    continue
                filter_set.modules[cls.__module__] = sys.modules[cls.__module__]
            if route.filters and len(instances) == len(route.filters):
                names = [ref.path for ref in route.filters]
                chain = Chain(
                    route.name or "", names, instances, route.filter_timeout, route.on_error
                )
                filter_set.chains[(i, j)] = chain
    if errors:
        raise ConfigError(errors)
    return filter_set


def instantiate(cls: type[Filter], path: str, args: dict[str, Any]) -> Filter:
    """Make one filter; raises ValueError naming the filter when its __init__ fails."""
    try:
        return cls(**args)
    except Exception as exc:
        raise ValueError(f"{path} could not be created: {type(exc).__name__}: {exc}") from None
