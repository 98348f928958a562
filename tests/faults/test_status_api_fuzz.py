"""The status API under fuzzing and attack: schemathesis drives every operation of its own
OpenAPI schema (no 5xx, every answer matches the schema), a token locks every route but
/healthz, and the real process listens on loopback only."""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from lorawarm.catalog import AdapterRecord, Catalog, ServerAdapter, ServerState
from lorawarm.fit import FitPolicy
from lorawarm.inspection import Reason
from lorawarm.metrics import Metrics
from lorawarm.reconcile import ServerStatus
from lorawarm.server_facts import ServerFacts
from lorawarm.settings import Settings, load
from lorawarm.snapshot import Snapshot, SnapshotReason
from lorawarm.status import create_app
from lorawarm.vllm_client import Condition
from tests.support.daemon_proc import LorawarmProcess

S1, S2 = "http://vllm-1:8000", "http://vllm-2:8000"
DIGEST = "0123456789abcdef0123456789abcdef"
TOKEN = "fuzz-token-0123"
T0 = 1_790_000_000.0


@dataclass
class Server:
    """One server as the status API reads it: its status and each adapter's outcome there."""

    status: ServerStatus
    outcomes: dict[str, ServerAdapter] = field(default_factory=dict)
    facts: ServerFacts | None = None
    effective_warm_limit: int | None = None
    policy: FitPolicy = field(default_factory=FitPolicy)

    @property
    def url(self) -> str:
        return self.status.url

    def outcome(self, record: AdapterRecord) -> ServerAdapter | None:
        if record.snapshot is None:
            return None
        return self.outcomes.get(record.name, ServerAdapter())


@dataclass
class Source:
    """A StatusSource with the daemon's real catalog and metrics, and two servers."""

    catalog: Catalog
    metrics: Metrics = field(default_factory=Metrics)
    is_ready: bool = True
    drop_dir_ok: bool = True
    watch_problem: str | None = None
    servers: list[Server] = field(default_factory=list)
    collection_held: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.is_ready


def record(name: str, **kwargs: object) -> AdapterRecord:
    rec = AdapterRecord(name=name, source_path=Path("/srv/adapters") / name, first_seen=T0)
    rec.settling = False
    rec.validated_at = T0 + 1
    for key, value in kwargs.items():
        setattr(rec, key, value)
    return rec


def snap(name: str) -> Snapshot:
    return Snapshot(name, DIGEST, Path(f"/var/lib/lorawarm/snapshots/{name}/{DIGEST}"))


def populated(*, ready: bool = True) -> Source:
    """Adapters in every state, hostile names among them, and two servers."""
    cat = Catalog(pinned=["loaded"])
    loaded = ServerAdapter(ServerState.LOADED, attempts=1, loaded_at=T0 + 2)
    failed = ServerAdapter(
        ServerState.FAILED, 3, "Call to add_lora method failed", Condition.REJECTED
    )
    cold = ServerAdapter(ServerState.COLD)
    cat.add(record("loaded", snapshot=snap("loaded")))
    cat.add(record("org/pending", snapshot=snap("org/pending")))
    cat.add(record("copying", settling=True, validated_at=None))
    cat.add(record("bad", reason=Reason.RANK_TOO_LARGE, message="rank 64 is above 16"))
    cat.add(
        record(
            "full",
            validated_at=None,
            reason=SnapshotReason.SNAPSHOT_FAILED,
            message="No space left",
        )
    )
    cat.add(record("broken", snapshot=snap("broken")))
    cat.add(record("chilly", snapshot=snap("chilly")))
    cat.add(
        record(
            "stale",
            snapshot=snap("stale"),
            reason=Reason.WEIGHTS_TRUNCATED,
            message="the copy stalled",
        )
    )
    for hostile in ("new\nline", "\u0455upport", os.fsdecode(b"bad-\xff-utf8"), "x" * 255):
        cat.add(record(hostile, reason=Reason.INVALID_NAME, message=f"{hostile!a} is no name"))
    first = Server(
        ServerStatus(
            url=S1, condition=Condition.OK, healthy=True, since=T0, last_sync=T0 + 9, loaded=2
        ),
        {"loaded": loaded, "broken": failed, "chilly": cold, "stale": loaded},
    )
    second = Server(
        ServerStatus(
            url=S2, condition=Condition.UNREACHABLE, message="Connection refused", since=T0
        ),
        {"loaded": loaded, "broken": loaded, "chilly": cold},
    )
    return Source(
        catalog=cat,
        is_ready=ready,
        servers=[first, second],
        watch_problem=None,
        collection_held={S2: "never listed"},
    )


FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(populated()))
starting = schemathesis.openapi.from_asgi("/openapi.json", create_app(populated(ready=False)))
# Behind a token the schema itself needs it too.
locked = schemathesis.openapi.from_asgi(
    "/openapi.json",
    create_app(populated(), token=TOKEN),
    headers={"Authorization": f"Bearer {TOKEN}"},
)


