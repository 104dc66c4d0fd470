"""meshpy: a service mesh whose data plane is a Rust proxy, configured and extended from Python."""

import importlib
import os
from typing import TYPE_CHECKING, Any

# mimalloc, the data plane's allocator, otherwise commits a whole arena up front: about
# 4 MB of every idle sidecar. It reads this once, when meshpy._core loads.
os.environ.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")

from .errors import ConfigError, ListenError, MeshpyError

if TYPE_CHECKING:
    __version__: str
    from . import testing
    from .config import SidecarConfig, json_schema, load_config, loads_config, parse_config
    from .filters import Filter, Headers, LogRecord, Request, Response

# Imported on first use (PEP 562), so that a process needing only part of the package, such
# as a sidecar or `meshpy ca`, does not pay for the rest (importlib.metadata, for __version__,
# costs 2 MB alone): name -> the module that defines it.
_LAZY = {
    "testing": ".testing",
    "SidecarConfig": ".config",
    "json_schema": ".config",
    "load_config": ".config",
    "loads_config": ".config",
    "parse_config": ".config",
    "Filter": ".filters",
    "Headers": ".filters",
    "LogRecord": ".filters",
    "Request": ".filters",
    "Response": ".filters",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshpy")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if name == "__version__":
        value: Any = _version()
    elif module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    elif module == f".{name}":  # a submodule
        value = importlib.import_module(module, __name__)
    else:
        value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "__version__"})


__all__ = [
    "ConfigError",
    "Filter",
    "Headers",
    "ListenError",
    "LogRecord",
    "MeshpyError",
    "Request",
    "Response",
    "SidecarConfig",
    "__version__",
    "json_schema",
    "load_config",
    "loads_config",
    "parse_config",
    "testing",
]
