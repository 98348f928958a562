"""`lorawarm status`: the status API as a table for people, or JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx

from lorawarm.settings import Settings
from lorawarm.terminal import printable

EXIT_OK = 0
EXIT_UNREACHABLE = 1


class NotStatusApi(ValueError):
    """Something answered at the URL, but not as lorawarm's status API does."""


def default_url(settings: Settings) -> str:
    host = settings.status_host
    if host in ("0.0.0.0", ""):  # noqa: S104 - mapping a wildcard bind to where to connect
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.status_port}"


def show_status(settings: Settings, *, url: str | None, as_json: bool) -> int:
    """Print the daemon's view of every adapter and server; 1 when it cannot be reached."""
    base = (url or default_url(settings)).rstrip("/")
    headers = {}
    if settings.status_token is not None:
        headers["Authorization"] = f"Bearer {settings.status_token.get_secret_value()}"
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=10.0) as client:
            adapters = _get(client, "/v1/adapters")
            servers = _get(client, "/v1/servers")
    except NotStatusApi as err:
        print(printable(f"lorawarm: {base} {err}"), file=sys.stderr)
        return EXIT_UNREACHABLE
    except (httpx.HTTPError, ValueError) as err:
        print(printable(f"lorawarm: cannot read the status API at {base}: {err}"), file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps({"adapters": adapters["adapters"], "servers": servers["servers"]}))
        return EXIT_OK
    print(render(adapters, servers))
    return EXIT_OK


def _get(client: httpx.Client, path: str) -> dict[str, Any]:
    response = client.get(path)
    if response.status_code == 401:
        raise ValueError("unauthorized: set LORAWARM_STATUS_TOKEN to the daemon's token")
    if not response.is_success:
        # Not raise_for_status(): its message is two lines ending in a link to MDN.
        raise NotStatusApi(
            f"did not answer like a lorawarm status API (HTTP {response.status_code} on {path})"
        )
    body = response.json()
    if not isinstance(body, dict):
        raise ValueError(f"unexpected answer from {path}")
    return body


def render(adapters: dict[str, Any], servers: dict[str, Any]) -> str:
    """A plain-text table: one row per adapter, one column per server.

    Every name, reason and message is passed through `printable`: they come from folder names
    and from vLLM, and a control character in one must not reach the terminal.
    """
    urls = [s["url"] for s in servers["servers"]]
    head = ["ADAPTER", "STATE", "REASON", *[f"SERVER {i + 1}" for i in range(len(urls))]]
    rows = [head]
    for a in adapters["adapters"]:
        per = {s["url"]: s for s in a["servers"]}
        cells = []
        for u in urls:
            s = per.get(u)
            if s is None:
                cells.append("-")
            else:
                cells.append(s["state"] + (f" ({s['condition']})" if s.get("condition") else ""))
        rows.append([printable(c) for c in (a["name"], a["state"], a.get("reason") or "", *cells)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    for i, s in enumerate(servers["servers"]):
        cond = s["condition"] + (f": {s['message']}" if s.get("message") else "")
        lines.append(printable(f"SERVER {i + 1}  {s['url']}  {cond}  loaded={s['loaded']}"))
    problems = [a for a in adapters["adapters"] if a.get("message")]
    if problems:
        lines.append("")
        lines.extend(printable(f"{a['name']}: {a['message']}") for a in problems)
    return "\n".join(lines)
