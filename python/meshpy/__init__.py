"""meshpy: a service mesh whose data plane is a Rust proxy, configured and extended from Python."""

from importlib.metadata import PackageNotFoundError, version

from . import testing
from .config import SidecarConfig, json_schema, load_config, loads_config, parse_config
from .errors import ConfigError, ListenError, MeshpyError
from .filters import Filter, Headers, LogRecord, Request, Response

try:
    __version__ = version("meshpy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

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
