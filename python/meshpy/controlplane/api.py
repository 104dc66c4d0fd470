"""The control plane's REST API (FastAPI; the OpenAPI document is served at /openapi.json).

Operators (admin token): resources, endpoints registered by hand, join tokens, sidecar status.
Sidecars (join token, then their workload identity): join with a CSR, renew, watch their
config (long-poll), report what they run (which keeps their endpoint's lease alive), leave.

The watch stream is a long-poll: ``GET /v1/config?hash=H&wait=S`` answers at once when the
sidecar's config differs from H and otherwise waits up to S seconds for a change. It is plain
HTTP, so it passes through any proxy or load balancer in front of several replicas, a
sidecar can switch replicas between two polls without any session state, and a lost
response is simply asked for again: the hash says what the sidecar has.
"""

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from ..ca import CAError, CertificateAuthority, parse_ttl, spiffe_id
from ..errors import ConfigError
from .auth import AuthError, JoinToken, Workload, check_admin_token, verify_request
from .models import KINDS, PLURALS, Route, dump_resource, parse_resource
from .render import MeshState, config_hash, endpoints_by_service, render_sidecar
from .store import Store, StoreError

__all__ = ["ControlPlane", "create_app"]

MAX_WAIT = 55.0  # seconds a long-poll may hang, below common proxy idle timeouts


def _resource_key(plural: str, namespace: str, name: str) -> str:
    return f"resources/{plural}/{namespace}/{name}"


class ControlPlane:
    """The state behind the API: the store, the CA, the admin token and the timings."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        admin_token: str,
        *,
        cert_ttl: float = 3600.0,
        lease_ttl: float = 5.0,
        name: str = "control-plane",
    ) -> None:
        self.store = store
        self.ca = ca
        self.admin_token = admin_token
        self.cert_ttl = cert_ttl
        self.lease_ttl = lease_ttl
        self.name = name
        self._state: MeshState | None = None
        self._state_lock = asyncio.Lock()

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    async def state(self) -> MeshState:
        """The mesh as of the store's current revision (read once per revision)."""
        async with self._state_lock:
            revision = await self.store.revision()
            if self._state is not None and self._state.revision == revision:
                return self._state
            state = MeshState(self.trust_domain, revision)
            for entry in await self.store.list("resources/"):
                resource = parse_resource(entry.value)
                getattr(state, PLURALS[resource.kind]).append(resource)
            state.endpoints = endpoints_by_service(await self.store.list("endpoints/"))
            self._state = state
            return state


# --- request and response bodies ----------------------------------------------------------------


class ApplyRequest(BaseModel):
    resources: list[dict[str, Any]] = Field(description="Resources as a file holds them.")


class ApplyResult(BaseModel):
    kind: str
    namespace: str
    name: str
    action: str = Field(description="created, configured or unchanged")
    version: int


class TokenRequest(BaseModel):
    service: str
    namespace: str = "default"
    ttl: str | float = Field(default="1h", description="How long the token may be used.")


class EndpointRequest(BaseModel):
    namespace: str = "default"
    service: str
    address: str = Field(pattern=r"^[^\s/]+:\d{1,5}$", description="host:port of a sidecar.")
    ttl: float | None = Field(
        default=None, gt=0, description="Seconds until it expires unless registered again."
    )


class JoinRequest(BaseModel):
    token: str
    csr: str = Field(description="PEM CSR of a key the sidecar generated and keeps.")


class RenewRequest(BaseModel):
    csr: str


class CertificateResponse(BaseModel):
    spiffe_id: str
    certificate: str = Field(description="PEM chain: the workload certificate, then the CA's.")
    bundle: str = Field(description="PEM trust anchors of the mesh.")
    not_after: dt.datetime


class Report(BaseModel):
    sidecar_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    address: str = Field(description="host:port other sidecars reach this one's inbound on.")
    version: int | None = None
    hash: str | None = None
    applied: bool = True
    error: str | None = None


# --- the app ------------------------------------------------------------------------------------


