"""The Rust data plane, compiled as an extension module. Use `meshpy.proxy.Sidecar` instead."""

class CoreError(Exception): ...
class CoreConfigError(CoreError): ...
class ListenError(CoreError): ...

def init_logging(level: str) -> None:
    """Send the core's logs to stderr at `level`: error, warn, info, debug or trace."""

class Proxy:
    def __init__(self, config_json: str, workers: int | None = None) -> None:
        """Bind every listener (ListenError) and serve on `workers` threads (default: all cores).

        Returns once every listener is bound.
        """
    def reload(self, config_json: str) -> int:
        """Swap in a new config atomically and return its version.

        On CoreConfigError or ListenError the previous config stays in force.
        """
    def record_reload_failure(self) -> None:
        """Count a reload refused before it reached the core (config_reload_total)."""
    @property
    def version(self) -> int: ...
    def addresses(self) -> dict[str, str]:
        """Listener name -> bound "ip:port"; the admin listener is under "admin"."""
    def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish until the deadline, then stop."""
    def is_running(self) -> bool: ...
