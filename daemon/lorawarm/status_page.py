"""The status page: `GET /`, one plain HTML page for people, drawn from the status API's JSON.

The page itself holds no data: it is the same static document for everyone, so it needs no
token (like `/healthz`). Its script reads `/v1/adapters`, `/v1/servers` and `/v1/sources` (the
last is optional: a lorawarm without sources answers 404) and draws tables from whatever fields
those views hold, so a field added to a view shows up without a change here. It redraws every
few seconds.

With a status token set the views answer 401; the page then asks for the token in a password
field and sends it as `Authorization: Bearer` on its own requests. The token is kept in the
tab's `sessionStorage` only: never in a URL (the form is never submitted, and `form-action
'none'` forbids it anyway), so it cannot reach a history, a proxy log or a `Referer`.

Every name and message comes from users' folders or from vLLM: the script only ever sets
`textContent`, never markup, and the Content-Security-Policy allows no script but this one
(by hash) and no requests but to this origin, so a hostile folder name is shown as text.
"""

from __future__ import annotations

import base64
import hashlib
import html

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from lorawarm import __version__

REFRESH_SECONDS = 5

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
h3 { font-size: 1em; margin: 1em 0 .3em; }
table { border-collapse: collapse; margin: .2em 0 .6em; }
th, td { border: 1px solid #d0d0d5; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f6; font-weight: 600; white-space: nowrap; }
td table { margin: 0; font-size: .95em; }
td { white-space: pre-wrap; overflow-wrap: break-word; max-width: 36em; }
#meta { color: #666; }
#error { color: #a00; font-weight: 600; }
[data-value="failed"], [data-value="incompatible"], [data-value="invalid"],
[data-value="unreachable"], [data-value="unauthorized"], [data-value="not_found"],
[data-value="engine_dead"], [data-value="rejected"] { color: #a00; font-weight: 600; }
[data-value="loaded"], [data-value="ok"], [data-value="true"] { color: #060; }
[data-value="pending"], [data-value="settling"] { color: #a60; }
form { margin: 1em 0; }
.hidden { display: none; }
"""

_SCRIPT = """
"use strict";
// Columns shown first, in this order; every other field follows in the view's own order.
const REFRESH_MS = @REFRESH_MS@;
const KEY = "lorawarm-status-token";
const FIRST = ["name", "url", "state", "condition", "reason", "message", "pending_reason",
               "pending_message", "servers"];
const ORDER = ["failed", "incompatible", "invalid", "pending", "settling", "loaded", "cold"];
const $ = (id) => document.getElementById(id);
let timer = null;

function text(value) {
  return document.createTextNode(value === null || value === undefined ? "" : String(value));
}

function empty(value) {
  return value === null || value === undefined || value === "" ||
    (Array.isArray(value) && value.length === 0);
}

function columns(rows) {
  // Every field some row has a value for (a column empty in every row only takes room).
  const seen = [];
  for (const row of rows) {
    for (const [key, value] of Object.entries(row)) {
      if (!seen.includes(key) && !empty(value)) seen.push(key);
    }
  }
  const first = FIRST.filter((k) => seen.includes(k));
  return first.concat(seen.filter((k) => !first.includes(k)));
}

function cell(value) {
  if (Array.isArray(value)) {
    if (value.length && value.every((v) => v !== null && typeof v === "object")) {
      return table(value);
    }
    return text(value.join(", "));
  }
  if (value !== null && typeof value === "object") return table([value]);
  return text(value);
}

function table(rows) {
  const t = document.createElement("table");
  const cols = columns(rows);
  const head = t.createTHead().insertRow();
  for (const c of cols) {
    const th = document.createElement("th");
    th.textContent = c;
    head.appendChild(th);
  }
  const body = t.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const c of cols) {
      const td = tr.insertCell();
      td.dataset.key = c;
      const v = row[c];
      if (v !== null && typeof v !== "object") td.dataset.value = String(v);
      td.appendChild(cell(v));
    }
  }
  return t;
}

function section(title, node) {
  const div = document.createElement("div");
  const h = document.createElement("h2");
  h.textContent = title;
  div.appendChild(h);
  div.appendChild(node);
  return div;
}

function adaptersByState(adapters) {
  const div = document.createElement("div");
  const states = [...new Set(adapters.map((a) => String(a.state)))];
  states.sort((a, b) => {
    const i = ORDER.indexOf(a), j = ORDER.indexOf(b);
    return (i < 0 ? ORDER.length : i) - (j < 0 ? ORDER.length : j) || (a < b ? -1 : a > b);
  });
  if (!states.length) div.appendChild(text("no adapters"));
  for (const state of states) {
    const rows = adapters.filter((a) => String(a.state) === state);
    const h = document.createElement("h3");
    h.id = "state-" + encodeURIComponent(state);
    h.textContent = state + " (" + rows.length + ")";
    div.appendChild(h);
    const t = table(rows);
    t.dataset.state = state;
    div.appendChild(t);
  }
  return div;
}

function view(name, doc) {
  // A view is an object of lists (the rows) and other members (counts, totals).
  const div = document.createElement("div");
  div.id = "view-" + name;
  for (const [key, value] of Object.entries(doc)) {
    if (key === "adapters" && Array.isArray(value)) {
      div.appendChild(section("adapters", adaptersByState(value)));
    } else if (Array.isArray(value)) {
      div.appendChild(section(key, value.length ? table(value) : text("none")));
    } else {
      div.appendChild(section(name + ": " + key, cell(value)));
    }
  }
  return div;
}

async function get(path) {
  const token = sessionStorage.getItem(KEY);
  const headers = token ? {"Authorization": "Bearer " + token} : {};
  const response = await fetch(path, {headers: headers, cache: "no-store"});
  if (response.status === 401) throw {unauthorized: true};
  if (response.status === 404) return null;  // a view this lorawarm does not have
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

async function refresh() {
  try {
    const names = ["adapters", "servers", "sources"];
    const docs = await Promise.all(names.map((n) => get("v1/" + n)));
    const content = document.createElement("div");
    content.id = "content";
    names.forEach((n, i) => { if (docs[i] !== null) content.appendChild(view(n, docs[i])); });
    $("content").replaceWith(content);
    $("login").classList.add("hidden");
    $("error").textContent = "";
    $("meta").textContent = "updated " + new Date().toLocaleTimeString() +
      ", refreshed every " + (REFRESH_MS / 1000) + " s";
    document.body.dataset.loaded = "true";
  } catch (err) {
    if (err && err.unauthorized) {
      $("login").classList.remove("hidden");
      $("error").textContent = "this lorawarm needs its status token (LORAWARM_STATUS_TOKEN)";
    } else {
      $("error").textContent = "cannot read the status API: " + err;
    }
  }
  clearTimeout(timer);
  timer = setTimeout(refresh, REFRESH_MS);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();  // never submitted: the token must not end up in a URL
  sessionStorage.setItem(KEY, $("token").value);
  $("token").value = "";
  refresh();
});
refresh();
""".replace("@REFRESH_MS@", str(REFRESH_SECONDS * 1000))


def _digest(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()


# Only this script and this style may run, only this origin may be asked, nothing may frame it.
_CSP = (
    f"default-src 'none'; script-src '{_digest(_SCRIPT)}'; style-src '{_digest(_STYLE)}'; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lorawarm status</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>lorawarm {html.escape(__version__)}</h1>
<div id="meta">loading...</div>
<div id="error"></div>
<form id="login" class="hidden" autocomplete="off">
<label>status token <input id="token" type="password" autocomplete="off"></label>
<button type="submit">show</button>
</form>
<noscript>This page needs JavaScript; <code>lorawarm status</code> prints the same.</noscript>
<div id="content"></div>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def page_router() -> APIRouter:
    """The route of the page; the status API includes it."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse)
    async def status_page() -> HTMLResponse:
        """The status page for people (static: it reads the JSON views itself)."""
        return HTMLResponse(PAGE, headers=_HEADERS)

    return router