def _error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def create_app(cp: ControlPlane, *, manage_store: bool = True) -> FastAPI:
    """The ASGI app; with `manage_store` its lifespan starts and closes the store."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_store:
            await cp.store.start()
        try:
            yield
        finally:
            if manage_store:
                await cp.store.close()

    app = FastAPI(
        title="meshpy control plane",
        version="1",
        description="Services, routes, policies and filters of the mesh; sidecar identity,"
        " config watch and discovery.",
        lifespan=lifespan,
    )

    @app.exception_handler(StoreError)
    async def _store_down(_: Request, exc: StoreError) -> JSONResponse:
        return _error(503, f"store unavailable: {exc}")

    @app.exception_handler(AuthError)
    async def _unauthenticated(_: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(ConfigError)
    async def _invalid(_: Request, exc: ConfigError) -> JSONResponse:
        return _error(422, "; ".join(exc.errors), errors=exc.errors)

    async def admin(request: Request) -> None:
        check_admin_token(request.headers.get("authorization"), cp.admin_token)

    async def workload(request: Request) -> Workload:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return verify_request(
            request.method,
            target,
            await request.body(),
            dict(request.headers),
            cp.ca.certificate,
            cp.trust_domain,
        )

    Admin = Depends(admin)
    Caller = Annotated[Workload, Depends(workload)]

    # -- health and trust

    @app.get("/v1/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "revision": await cp.store.revision(), "name": cp.name}

    @app.get("/v1/ca/bundle", tags=["meta"], response_class=PlainTextResponse)
    async def bundle() -> str:
        """The mesh's trust anchors (public)."""
        return cp.ca.bundle_pem

    # -- resources

    async def _existing_services(extra: list[Any]) -> set[tuple[str, str]]:
        names = {
            (e.value["metadata"]["namespace"], e.value["metadata"]["name"])
            for e in await cp.store.list("resources/services/")
        }
        return names | {
            (r.metadata.namespace, r.metadata.name) for r in extra if r.kind == "Service"
        }

    def _check_references(resources: list[Any], services: set[tuple[str, str]]) -> list[str]:
        errors = []
        for index, resource in enumerate(resources):
            if not isinstance(resource, Route):
                continue
            for field in ("host", "service"):
                ref = getattr(resource.spec, field)
                ns, _, name = ref.rpartition("/")
                target = (ns or resource.metadata.namespace, name)
                if target not in services:
                    where = f"resources[{index}]: " if len(resources) > 1 else ""
                    errors.append(
                        f"{where}spec.{field}: no Service {target[0]}/{target[1]};"
                        " apply the Service first (or in the same request)"
                    )
        return errors

    def _parse_all(bodies: list[dict[str, Any]]) -> list[Any]:
        resources, errors = [], []
        for index, body in enumerate(bodies):
            try:
                resources.append(parse_resource(body))
            except ConfigError as exc:
                prefix = f"resources[{index}]: " if len(bodies) > 1 else ""
                errors += [prefix + line for line in exc.errors]
        if errors:
            raise ConfigError(errors)
        return resources

    def _shown(entry: Any) -> dict[str, Any]:
        value = dict(entry.value)
        value["metadata"] = {**value["metadata"], "version": entry.revision}
        return value

    async def _apply(resources: list[Any]) -> list[ApplyResult]:
        errors = _check_references(resources, await _existing_services(resources))
        if errors:
            raise ConfigError(errors)
        writes, results = [], []
        for resource in resources:
            plural = PLURALS[resource.kind]
            key = _resource_key(plural, resource.metadata.namespace, resource.metadata.name)
            value = dump_resource(resource)
            value["metadata"].pop("version", None)
            existing = await cp.store.get(key)
            if existing is not None and existing.value == value:
                action, version = "unchanged", existing.revision
            else:
                action, version = ("configured" if existing else "created"), 0
                writes.append((key, value))
            results.append(
                ApplyResult(
                    kind=resource.kind,
                    namespace=resource.metadata.namespace,
                    name=resource.metadata.name,
                    action=action,
                    version=version,
                )
            )
        if writes:
            revision = await cp.store.put_all(writes)
            for result in results:
                if result.action != "unchanged":
                    result.version = revision
        return results

    @app.post("/v1/apply", tags=["resources"], dependencies=[Admin])
    async def apply(request: ApplyRequest) -> list[ApplyResult]:
        """Create or update several resources at once: all are checked before any is written."""
        return await _apply(_parse_all(request.resources))

    resource_schemas: dict[str, Any] = {}
    for plural, model in KINDS.items():
        _add_kind_routes(app, cp, plural, model, Admin, _apply, _shown, resource_schemas)

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the resource schemas the PUT bodies refer to."""
        if app.openapi_schema is None:
            FastAPI.openapi(app)["components"]["schemas"].update(resource_schemas)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    # -- endpoints registered by hand

    @app.get("/v1/endpoints", tags=["discovery"], dependencies=[Admin])
    async def list_endpoints(namespace: str | None = None) -> list[dict[str, Any]]:
        prefix = f"endpoints/{namespace}/" if namespace else "endpoints/"
        shown = []
        for entry in await cp.store.list(prefix):
            _, ns, service, _ = entry.key.split("/", 3)
            shown.append({"namespace": ns, "service": service, **entry.value})
        return shown

    @app.post("/v1/endpoints", tags=["discovery"], dependencies=[Admin], status_code=201)
    async def register_endpoint(request: EndpointRequest) -> dict[str, Any]:
        key = f"endpoints/{request.namespace}/{request.service}/api-{request.address}"
        lease = await cp.store.grant_lease(request.ttl) if request.ttl else None
        value = {"address": request.address, "source": "api"}
        revision = await cp.store.put(key, value, lease=lease)
        return {
            **value,
            "namespace": request.namespace,
            "service": request.service,
            "version": revision,
        }

    @app.delete(
        "/v1/endpoints/{namespace}/{service}/{address}",
        tags=["discovery"],
        dependencies=[Admin],
        status_code=204,
    )
    async def remove_endpoint(namespace: str, service: str, address: str) -> Response:
        if not await cp.store.delete(f"endpoints/{namespace}/{service}/api-{address}"):
            raise HTTPException(404, f"no endpoint {address} registered by hand for {service}")
        return Response(status_code=204)

    # -- join tokens

    @app.post("/v1/tokens", tags=["identity"], dependencies=[Admin], status_code=201)
    async def create_token(request: TokenRequest) -> dict[str, Any]:
        """A join token for one service identity; it expires after `ttl`."""
        try:
            identity = spiffe_id(cp.trust_domain, request.namespace, request.service)
            ttl = parse_ttl(request.ttl)
        except (CAError, ValueError) as exc:
            raise ConfigError([str(exc)]) from None
        token = JoinToken.generate()
        expires = time.time() + ttl
        record = {
            "service": request.service,
            "namespace": request.namespace,
            "digest": token.digest,
            "expires_at": expires,
        }
        await cp.store.put(f"tokens/{token.id}", record, lease=await cp.store.grant_lease(ttl))
        return {
            "token": str(token),
            "id": token.id,
            "spiffe_id": identity,
            "expires_at": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat(),
        }

    @app.get("/v1/tokens", tags=["identity"], dependencies=[Admin])
    async def list_tokens() -> list[dict[str, Any]]:
        return [
            {
                "id": e.key.split("/", 1)[1],
                "service": e.value["service"],
                "namespace": e.value["namespace"],
                "expires_at": e.value["expires_at"],
            }
            for e in await cp.store.list("tokens/")
        ]

    @app.delete("/v1/tokens/{token_id}", tags=["identity"], dependencies=[Admin], status_code=204)
    async def revoke_token(token_id: str) -> Response:
        if not await cp.store.delete(f"tokens/{token_id}"):
            raise HTTPException(404, f"no token {token_id}")
        return Response(status_code=204)

    # -- sidecars: identity

    def _issue(csr: str, identity: str) -> CertificateResponse:
        try:
            issued = cp.ca.sign_csr(csr, identity, cp.cert_ttl)
        except CAError as exc:
            raise HTTPException(400, f"csr: {exc}") from None
        return CertificateResponse(
            spiffe_id=issued.spiffe_id,
            certificate=issued.chain_pem,
            bundle=issued.bundle_pem,
            not_after=issued.not_after,
        )

    @app.post("/v1/join", tags=["sidecar"])
    async def join(request: JoinRequest) -> CertificateResponse:
        """Trade a join token and a CSR for a workload certificate of the token's service."""
        token = JoinToken.parse(request.token)
        entry = await cp.store.get(f"tokens/{token.id}")
        if entry is None or not token.matches(entry.value["digest"]):
            raise AuthError("unknown or revoked join token")
        if entry.value["expires_at"] < time.time():
            raise AuthError("the join token has expired")
        identity = spiffe_id(cp.trust_domain, entry.value["namespace"], entry.value["service"])
        return _issue(request.csr, identity)

    @app.post("/v1/certificate", tags=["sidecar"])
    async def renew(request: RenewRequest, caller: Caller) -> Any:
        """A new certificate for the calling workload's identity (before its current expires)."""
        return _issue(request.csr, caller.spiffe_id)

    # -- sidecars: config watch, reports, status

    async def _slice(namespace: str, service: str) -> tuple[MeshState, dict[str, Any], str]:
        state = await cp.state()
        config = render_sidecar(state, namespace, service)
        return state, config, config_hash(config)

    @app.get("/v1/config", tags=["sidecar"], response_model=None)
    async def watch_config(
        caller: Caller,
        hash: str = Query(default="", description="The hash of the config the sidecar runs."),
        wait: float = Query(default=0.0, ge=0, description="Seconds to wait for a change."),
    ) -> dict[str, Any] | Response:
        """The caller's config as soon as it differs from `hash` (204 after `wait` without)."""
        deadline = time.monotonic() + min(wait, MAX_WAIT)
        while True:
            state, config, digest = await _slice(caller.namespace, caller.service)
            if digest != hash:
                return {"version": state.revision, "hash": digest, "config": config}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Response(status_code=204)
            await cp.store.wait(state.revision, remaining)

    @app.post("/v1/report", tags=["sidecar"])
    async def report(body: Report, caller: Caller) -> dict[str, Any]:
        """What the sidecar runs; each report renews the lease of its registration."""
        key = f"sidecars/{body.sidecar_id}"
        record = {
            "id": body.sidecar_id,
            "service": caller.service,
            "namespace": caller.namespace,
            "spiffe_id": caller.spiffe_id,
            "address": body.address,
            "version": body.version,
            "hash": body.hash,
            "applied": body.applied,
            "error": body.error,
            "cert_not_after": caller.not_after.isoformat(),
        }
        endpoint_key = f"endpoints/{caller.namespace}/{caller.service}/{body.sidecar_id}"
        endpoint = {"address": body.address, "source": "sidecar", "sidecar": body.sidecar_id}
        existing = await cp.store.get(key)
        if existing is not None and existing.value["spiffe_id"] != caller.spiffe_id:
            raise HTTPException(409, f"sidecar id {body.sidecar_id} belongs to another identity")
        if existing is not None and existing.lease and await cp.store.keepalive(existing.lease):
            if existing.value != record:
                await cp.store.put_all(
                    [(key, record), (endpoint_key, endpoint)], lease=existing.lease
                )
        else:
            lease = await cp.store.grant_lease(cp.lease_ttl)
            await cp.store.put_all([(key, record), (endpoint_key, endpoint)], lease=lease)
        return {"lease_ttl": cp.lease_ttl}

    @app.post("/v1/leave", tags=["sidecar"], status_code=204)
    async def leave(body: Report, caller: Caller) -> Response:
        """Deregister now (a sidecar shutting down), instead of when the lease runs out."""
        existing = await cp.store.get(f"sidecars/{body.sidecar_id}")
        if existing is not None and existing.value["spiffe_id"] == caller.spiffe_id:
            if existing.lease:
                await cp.store.revoke(existing.lease)
        return Response(status_code=204)

    @app.get("/v1/sidecars", tags=["sidecar"], dependencies=[Admin])
    async def sidecars() -> list[dict[str, Any]]:
        """Every live sidecar: the config version it runs and whether that is the latest."""
        shown = []
        for entry in await cp.store.list("sidecars/"):
            record = entry.value
            _, _, digest = await _slice(record["namespace"], record["service"])
            shown.append({**record, "in_sync": record["applied"] and record["hash"] == digest})
        return shown

    return app


