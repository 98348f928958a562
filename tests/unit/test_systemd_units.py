"""The systemd units are valid units and carry the settings a reviewer expects."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def _verify(unit: Path, tmp_path: Path, exec_path: str, replacement: str) -> None:
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(exec_path, replacement))
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: `make test` installs systemd"
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    # verify exits 0 on some warnings; an unknown directive or a bad value must not pass silently
    noisy = [line for line in result.stderr.splitlines() if copy.name in line]
    assert noisy == []


def _values(unit: Path, key: str) -> list[str]:
    prefix = f"{key}="
    return [
        line[len(prefix) :] for line in unit.read_text().splitlines() if line.startswith(prefix)
    ]


def test_lorawarm_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts lorawarm.service (ExecStart at the installed script)."""
    lorawarm = Path(sys.executable).with_name("lorawarm")
    _verify(SYSTEMD / "lorawarm.service", tmp_path, "/usr/local/bin/lorawarm", str(lorawarm))


def test_vllm_example_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the example vllm.service."""
    _verify(SYSTEMD / "vllm.service", tmp_path, "/opt/vllm/bin/vllm", shutil.which("true") or "")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "78"),
        ("StateDirectory", "lorawarm"),
        ("EnvironmentFile", "-/etc/lorawarm/lorawarm.env"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallFilter", "@system-service"),
    ],
)
def test_lorawarm_unit_settings(key: str, value: str) -> None:
    """lorawarm.service runs as a notify service, hardened, restarted on failure but not on 78."""
    unit = (SYSTEMD / "lorawarm.service").read_text().splitlines()
    assert f"{key}={value}" in unit


def test_lorawarm_unit_order_and_watchdog() -> None:
    """lorawarm starts after vLLM and has a watchdog."""
    unit = SYSTEMD / "lorawarm.service"
    assert "vllm.service" in _values(unit, "After")[0].split()
    assert int(_values(unit, "WatchdogSec")[0]) > 0


def test_vllm_env_example_enables_what_lorawarm_needs() -> None:
    """The vLLM env example turns on runtime LoRA updating and the lorawarm plugin."""
    env = (SYSTEMD / "vllm.env").read_text().splitlines()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true" in env
    assert "VLLM_PLUGINS=lorawarm" in env
    assert any(line.startswith("VLLM_LORA_RESOLVER_CACHE_DIR=") for line in env)
    assert "--enable-lora" in (SYSTEMD / "vllm.service").read_text()
