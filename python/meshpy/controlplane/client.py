"""HTTP clients of the control plane: the operator's (admin token) and the sidecar's (identity)."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from ..errors import MeshpyError
from .auth import sign_request

__all__ = ["AdminClient", "ClientError", "Unreachable", "WorkloadClient"]


class ClientError(MeshpyError):
    """The control plane answered with an error; `status` and `detail` say which."""

    def __init__(self, status: int, detail: str, errors: list[str] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.errors = errors or []


class Unreachable(MeshpyError):
    """No control-plane address answered."""


def _tls(ca_bundle: str | os.PathLike[str] | None) -> ssl.SSLContext | bool:
    if ca_bundle is None:
        return True
    return ssl.create_default_context(cafile=str(ca_bundle))


def _raise_for(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body = response.json()
        detail, errors = body.get("detail", response.text), body.get("errors")
    except ValueError:
        detail, errors = response.text.strip() or response.reason_phrase, None
    if not isinstance(detail, str):  # FastAPI's own validation errors are a list
        detail = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg')}" for item in detail
        )
    raise ClientError(response.status_code, detail, errors)


class AdminClient:
    """What `meshpy apply`, `get`, `status` and `token` use."""

    def __init__(
        self, server: str, token: str, ca_bundle: str | os.PathLike[str] | None = None
    ) -> None:
        try:
            self._http = httpx.Client(
                base_url=server.rstrip("/"),
                verify=_tls(ca_bundle),
                headers={"authorization": f"Bearer {token}"},
                timeout=10.0,
            )
        except (httpx.InvalidURL, OSError) as exc:
            raise MeshpyError(f"cannot use control plane {server!r}: {exc}") from None

    @classmethod
    def from_env(
        cls,
        server: str | None = None,
        token_file: str | None = None,
        ca_bundle: str | None = None,
    ) -> AdminClient:
        """Arguments win over MESHPY_SERVER, MESHPY_TOKEN / MESHPY_TOKEN_FILE and MESHPY_CA."""
        server = server or os.environ.get("MESHPY_SERVER")
        if not server:
            raise MeshpyError("no control plane: pass --server or set MESHPY_SERVER")
        token_file = token_file or os.environ.get("MESHPY_TOKEN_FILE")
        token = os.environ.get("MESHPY_TOKEN") if token_file is None else None
        if token is None:
            if not token_file:
                raise MeshpyError("no admin token: pass --token-file or set MESHPY_TOKEN_FILE")
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise MeshpyError(f"{token_file}: {exc.strerror or exc}") from None
        return cls(server, token, ca_bundle or os.environ.get("MESHPY_CA"))

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise Unreachable(f"{self._http.base_url}: {exc}") from None
        _raise_for(response)
        return response.json() if response.content else None

    def apply(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.request("POST", "/v1/apply", {"resources": resources})

    def list_resources(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        query = f"?namespace={namespace}" if namespace else ""
        return self.request("GET", f"/v1/{plural}{query}")

    def delete(self, plural: str, namespace: str, name: str) -> None:
        self.request("DELETE", f"/v1/{plural}/{namespace}/{name}")

    def sidecars(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/sidecars")

    def create_token(self, service: str, namespace: str, ttl: str) -> dict[str, Any]:
        return self.request(
            "POST", "/v1/tokens", {"service": service, "namespace": namespace, "ttl": ttl}
        )


class WorkloadClient:
    """A sidecar's channel: every request signed with the workload's key; several replicas.

    `credentials` returns the current (certificate PEM, key PEM), or None before joining.
    A connection failure moves on to the next address; the caller retries with backoff.
    """

    def __init__(
        self,
        urls: Sequence[str],
        ca_bundle: str | os.PathLike[str],
        credentials: Callable[[], tuple[str, str] | None],
    ) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self._current = 0
        self._credentials = credentials
        self._http = httpx.Client(verify=_tls(ca_bundle), timeout=10.0)

    @property
    def url(self) -> str:
        return self.urls[self._current]

    def close(self) -> None:
        self._http.close()

    def request(
        self, method: str, target: str, body: Any = None, *, timeout: float = 10.0
    ) -> httpx.Response:
        """Send to the current replica; raises Unreachable (after moving on) or ClientError."""
        content = json.dumps(body).encode() if body is not None else b""
        headers = {"content-type": "application/json"} if body is not None else {}
        credentials = self._credentials()
        if credentials is not None:
            headers.update(sign_request(method, target, content, *credentials))
        index = self._current
        url = self.urls[index]
        try:
            response = self._http.request(
                method, url + target, content=content, headers=headers, timeout=timeout
            )
        except httpx.HTTPError as exc:
            self._move_on_from(index)
            raise Unreachable(f"{url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 500:
            self._move_on_from(index)
        return _raise_for(response)

    def _move_on_from(self, index: int) -> None:
        # The watch and the reports share this client: a request that fails late (a long-poll
        # on a hung replica) must not send the other back to the replica it already left.
        if self._current == index:
            self._current = (index + 1) % len(self.urls)
