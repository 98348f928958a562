"""`lorawarm status`: the status API as a table for people, or JSON for scripts;
`--watch` redraws it until Ctrl-C."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
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


def _base(settings: Settings, url: str | None) -> str:
    return (url or default_url(settings)).rstrip("/")


def _client(settings: Settings, base: str) -> httpx.Client:
    headers = {}
    if settings.status_token is not None:
        headers["Authorization"] = f"Bearer {settings.status_token.get_secret_value()}"
    return httpx.Client(base_url=base, headers=headers, timeout=10.0)


def _read(client: httpx.Client, *, as_json: bool) -> str:
    """The daemon's view as the text to print; raises what `_problem` words."""
    adapters = _get(client, "/v1/adapters")
    servers = _get(client, "/v1/servers")
    if as_json:
        return json.dumps({"adapters": adapters["adapters"], "servers": servers["servers"]})
    return render(adapters, servers)


def _problem(base: str, err: Exception) -> str:
    if isinstance(err, NotStatusApi):
        return printable(f"lorawarm: {base} {err}")
    return printable(f"lorawarm: cannot read the status API at {base}: {err}")


def show_status(settings: Settings, *, url: str | None, as_json: bool) -> int:
    """Print the daemon's view of every adapter and server; 1 when it cannot be reached."""
    base = _base(settings, url)
    with _client(settings, base) as client:
        try:
            text = _read(client, as_json=as_json)
        except (httpx.HTTPError, ValueError) as err:  # NotStatusApi is a ValueError
            print(_problem(base, err), file=sys.stderr)
            return EXIT_UNREACHABLE
    print(text)
    return EXIT_OK


# Cursor home, clear to the end of the screen: the table is redrawn in place.
_REDRAW = "\x1b[H\x1b[J"


def watch_status(settings: Settings, *, url: str | None, as_json: bool, interval: float) -> int:
    """Redraw the table every `interval` seconds until Ctrl-C (exit 0). A daemon that cannot
    be reached is said on the screen and asked again: it may be restarting. On a terminal the
    screen is redrawn in place; piped (or with `--json`), each view is printed after the last,
    the JSON one line per view."""
    redraw = sys.stdout.isatty() and not as_json
    base = _base(settings, url)
    try:
        with _client(settings, base) as client:
            while True:
                try:
                    body = _read(client, as_json=as_json)
                except (httpx.HTTPError, ValueError) as err:
                    body = _problem(base, err)
                    if as_json:
                        print(body, file=sys.stderr, flush=True)
                        body = ""
                if as_json:
                    if body:
                        print(body, flush=True)
                else:
                    stamp = datetime.now().astimezone().strftime("%H:%M:%S")
                    head = f"lorawarm status {base}  {stamp}  every {interval:g} s"
                    frame = f"{head}, Ctrl-C to stop\n\n{body}\n"
                    print((_REDRAW if redraw else "") + frame, end="", flush=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        if not as_json:
            print(flush=True)
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
