"""The status page in a real headless Chromium, over a real `lorawarm run` warming a real vLLM.

Each test saves a screenshot of what it saw in its temp dir (`pytest --basetemp` to keep them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import AdapterFactory
from tests.support.browser import chromium
from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.support.vllm_server import VllmServer

pytestmark = pytest.mark.e2e

# A folder name that is markup: shown as text, it is harmless; parsed as HTML, it would add an
# image whose error handler retitles the page.
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"
TOKEN = "page-token-0123456789"


@pytest.fixture
def names(request: pytest.FixtureRequest) -> dict[str, str]:
    """Adapter names of this test alone: the shared vLLM keeps every name it loaded, and a
    name loaded by an earlier test's daemon is `name_taken` for this one."""
    tag = request.node.name.removeprefix("test_page_")[:12].rstrip("_")
    return {"good": f"{tag}-good", "broken": f"{tag}-broken", "late": f"{tag}-late"}


@pytest.fixture
def drop(tmp_path: Path, adapters: AdapterFactory, names: dict[str, str]) -> Path:
    """A drop directory with one good adapter, one with truncated weights (invalid on any
    server), one hostile name."""
    drop = tmp_path / "drop"
    drop.mkdir()
    adapters.copy_to(drop / names["good"], seed=1)
    broken = adapters.copy_to(drop / names["broken"], seed=2)
    weights = broken / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    adapters.copy_to(drop / HOSTILE, seed=1)
    return drop


# Read in one script call: the page replaces its tables on every refresh, and elements found
# one call earlier may be gone (stale) by the next.
ROWS = """
const table = [...document.querySelectorAll("table[data-state]")]
  .find((t) => t.dataset.state === arguments[0]);
if (!table) return {};
const heads = [...table.querySelectorAll(":scope > thead th")].map((th) => th.innerText);
const found = {};
for (const tr of table.querySelectorAll(":scope > tbody > tr")) {
  const cells = [...tr.querySelectorAll(":scope > td")].map((td) => td.innerText);
  const row = {};
  heads.forEach((h, i) => { row[h] = cells[i]; });
  found[row.name] = row;
}
return found;
"""


def rows(driver: WebDriver, state: str) -> dict[str, dict[str, str]]:
    """The page's adapter table for `state`: name -> {column: text}."""
    found: dict[str, dict[str, str]] = driver.execute_script(ROWS, state)
    return found


def text_of(driver: WebDriver, element_id: str) -> str:
    text: str = driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
        element_id,
    )
    return text


def wait_rows(driver: WebDriver, state: str, name: str) -> dict[str, str]:
    """Wait (through the page's own refresh) until `name` is listed under `state`."""
    WebDriverWait(driver, 60, poll_frequency=0.5).until(lambda d: name in rows(d, state))
    return rows(driver, state)[name]


@pytest.fixture
def daemon(drop: Path, tmp_path: Path, vllm: VllmServer) -> Iterator[LorawarmProcess]:
    with LorawarmProcess(drop, tmp_path / "state", [vllm.url]) as proc:
        yield proc


def test_page_shows_adapters_reasons_and_servers(
    daemon: LorawarmProcess, vllm: VllmServer, tmp_path: Path, names: dict[str, str]
) -> None:
    """The page lists the loaded adapter with its per-server outcome, the invalid one with its
    reason, the hostile name as plain text (no element made from it), and the server."""
    with chromium() as driver:
        driver.get(f"{daemon.status_url}/")
        good = wait_rows(driver, "loaded", names["good"])
        broken = wait_rows(driver, "invalid", names["broken"])
        hostile = wait_rows(driver, "invalid", HOSTILE)
        driver.save_screenshot(str(tmp_path / "status-page.png"))

        assert vllm.url in good["servers"]
        assert "loaded" in good["servers"]
        assert broken["reason"] == "weights_truncated"
        assert broken["message"]
        assert hostile["reason"] == "invalid_name"
        assert driver.title == "lorawarm status"
        assert driver.find_elements(By.CSS_SELECTOR, "#content img") == []
        servers = text_of(driver, "view-servers")
        assert vllm.url in servers
        assert "ok" in servers
    assert (tmp_path / "status-page.png").stat().st_size > 10_000


def test_page_follows_changes_without_a_reload(
    daemon: LorawarmProcess, adapters: AdapterFactory, tmp_path: Path, names: dict[str, str]
) -> None:
    """An adapter published while the page is open appears on it by itself."""
    with chromium() as driver:
        driver.get(f"{daemon.status_url}/")
        wait_rows(driver, "loaded", names["good"])
        staging = daemon.cache_dir / f".{names['late']}.tmp"
        adapters.copy_to(staging, seed=3)
        staging.rename(daemon.cache_dir / names["late"])
        late = wait_rows(driver, "loaded", names["late"])
        driver.save_screenshot(str(tmp_path / "status-page-late.png"))
    assert late["state"] == "loaded"


def test_page_with_a_token_asks_for_it_and_keeps_it_out_of_urls(
    drop: Path, tmp_path: Path, vllm: VllmServer, names: dict[str, str]
) -> None:
    """With a status token the page asks for it, then shows the adapters; the token appears in
    no URL the browser visited and not in lorawarm's log."""
    env = {"LORAWARM_STATUS_TOKEN": TOKEN}
    daemon = LorawarmProcess(drop, tmp_path / "state", [vllm.url], env=env).start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        wait_for(lambda: daemon.get("/readyz", headers=auth).status_code == 200, what="ready")
        with chromium() as driver:
            see_with_token(daemon, driver, names, tmp_path)
    finally:
        daemon.stop()
    assert TOKEN not in daemon.log_text()


def see_with_token(
    daemon: LorawarmProcess, driver: WebDriver, names: dict[str, str], tmp_path: Path
) -> None:
    """What a person does: open the page, type the token into its form, read the adapters."""
    driver.get(f"{daemon.status_url}/")
    form = driver.find_element(By.ID, "login")
    WebDriverWait(driver, 30).until(lambda d: form.is_displayed())
    assert rows(driver, "loaded") == {}
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    good = wait_rows(driver, "loaded", names["good"])
    driver.save_screenshot(str(tmp_path / "status-page-token.png"))
    assert not form.is_displayed()
    history = driver.execute_script(
        "return performance.getEntries().map((e) => e.name).concat([location.href]);"
    )
    assert good["state"] == "loaded"
    assert history
    assert all(TOKEN not in url for url in history)
