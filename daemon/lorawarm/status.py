"""The read-only status API: what happened to every adapter on every server, and why.

Routes: `GET /healthz` (the daemon's loop answers), `GET /readyz` (the first scan is done),
`GET /v1/adapters`, `GET /v1/adapters/{name}`, `GET /v1/servers`, `GET /v1/sources`,
`GET /metrics` (Prometheus), and `GET /` (the status page, `status_page.py`). With a token
configured every route but `/healthz` and the page (static, it holds no data) needs
`Authorization: Bearer <token>`. Loopback by default. The response models below are the
documented JSON (and the OpenAPI schema at `/openapi.json`).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.convertors import PathConvertor, register_url_convertor

from lorawarm import __version__
from lorawarm.catalog import AdapterRecord, AdapterState, Catalog, ServerAdapter, adapter_state
from lorawarm.fit import FitPolicy
from lorawarm.metrics import Metrics
from lorawarm.reconcile import ServerStatus
from lorawarm.server_facts import ServerFacts
from lorawarm.status_page import page_router


class ServerView(BaseModel):
    url: str = Field(description="The vLLM server's base URL.")
    state: str = Field(
        description="pending, loaded, failed, cold or incompatible (it cannot take this "
        "adapter: `reason` says why) on this server."
    )
    reason: str | None = Field(
        default=None,
        description="Why it is incompatible there: target_modules_not_supported, "
        "shape_mismatch, rank_too_large, name_is_base_model, base_model_mismatch.",
    )
    warnings: list[str] = Field(
        default=[],
        description="Served, but worth a look: base_model_differs (it names another base "
        "model than the server's, while its modules and shapes fit).",
    )
    resident: bool | None = Field(
        default=None,
        description="In the engine's memory now (its CPU cache); null when not known (the "
        "server runs no lorawarm endpoint).",
    )
    attempts: int = Field(description="Load attempts lorawarm made for this snapshot.")
    condition: str | None = Field(
        description="Why it is not loaded: unreachable, unauthorized, runtime_updates_disabled, "
        "engine_dead, rejected, name_taken, ..."
    )
    last_error: str | None = Field(description="The last error, vLLM's message where it gave one.")
    loaded_at: str | None = Field(description="When it was loaded on this server (UTC).")


class AdapterView(BaseModel):
    name: str
    state: AdapterState
    reason: str | None = Field(
        description="Stable code when invalid or failed; when incompatible, the first "
        "server's (each server's is in `servers`)."
    )
    message: str | None = Field(description="What is wrong, for a person.")
    pending_reason: str | None = Field(
        default=None,
        description="The folder's current content is not served (stable code): the last "
        "valid snapshot stays loaded until the folder is valid again or deleted.",
    )
    pending_message: str | None = Field(
        default=None, description="Why the current content is not served, for a person."
    )
    digest: str | None = Field(description="Content digest of the snapshot vLLM loads.")
    source_path: str = Field(description="The folder in the drop directory.")
    snapshot_path: str | None = Field(description="The immutable copy vLLM is given.")
    first_seen: str
    changed_at: str
    validated_at: str | None
    servers: list[ServerView]
    source: str | None = Field(
        default=None,
        description="The source URL the folder was synced from; null for a folder dropped by hand.",
    )


class AdapterList(BaseModel):
    adapters: list[AdapterView]
    counts: dict[str, int] = Field(description="Number of adapters in each state.")


class ServerInfo(BaseModel):
    url: str
    condition: str = Field(description="ok, or why the server cannot be worked with.")
    message: str | None
    healthy: bool = Field(description="Its /health answered 200 at the last probe.")
    since: str = Field(description="When the condition began (UTC).")
    last_sync: str | None = Field(description="End of the last successful reconcile (UTC).")
    loaded: int = Field(description="Adapters of ours it lists in /v1/models.")
    loads: int
    unloads: int
    failures: int
    collection_held: str | None = Field(
        default=None,
        description="Why snapshot collection waits for this server (it was never listed), or null.",
    )
    learned_from: list[str] = Field(
        default=[],
        description="Where the facts below came from: plugin (lorawarm's endpoint in vLLM), "
        "models (GET /v1/models), config (the model's local config.json), settings. Empty "
        "until the server answered.",
    )
    model: str | None = Field(default=None, description="Its --model.")
    served_model_names: list[str] = Field(default=[], description="Its served model names.")
    vllm_version: str | None = None
    max_lora_rank: int | None = Field(
        default=None, description="The largest rank sent there (its flag, or the override)."
    )
    max_loras: int | None = None
    max_cpu_loras: int | None = Field(
        default=None, description="Adapters its engine keeps in memory (--max-cpu-loras)."
    )
    resolver: bool | None = Field(
        default=None, description="lorawarm's resolver serves adapters on demand there."
    )
    warm_limit: int | None = Field(
        default=None,
        description="How many adapters lorawarm keeps loaded there (null: every one that fits).",
    )
    resident: list[str] | None = Field(
        default=None, description="Adapters in its engine's memory now; null when not known."
    )


class ServerList(BaseModel):
    servers: list[ServerInfo]


class Health(BaseModel):
    status: str
    version: str
    drop_dir: str = Field(
        default="ok", description="ok, or missing while the drop directory cannot be found."
    )
    watch: str = Field(
        default="ok",
        description="ok, or why filesystem events are not watched (e.g. the inotify watch "
        "limit); rescans still run on their timer.",
    )


class SourceInfo(BaseModel):
    url: str = Field(description="The source, as configured (no credentials).")
    condition: str = Field(
        description="ok, or why it is not in sync: unauthorized, not_found, unreachable, "
        "timeout, throttled, server_error, changed, incomplete, checksum_mismatch, "
        "removal_held, local_error, pending (not listed yet)."
    )
    message: str | None
    since: str = Field(description="When the condition began (UTC).")
    last_listing: str | None = Field(description="End of the last successful listing (UTC).")
    last_error: str | None
    listed: int = Field(description="Adapters the last listing found.")
    synced: int = Field(description="Of those, published in the drop directory and current.")
    waiting: int = Field(description="Folders in the source not taken (see skipped).")
    skipped: dict[str, str] = Field(description="Name -> why it is not taken (first 100).")
    conflicts: list[str] = Field(
        description="Names also present as a folder lorawarm did not sync (the local one "
        "wins) or in an earlier source."
    )
    held_removals: int = Field(
        description="Removals held back by the mass-removal guard (0: none)."
    )
    listings: int
    downloads: int
    bytes: int
    removals: int
    failures: int


class SourceList(BaseModel):
    sources: list[SourceInfo]


class SourcesSide(Protocol):
    """What the status API reads of the source sync (a read-only view)."""

    def source_of(self, name: str) -> str | None: ...

    def statuses(self) -> Sequence[Any]: ...


class ServerSide(Protocol):
    """What the status API reads of one server (a reconciler)."""

    @property
    def url(self) -> str: ...

    @property
    def status(self) -> ServerStatus: ...

    @property
    def facts(self) -> ServerFacts | None: ...

    @property
    def effective_warm_limit(self) -> int | None: ...

    @property
    def policy(self) -> FitPolicy: ...

    def outcome(self, record: AdapterRecord) -> ServerAdapter | None: ...


class StatusSource(Protocol):
    """What the status API reads; the daemon provides it. Reading it writes nothing."""

    @property
    def catalog(self) -> Catalog: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def ready(self) -> bool: ...

    @property
    def drop_dir_ok(self) -> bool: ...

    @property
    def watch_problem(self) -> str | None: ...

    @property
    def servers(self) -> Sequence[ServerSide]: ...

    @property
    def collection_held(self) -> Mapping[str, str]: ...


class _NameConvertor(PathConvertor):
    """Starlette's `path`, newlines included: a folder name may hold one (it is reported
    `invalid_name`), and its record must be reachable by name like any other."""

    regex = "(?s:.*)"


register_url_convertor("adapter_name", _NameConvertor())


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _text(value: str) -> str:
    """A file name as JSON can carry it: bytes that are not UTF-8 (kept by Python as lone
    surrogates, which no JSON encoder accepts) are shown as `\\xff` escapes."""
    return os.fsencode(value).decode("utf-8", "backslashreplace")


def _outcomes(record: AdapterRecord, servers: Sequence[ServerSide]) -> list[ServerAdapter]:
    return [o for s in servers if (o := s.outcome(record)) is not None]


def adapter_view(
    record: AdapterRecord, servers: Sequence[ServerSide], source: str | None = None
) -> AdapterView:
    snap = record.snapshot
    outcomes = _outcomes(record, servers)
    message = _text(record.message) if record.message else record.message
    served = snap is not None  # a reason beside a snapshot is about newer content
    state = adapter_state(record, outcomes)
    reason = None if served else record.reason
    if state is AdapterState.INCOMPATIBLE:  # every server said why: the first one's reason
        reason = outcomes[0].reason
        message = "; ".join(
            f"{server.url}: {entry.last_error}" if len(outcomes) > 1 else str(entry.last_error)
            for server, entry in zip(servers, outcomes, strict=True)
        )
    return AdapterView(
        name=_text(record.name),
        state=state,
        reason=reason,
        message=message if not served or state is AdapterState.INCOMPATIBLE else None,
        pending_reason=record.reason if served else None,
        pending_message=message if served else None,
        digest=snap.digest if snap else None,
        source_path=_text(str(record.source_path)),
        snapshot_path=str(snap.path) if snap else None,
        first_seen=_iso(record.first_seen) or "",
        changed_at=_iso(record.changed_at) or "",
        validated_at=_iso(record.validated_at),
        servers=[
            ServerView(
                url=server.url,
                state=entry.state,
                reason=entry.reason,
                warnings=list(entry.warnings),
                resident=entry.resident,
                attempts=entry.attempts,
                condition=entry.condition,
                last_error=entry.last_error,
                loaded_at=_iso(entry.loaded_at),
            )
            for server, entry in zip(servers, outcomes, strict=True)
        ]
        if outcomes
        else [],
        source=source,
    )


def server_info(server: ServerSide, held: str | None) -> ServerInfo:
    """One server's view: its condition and counters, and what was learned of it."""
    s, facts = server.status, server.facts
    learned = facts or ServerFacts()
    return ServerInfo(
        url=s.url,
        condition=s.condition,
        message=s.message,
        healthy=s.healthy,
        since=_iso(s.since) or "",
        last_sync=_iso(s.last_sync),
        loaded=s.loaded,
        loads=s.loads,
        unloads=s.unloads,
        failures=s.failures,
        collection_held=held,
        learned_from=[str(f) for f in learned.learned_from],
        model=learned.model,
        served_model_names=list(learned.served_model_names),
        vllm_version=learned.vllm_version,
        max_lora_rank=server.policy.max_lora_rank or learned.max_lora_rank,
        max_loras=learned.max_loras,
        max_cpu_loras=learned.max_cpu_loras,
        resolver=learned.resolver,
        warm_limit=server.effective_warm_limit,
        resident=None if learned.resident is None else sorted(learned.resident),
    )


