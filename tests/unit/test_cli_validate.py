"""`lorawarm validate`: one line per folder, exit codes a CI pipeline can act on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorawarm import __version__
from lorawarm.cli import main
from tests.unit.adapters import BASE_MODEL, BIN, SAFETENSORS, torch_zip_bytes, write_adapter

FALLBACKS = ("VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_API_KEY", "STATE_DIRECTORY", "XDG_STATE_HOME")


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "adapters" / "good")


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "adapters" / "broken", config={"bias": "all"})


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, list[str], str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_valid_folder_exits_0(capsys: pytest.CaptureFixture[str], good: Path) -> None:
    """A valid adapter prints one `valid` line with its rank and weights file, exit 0."""
    code, lines, err = run(capsys, "validate", good)
    assert code == 0
    assert lines == [f"{good}: valid (rank 8, {SAFETENSORS})"]
    assert err == ""


def test_invalid_folder_exits_1(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    """An invalid adapter prints its reason code and message on one line, exit 1."""
    code, lines, _ = run(capsys, "validate", broken)
    assert code == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"{broken}: invalid: bias_not_supported: bias is 'all'")


def test_one_line_per_folder_in_order(
    capsys: pytest.CaptureFixture[str], good: Path, broken: Path, tmp_path: Path
) -> None:
    """Several folders give one line each, in argument order; one bad folder makes it exit 1."""
    missing = tmp_path / "adapters" / "missing"
    code, lines, _ = run(capsys, "validate", good, broken, missing, good)
    assert code == 1
    assert [line.split(": ")[0] for line in lines] == [
        str(p) for p in (good, broken, missing, good)
    ]
    assert "invalid: not_a_directory" in lines[2]


def test_json_output(capsys: pytest.CaptureFixture[str], good: Path, broken: Path) -> None:
    """`--json` prints one parseable JSON object per folder with the reason code."""
    code, lines, _ = run(capsys, "validate", "--json", good, broken)
    assert code == 1
    docs = [json.loads(line) for line in lines]
    assert docs[0] == {
        "path": str(good),
        "name": "good",
        "valid": True,
        "rank": 8,
        "weights": SAFETENSORS,
        "base_model": BASE_MODEL,
    }
    assert docs[1]["valid"] is False
    assert docs[1]["reason"] == "bias_not_supported"
    assert docs[1]["name"] == "broken"
    assert "bias" in docs[1]["message"]


def test_max_lora_rank_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--max-lora-rank` sets the largest accepted rank; without it the rank is not checked
    (it is each server's --max-lora-rank, which validate does not know)."""
    r32 = write_adapter(tmp_path / "r32", r=32)
    assert run(capsys, "validate", r32)[1] == [f"{r32}: valid (rank 32, adapter_model.safetensors)"]
    assert run(capsys, "validate", "--max-lora-rank", "32", r32)[0] == 0
    code, lines, _ = run(capsys, "validate", "--max-lora-rank", "4", r32)
    assert code == 1
    assert "rank 32 is above the max LoRA rank 4; pass a larger --max-lora-rank" in lines[0]
    assert "LORAWARM_" not in lines[0]
    assert "server" not in lines[0]


