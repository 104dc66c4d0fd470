"""The exceptions meshpy raises. Errors from the Rust core are mapped onto these at the boundary."""

from collections.abc import Sequence


class MeshpyError(Exception):
    """Base class of every error meshpy raises on purpose."""


class ConfigError(MeshpyError, ValueError):
    """A config was refused.

    `errors` holds one line per problem, each ``<field path>: <message>`` such as
    ``listeners[0].listen: expected IP:port such as 127.0.0.1:8080, got 'localhost'``.
    When the config came from a file, `source` names it and every line of ``str()`` starts
    with it, the way compilers report errors.
    """

    def __init__(self, errors: Sequence[str], source: str | None = None) -> None:
        super().__init__(list(errors), source)
        self.errors: list[str] = list(errors)
        self.source = source

    def __str__(self) -> str:
        if self.source is None:
            return "\n".join(self.errors)
        return "\n".join(f"{self.source}: {line}" for line in self.errors)


class ListenError(MeshpyError, OSError):
    """A listener could not bind its address (in use, not local, permission denied)."""
