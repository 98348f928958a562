"""The status page's HTTP answer (what the browser test cannot see: headers, no data, the
policy that lets only its own script run) and the drop-directory gauge the alerts read."""

from __future__ import annotations

import base64
import hashlib
import re

import httpx

from lorawarm import __version__
from lorawarm.status import create_app
from tests.unit.test_status_api import TOKEN, make_source


async def get(path: str, *, token: str | None = None, drop_dir_ok: bool = True) -> httpx.Response:
    source = make_source()
    source.drop_dir_ok = drop_dir_ok
    app = create_app(source, token=token)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://status") as client:
        headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
        return await client.get(path, headers=headers if path != "/" else {})


async def test_page_is_static_html_without_any_data() -> None:
    """`GET /` answers HTML naming the version and none of the adapters, servers or paths
    (it reads them itself), even with a token set and none sent."""
    for token in (None, TOKEN):
        response = await get("/", token=token)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert f"lorawarm {__version__}" in response.text
        for secret in ("org/waiting", "chilly", "/srv/adapters", "vllm-1", TOKEN):
            assert secret not in response.text


async def test_page_policy_allows_only_its_own_script_and_origin() -> None:
    """The Content-Security-Policy names the hash of the page's one inline script and style
    (so they run), and allows no other script, no images, no other origin, no form target."""
    response = await get("/")
    csp = response.headers["content-security-policy"]
    scripts = re.findall(r"<script>(.*?)</script>", response.text, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", response.text, re.DOTALL)
    assert len(scripts) == len(styles) == 1
    for kind, body in (("script-src", scripts[0]), ("style-src", styles[0])):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{kind} 'sha256-{digest}'" in csp
    for rule in ("default-src 'none'", "connect-src 'self'", "form-action 'none'"):
        assert rule in csp
    assert "unsafe-inline" not in csp
    assert "http" not in response.text.replace("http-equiv", "")  # no external asset
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


async def test_page_script_never_writes_markup() -> None:
    """The page's script draws names only as text: it never assigns innerHTML/outerHTML or
    calls document.write, so a folder name cannot become markup."""
    text = (await get("/")).text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in text


async def test_drop_dir_gauge_follows_the_drop_directory() -> None:
    """`lorawarm_drop_dir_present` is 1 while the drop directory exists and 0 while it is
    missing (LorawarmDropDirMissing reads it)."""
    present = (await get("/metrics")).text
    missing = (await get("/metrics", drop_dir_ok=False)).text
    assert "\nlorawarm_drop_dir_present 1.0\n" in present
    assert "\nlorawarm_drop_dir_present 0.0\n" in missing