def _add_kind_routes(
    app: FastAPI,
    cp: ControlPlane,
    plural: str,
    model: type[BaseModel],
    admin: Any,
    apply: Callable[[list[Any]], Awaitable[list[ApplyResult]]],
    shown: Callable[[Any], dict[str, Any]],
    schemas: dict[str, Any],
) -> None:
    """GET/PUT/DELETE for one kind of resource, its body documented by its model's schema.

    The model's schema and those it refers to are added to `schemas`, for the document's
    components (a $ref into the model's own $defs would not resolve in the document).
    """
    kind = model.__name__
    ref = "#/components/schemas/{model}"
    model_schema = model.model_json_schema(by_alias=True, ref_template=ref)
    schemas.update(model_schema.pop("$defs", {}), **{kind: model_schema})
    schema = {"content": {"application/json": {"schema": {"$ref": ref.format(model=kind)}}}}

    @app.get(f"/v1/{plural}", tags=["resources"], dependencies=[admin], name=f"list_{plural}")
    async def list_kind(namespace: str | None = None) -> list[dict[str, Any]]:
        prefix = f"resources/{plural}/" + (f"{namespace}/" if namespace else "")
        return [shown(entry) for entry in await cp.store.list(prefix)]

    @app.get(
        f"/v1/{plural}/{{namespace}}/{{name}}",
        tags=["resources"],
        dependencies=[admin],
        name=f"get_{plural}",
    )
    async def get_kind(namespace: str, name: str) -> dict[str, Any]:
        entry = await cp.store.get(_resource_key(plural, namespace, name))
        if entry is None:
            raise HTTPException(404, f"no {kind} {namespace}/{name}")
        return shown(entry)

    @app.put(
        f"/v1/{plural}/{{namespace}}/{{name}}",
        tags=["resources"],
        dependencies=[admin],
        name=f"put_{plural}",
        openapi_extra={"requestBody": schema},
    )
    async def put_kind(
        namespace: str, name: str, body: Annotated[dict[str, Any], Body()]
    ) -> ApplyResult:
        body = {"kind": kind, **body}
        resource = parse_resource(body)
        if resource.kind != kind:
            raise ConfigError([f"kind: expected {kind} at this path, got {resource.kind}"])
        if (resource.metadata.namespace, resource.metadata.name) != (namespace, name):
            raise ConfigError(["metadata: namespace and name must match the path"])
        return (await apply([resource]))[0]

    @app.delete(
        f"/v1/{plural}/{{namespace}}/{{name}}",
        tags=["resources"],
        dependencies=[admin],
        status_code=204,
        name=f"delete_{plural}",
    )
    async def delete_kind(namespace: str, name: str) -> Response:
        if plural == "services":
            for entry in await cp.store.list("resources/routes/"):
                route = parse_resource(entry.value)
                assert isinstance(route, Route)
                for ref in (route.spec.host, route.spec.service):
                    ns, _, ref_name = ref.rpartition("/")
                    if (ns or route.metadata.namespace, ref_name) == (namespace, name):
                        raise HTTPException(
                            409,
                            f"Route {route.metadata.namespace}/{route.metadata.name}"
                            f" refers to Service {namespace}/{name}; delete the route first",
                        )
        if not await cp.store.delete(_resource_key(plural, namespace, name)):
            raise HTTPException(404, f"no {kind} {namespace}/{name}")
        return Response(status_code=204)


def openapi_document(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2) + "\n"
