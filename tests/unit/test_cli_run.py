"""`lorawarm run` before the daemon starts: errors name what the user set, `--help` documents
every option, and a status API open to the network needs a token or an explicit opt-in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorawarm.cli import main
from lorawarm.settings import Settings
from tests.support.daemon_proc import LorawarmProcess, wait_for

UNREACHABLE = "http://127.0.0.1:9"
# Repeatable flags take one value each, so they are named in the singular.
SINGULAR_FLAGS = {
    "--vllm-url": "vllm_urls",
    "--pin": "pinned",
    "--source": "sources",
    "--base-model-alias": "base_model_aliases",
}


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = main(["run", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    assert out == ""
    return code, err


def one_error(err: str) -> str:
    """The one configuration-error line, without its prefix."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lorawarm: configuration error: ")
    return lines[0].removeprefix("lorawarm: configuration error: ")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--vllm-url", "not-a-url"], "--vllm-url (vllm_urls): "),
        (["--pin", "../x"], "--pin (pinned): "),
        (["--base-model-alias", "a", "--max-lora-rank", "0"], "--max-lora-rank (max_lora_rank): "),
        (["--warm-limit", "0"], "--warm-limit (warm_limit): "),
    ],
)
def test_bad_flag_is_named_as_typed(
    capsys: pytest.CaptureFixture[str], cache: Path, argv: list[str], named: str
) -> None:
    """A bad flag value exits 78 with one line naming the flag the user typed (`--vllm-url`,
    not the setting's plural `--vllm-urls`, which does not exist)."""
    code, err = run(capsys, "--cache-dir", cache, *argv)
    assert code == 78
    assert one_error(err).startswith(named)


def test_missing_cache_dir_is_named_by_its_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A `--cache-dir` that does not exist is reported against `--cache-dir`."""
    code, err = run(capsys, "--cache-dir", tmp_path / "nope")
    assert code == 78
    assert one_error(err) == (
        f"--cache-dir (cache_dir): {tmp_path / 'nope'} is not a directory (it does not exist)"
    )


@pytest.mark.parametrize("variable", ["LORAWARM_CACHE_DIR", "VLLM_LORA_RESOLVER_CACHE_DIR"])
def test_missing_cache_dir_is_named_by_its_variable(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variable: str,
) -> None:
    """A cache dir from the environment is reported against the variable that set it."""
    monkeypatch.setenv(variable, str(tmp_path / "nope"))
    code, err = run(capsys)
    assert code == 78
    assert one_error(err).startswith(f"{variable} (cache_dir): {tmp_path / 'nope'} is not a")


def test_cache_dir_that_is_a_file_is_named_by_its_config_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A cache dir from the TOML file that is a plain file is reported against the file's key."""
    plain = tmp_path / "plain"
    plain.write_text("")
    config = tmp_path / "lorawarm.toml"
    config.write_text(f'cache_dir = "{plain}"\n')
    code, err = run(capsys, "--config", config)
    assert code == 78
    assert one_error(err) == f"config file {config}: cache_dir: {plain} is not a directory"


def test_no_cache_dir_says_how_to_set_one(capsys: pytest.CaptureFixture[str]) -> None:
    """Without any cache dir, `lorawarm run` exits 78 naming the flag and both variables."""
    code, err = run(capsys)
    assert code == 78
    line = one_error(err)
    assert line.startswith("LORAWARM_CACHE_DIR (cache_dir): required")
    assert "--cache-dir" in line
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" in line


def test_state_dir_that_cannot_be_created_is_named_by_its_flag(
    capsys: pytest.CaptureFixture[str], cache: Path, tmp_path: Path
) -> None:
    """A `--state-dir` below a plain file is reported against `--state-dir`."""
    plain = tmp_path / "plain"
    plain.write_text("")
    code, err = run(capsys, "--cache-dir", cache, "--state-dir", plain / "state")
    assert code == 78
    assert one_error(err).startswith(f"--state-dir (state_dir): cannot create {plain / 'state'}")


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """`lorawarm run --help` gives every option its meaning, default and environment variable,
    from the same description as the README's settings table."""
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    # One block per option: its first line starts with two spaces and a dash.
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    documented = {}
    for block in blocks:
        flag = block.split()[0].rstrip(",")
        documented[flag] = " ".join(block.split())
    flags = set(documented) - {"-h", "--config"}
    assert {"--settle-seconds", "--resync-seconds", "--warm-limit", "--status-host"} <= flags
    assert {"--status-port", "--log-format", "--log-level", "--vllm-url", "--pin"} <= flags
    for flag in flags:
        field = SINGULAR_FLAGS.get(flag, flag.removeprefix("--").replace("-", "_"))
        description = Settings.model_fields[field].description
        assert description is not None
        first_words = " ".join(description.split()[:4])
        assert first_words in documented[flag], flag
        assert "Default: " in documented[flag], flag
        assert f"Environment: LORAWARM_{field.upper()}" in documented[flag], flag


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "status.example.com", ""])
def test_public_status_api_without_token_refuses_to_start(
    capsys: pytest.CaptureFixture[str], cache: Path, host: str
) -> None:
    """A status API bound to a non-loopback address without a token exits 78 with one line
    naming status_host, the token and the opt-in."""
    code, err = run(capsys, "--cache-dir", cache, "--status-host", host)
    assert code == 78
    line = one_error(err)
    assert line.startswith(f"--status-host (status_host): {host!r} is not a loopback address")
    assert "LORAWARM_STATUS_TOKEN" in line
    assert "LORAWARM_STATUS_ALLOW_PUBLIC=true" in line


def test_public_status_host_from_environment_is_named_by_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    """The refusal names LORAWARM_STATUS_HOST when the address came from the environment."""
    monkeypatch.setenv("LORAWARM_STATUS_HOST", "0.0.0.0")
    code, err = run(capsys, "--cache-dir", cache)
    assert code == 78
    assert one_error(err).startswith("LORAWARM_STATUS_HOST (status_host): '0.0.0.0'")


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"LORAWARM_STATUS_TOKEN": "t0ken"}, id="token"),
        pytest.param({"LORAWARM_STATUS_ALLOW_PUBLIC": "true"}, id="opt-in"),
    ],
)
def test_public_status_api_starts_with_a_token_or_the_opt_in(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """With a token, or LORAWARM_STATUS_ALLOW_PUBLIC=true, the real `lorawarm run` serves the
    status API on all interfaces."""
    env = {"LORAWARM_STATUS_HOST": "0.0.0.0", **env}
    proc = LorawarmProcess(tmp_path / "drop", tmp_path / "state", [UNREACHABLE], env=env).start()
    try:
        # /healthz is the one route that needs no token.
        wait_for(lambda: proc.get("/healthz").status_code == 200, what="/healthz", timeout=30)
        assert proc.stop() == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.5.6.7", "::1", "[::1]", "localhost"])
def test_loopback_status_hosts_need_no_token(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, host: str
) -> None:
    """Loopback addresses pass the check: the run goes on to the next problem (here a state dir
    that cannot be created), not to a refusal of the status host."""
    plain = tmp_path / "plain"
    plain.write_text("")
    cache = tmp_path / "drop"
    cache.mkdir()
    argv = ["--cache-dir", cache, "--state-dir", plain / "s", "--status-host", host]
    code, err = run(capsys, *argv)
    assert code == 78
    assert one_error(err).startswith("--state-dir (state_dir): cannot create")