@schema.parametrize()
@FUZZ
def test_fuzz_every_operation(case: schemathesis.Case) -> None:
    """Every operation, fuzzed from the schema over a populated catalog, answers without a 5xx
    and as its schema says (status, content type, headers, body)."""
    case.call_and_validate()


@starting.parametrize()
@FUZZ
def test_fuzz_while_starting(case: schemathesis.Case) -> None:
    """Before the first scan every answer still matches the schema; /readyz's documented 503
    is the only 5xx."""
    response = case.call_and_validate(excluded_checks=[not_a_server_error])
    assert response.status_code < 500 or (case.path, response.status_code) == ("/readyz", 503)


# Open with a token set: the liveness probe, and the status page (static: it holds no data).
OPEN = {"/healthz", "/"}


@locked.parametrize()
@FUZZ
def test_fuzz_with_a_token(case: schemathesis.Case) -> None:
    """With a token, fuzzed requests carrying it answer as the schema says, and without it
    never leak anything but a 401 (or /healthz and the static status page)."""
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})
    wrong = case.call(headers={"Authorization": "Bearer wrong"})
    if case.method.upper() != "GET":  # routing answers before auth: 405, and nothing more
        assert wrong.status_code == 405
        assert wrong.json() == {"detail": "Method Not Allowed"}
    else:
        assert wrong.status_code == (200 if case.path in OPEN else 401)


def test_every_known_adapter_by_name_matches_the_schema() -> None:
    """Each adapter of the populated catalog, hostile names included (newline, look-alike,
    not UTF-8, 255 characters), answers 200 on its own route with a body the schema accepts."""
    operation = schema["/v1/adapters/{name}"]["GET"]
    source = populated()
    for record in source.catalog:
        shown = os.fsencode(record.name).decode("utf-8", "backslashreplace")
        case = operation.Case(path_parameters={"name": urllib.parse.quote(shown, safe="/")})
        response = case.call_and_validate()
        assert response.status_code == 200, (record.name, response.text)
        assert response.json()["name"] == shown


# --- the token -----------------------------------------------------------------------------------


def concrete(path: str) -> str:
    return path.replace("{name}", "loaded")


async def test_token_guards_every_route_but_healthz() -> None:
    """With a token set, every route of the app (the schema too) but /healthz and the static
    status page answers 401 without it, with a wrong one, or with a near miss; with it, each
    answers normally."""
    app = create_app(populated(), token=TOKEN)
    paths = sorted(str(getattr(route, "path_format", "")) for route in app.routes)
    assert set(app.openapi()["paths"]) | {"/openapi.json"} == set(paths)
    refused = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": TOKEN},
        {"Authorization": f"bearer{TOKEN}"},
        {"Authorization": f"Bearer {TOKEN} "},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
    ]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://status") as client:
        for path in paths:
            for headers in refused:
                response = await client.get(concrete(path), headers=headers)
                expected = 200 if path in OPEN else 401
                assert response.status_code == expected, (path, headers, response.text)
                if expected == 401:
                    assert response.headers["www-authenticate"] == "Bearer"
                    assert "loaded" not in response.text
            ok = await client.get(concrete(path), headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200, (path, ok.text)


# --- the bind address ----------------------------------------------------------------------------


def test_default_bind_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The status_host default, in the model and as loaded from an empty environment, is
    127.0.0.1."""
    for key in list(os.environ):
        if key.startswith(("LORAWARM_", "VLLM_")) or key == "STATE_DIRECTORY":
            monkeypatch.delenv(key)
    assert Settings.model_fields["status_host"].default == "127.0.0.1"
    assert load().status_host == "127.0.0.1"


def listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* shows them) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def local_addresses() -> set[str]:
    """This machine's own IPv4 addresses (from the kernel's local routing table)."""
    lines = Path("/proc/net/fib_trie").read_text().splitlines()
    return {
        lines[i - 1].split()[-1]
        for i, line in enumerate(lines)
        if "/32 host LOCAL" in line and i > 0
    }


def test_real_process_listens_on_loopback_only(tmp_path: Path) -> None:
    """`lorawarm run` with default settings listens on 127.0.0.1 only: /proc/net shows one
    loopback listener on its port, and every other local address refuses the connection."""
    drop = tmp_path / "drop"
    with LorawarmProcess(
        drop, tmp_path / "state", ["http://127.0.0.1:9"], log_path=tmp_path / "lorawarm.log"
    ) as proc:
        assert "LORAWARM_STATUS_HOST" not in proc.environment()
        assert listeners(proc.port) == ["0100007F"]  # 127.0.0.1, little-endian hex
        others = sorted(a for a in local_addresses() if not a.startswith("127."))
        for address in others:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, proc.port), timeout=2).close()
        assert proc.get("/healthz").status_code == 200
    print(f"\nstatus API on 127.0.0.1:{proc.port}; refused on {others or 'no other address'}")