def test_messages_speak_of_the_command_not_of_a_copy(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An empty folder is reported as missing its config, without the daemon's "may still be
    copying" (nothing is being copied into a folder named on the command line)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code, lines, _ = run(capsys, "validate", empty)
    assert code == 1
    assert lines == [f"{empty}: invalid: missing_config: adapter_config.json is missing"]


def test_drop_directory_itself_is_named_a_directory_of_adapters(
    capsys: pytest.CaptureFixture[str], good: Path, broken: Path
) -> None:
    """`validate` on the directory holding adapters says it is a directory of adapters, not
    an adapter, and suggests passing the folders inside (the reason code stays the same)."""
    code, lines, _ = run(capsys, "validate", good.parent)
    assert code == 1
    [line] = lines
    assert line.startswith(f"{good.parent}: invalid: missing_config: ")
    assert "looks like a directory of adapters (broken, good), not an adapter" in line
    assert f"pass the adapter folders inside it instead, such as {broken}" in line
    assert "copying" not in line


def test_max_adapter_bytes_flag(capsys: pytest.CaptureFixture[str], good: Path) -> None:
    """`--max-adapter-bytes` refuses a larger adapter as `too_large`, naming its size, the limit
    and the flag that raises it."""
    size = sum(f.stat().st_size for f in good.iterdir())
    code, lines, _ = run(capsys, "validate", "--max-adapter-bytes", str(size - 1), good)
    assert code == 1
    assert lines[0].startswith(f"{good}: invalid: too_large: ")
    assert f"are {size} bytes" in lines[0]
    assert f"at most {size - 1} bytes" in lines[0]
    assert "raise --max-adapter-bytes" in lines[0]
    assert run(capsys, "validate", "--max-adapter-bytes", str(size), good)[0] == 0


def test_safetensors_only_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Pickled `.bin` weights are refused by default with the flag that accepts them, and
    `--no-safetensors-only` checks their container instead."""
    pickled = write_adapter(tmp_path / "pickled", weights=BIN, weights_bytes=torch_zip_bytes())
    code, lines, _ = run(capsys, "validate", pickled)
    assert code == 1
    assert lines[0].startswith(f"{pickled}: invalid: pickle_not_allowed: ")
    assert "pass --no-safetensors-only" in lines[0]
    assert run(capsys, "validate", "--no-safetensors-only", pickled)[0] == 0
    assert run(capsys, "validate", "--safetensors-only", pickled)[0] == 1


def test_max_lora_rank_from_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """LORAWARM_MAX_LORA_RANK applies to validate too, and the flag beats it."""
    r32 = write_adapter(tmp_path / "r32", r=32)
    monkeypatch.setenv("LORAWARM_MAX_LORA_RANK", "32")
    assert run(capsys, "validate", r32)[0] == 0
    assert run(capsys, "validate", "--max-lora-rank", "16", r32)[0] == 1


def test_base_model_flags(capsys: pytest.CaptureFixture[str], good: Path) -> None:
    """`--base-model` requires a match; `--base-model-alias` (repeatable) accepts other names."""
    assert run(capsys, "validate", "--base-model", BASE_MODEL, good)[0] == 0
    code, lines, _ = run(capsys, "validate", "--base-model", "/models/llama", good)
    assert code == 1
    assert "invalid: base_model_mismatch" in lines[0]
    argv = ["--base-model", "/models/llama", "--base-model-alias", "x"]
    assert run(capsys, "validate", *argv, "--base-model-alias", BASE_MODEL, good)[0] == 0


def test_config_file_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--config` reads the rules from the daemon's TOML file."""
    r32 = write_adapter(tmp_path / "r32", r=32)
    config = tmp_path / "lorawarm.toml"
    config.write_text("max_lora_rank = 32\n")
    assert run(capsys, "validate", "--config", config, r32)[0] == 0


def test_relative_paths(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, good: Path
) -> None:
    """Relative paths, `.` and a trailing slash work and are printed as given."""
    monkeypatch.chdir(good.parent)
    code, lines, _ = run(capsys, "validate", "good/", "./good")
    assert code == 0
    assert lines == [f"good: valid (rank 8, {SAFETENSORS})"] * 2
    monkeypatch.chdir(good)
    assert run(capsys, "validate", "--json", ".")[1] == [
        json.dumps(
            {
                "path": ".",
                "name": "good",
                "valid": True,
                "rank": 8,
                "weights": SAFETENSORS,
                "base_model": BASE_MODEL,
            }
        )
    ]


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-command"),
        pytest.param(["validate"], id="no-path"),
        pytest.param(["validate", "--max-lora-rank", "many", "x"], id="rank-not-int"),
        pytest.param(["validate", "--frobnicate", "x"], id="unknown-flag"),
        pytest.param(["explode"], id="unknown-command"),
        pytest.param(["validate", "--vllm-api-key", "k", "x"], id="no-secret-flags"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """Usage errors exit 2 with argparse's message on stderr and nothing on stdout."""
    code, lines, err = run(capsys, *argv)
    assert code == 2
    assert lines == []
    assert "usage: lorawarm" in err


def test_version_and_help_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` and `validate --help` exit 0."""
    assert run(capsys, "--version") == (0, [f"lorawarm {__version__}"], "")
    code, lines, _ = run(capsys, "validate", "--help")
    assert code == 0
    assert any("--max-lora-rank" in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        pytest.param(["--max-lora-rank", "0"], {}, "--max-lora-rank (max_lora_rank)", id="flag"),
        pytest.param(
            [], {"LORAWARM_MAX_LORA_RANK": "x"}, "LORAWARM_MAX_LORA_RANK (max_lora_rank)", id="env"
        ),
        pytest.param(["--config", "/nonexistent.toml"], {}, "No such file", id="config-file"),
    ],
)
def test_configuration_errors_exit_78(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    good: Path,
    argv: list[str],
    env: dict[str, str],
    words: str,
) -> None:
    """A bad setting exits 78 (EX_CONFIG) with one line on stderr naming the setting."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, lines, err = run(capsys, "validate", *argv, good)
    assert code == 78
    assert lines == []
    assert err.startswith("lorawarm: configuration error: ")
    assert words in err
    assert err.count("\n") == 1


def test_console_script(tmp_path: Path, good: Path, broken: Path) -> None:
    """The installed `lorawarm` console script validates and exits with the same codes."""
    script = shutil.which("lorawarm", path=str(Path(sys.executable).parent))
    assert script is not None
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("LORAWARM_") and k not in FALLBACKS
    }
    env["HOME"] = str(tmp_path / "home")
    ok = subprocess.run(
        [script, "validate", "--json", str(good)], env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["valid"] is True
    bad = subprocess.run(
        [script, "validate", str(good), str(broken)], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert len(bad.stdout.splitlines()) == 2
    assert "bias_not_supported" in bad.stdout