def create_app(
    source: StatusSource, *, token: str | None = None, sources: SourcesSide | None = None
) -> FastAPI:
    """The status API over `source`; `sources` is the source sync's view (None: no sources)."""

    def origin(name: str) -> str | None:
        return sources.source_of(name) if sources is not None else None

    app = FastAPI(
        title="lorawarm status",
        version=__version__,
        description="What lorawarm did with every LoRA adapter, per vLLM server, and why.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None if token else "/openapi.json",  # with a token: served below, guarded
    )

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    auth: list[Any] = [Depends(authorize)]
    app.include_router(page_router())  # `GET /`: static, holds no data, so needs no token

    if token is not None:

        @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
        async def openapi() -> JSONResponse:
            """The OpenAPI schema, behind the token like every route but /healthz."""
            return JSONResponse(app.openapi())

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: the daemon's event loop answers."""
        return Health(
            status="ok",
            version=__version__,
            drop_dir="ok" if source.drop_dir_ok else "missing",
            watch=source.watch_problem or "ok",
        )

    @app.get(
        "/readyz",
        response_model=Health,
        dependencies=auth,
        responses={503: {"model": Health, "description": "The first scan is not done yet."}},
    )
    async def readyz() -> Response:
        """Readiness: the first scan of the drop directory is done."""
        drop_dir = "ok" if source.drop_dir_ok else "missing"
        watch = source.watch_problem or "ok"
        if source.ready:
            return JSONResponse(
                Health(
                    status="ready", version=__version__, drop_dir=drop_dir, watch=watch
                ).model_dump()
            )
        return JSONResponse(
            Health(
                status="starting", version=__version__, drop_dir=drop_dir, watch=watch
            ).model_dump(),
            status_code=503,
        )

    @app.get("/v1/adapters", response_model=AdapterList, dependencies=auth)
    async def adapters() -> AdapterList:
        """Every adapter folder lorawarm knows of."""
        views = [adapter_view(r, source.servers, origin(r.name)) for r in source.catalog.by_name()]
        counts: dict[str, int] = {str(s): 0 for s in AdapterState}
        for view in views:
            counts[view.state] += 1
        return AdapterList(adapters=views, counts=counts)

    @app.get(
        "/v1/adapters/{name:adapter_name}",
        response_model=AdapterView,
        dependencies=auth,
        responses={404: {"description": "No adapter of that name."}},
    )
    async def adapter(name: str) -> AdapterView:
        """One adapter; `name` may be `org/name`."""
        record = source.catalog.get(name)
        if record is None:  # a name that is not UTF-8, as the list shows it
            record = next((r for r in source.catalog if _text(r.name) == name), None)
        if record is None:
            raise HTTPException(status_code=404, detail=f"no adapter named {name[:200]!r}")
        return adapter_view(record, source.servers, origin(record.name))

    @app.get("/v1/sources", response_model=SourceList, dependencies=auth)
    async def sources_route() -> SourceList:
        """Every configured object-storage source and its condition."""
        found = sources.statuses() if sources is not None else []
        return SourceList(
            sources=[
                SourceInfo(
                    url=s.url,
                    condition=s.condition,
                    message=s.message,
                    since=_iso(s.since) or "",
                    last_listing=_iso(s.last_listing),
                    last_error=s.last_error,
                    listed=s.listed,
                    synced=s.synced,
                    waiting=s.waiting,
                    skipped=s.skipped,
                    conflicts=s.conflicts,
                    held_removals=s.held_removals,
                    listings=s.listings,
                    downloads=s.downloads,
                    bytes=s.bytes,
                    removals=s.removals,
                    failures=s.failures,
                )
                for s in found
            ]
        )

    @app.get("/v1/servers", response_model=ServerList, dependencies=auth)
    async def servers() -> ServerList:
        """Every configured vLLM server and its condition."""
        held = source.collection_held
        return ServerList(servers=[server_info(s, held.get(s.url)) for s in source.servers])

    @app.get(
        "/metrics",
        dependencies=auth,
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics() -> Response:
        """Prometheus metrics."""
        counts = {str(s): 0 for s in AdapterState}
        for record in source.catalog:
            counts[adapter_state(record, _outcomes(record, source.servers))] += 1
        for state, n in counts.items():
            source.metrics.adapters.labels(state).set(n)
        source.metrics.drop_dir_present.set(1 if source.drop_dir_ok else 0)
        return Response(generate_latest(source.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
