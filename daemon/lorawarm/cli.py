"""The `lorawarm` command: `run` (the daemon), `validate` (for CI pipelines), `status`.

Exit codes: 0 fine, 1 something is invalid / unreachable, 2 usage error, 78 bad configuration.
Secrets (the vLLM API key, the status token) are read from the environment or the TOML file
only, never from flags: a flag shows up in `ps` for every user of the machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorawarm import __version__
from lorawarm.inspection import Context, Invalid, Valid, inspect_adapter
from lorawarm.settings import EX_CONFIG, ConfigError, Settings, field_help, load
from lorawarm.terminal import printable

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorawarm",
        description="Validate LoRA adapters and pre-warm them into vLLM servers.",
    )
    parser.add_argument("--version", action="version", version=f"lorawarm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="watch the adapter directory and warm vLLM servers")
    run.add_argument("--config", type=Path, help="TOML settings file (or LORAWARM_CONFIG)")
    _setting(run, "--cache-dir", "cache_dir", type=Path)
    _setting(run, "--state-dir", "state_dir", type=Path)
    _setting(run, "--vllm-url", "vllm_urls", action="append", repeatable=True)
    _add_rule_flags(run)
    _setting(run, "--settle-seconds", "settle_seconds", type=float)
    _setting(run, "--resync-seconds", "resync_seconds", type=float)
    _setting(run, "--warm-limit", "warm_limit", type=int)
    _setting(run, "--pin", "pinned", action="append", repeatable=True)
    _setting(run, "--polling", "polling", action=argparse.BooleanOptionalAction, default=None)
    _setting(run, "--source", "sources", action="append", repeatable=True)
    _setting(run, "--source-poll-seconds", "source_poll_seconds", type=float)
    _setting(run, "--status-host", "status_host")
    _setting(run, "--status-port", "status_port", type=int)
    _setting(run, "--log-format", "log_format", choices=["auto", "json", "console"])
    _setting(run, "--log-level", "log_level", choices=["debug", "info", "warning", "error"])

    val = sub.add_parser(
        "validate",
        help="check adapter folders as the daemon would (exit 0 when all are valid)",
    )
    val.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="adapter folders")
    val.add_argument("--json", action="store_true", help="print one JSON object per folder")
    val.add_argument("--config", type=Path, help="TOML settings file (or LORAWARM_CONFIG)")
    _add_rule_flags(val)

    status = sub.add_parser("status", help="show what the running daemon did, per adapter")
    status.add_argument("--url", help="status API base URL (default: from the settings)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument(
        "--watch", action="store_true", help="redraw the table every --interval until Ctrl-C"
    )
    status.add_argument(
        "--interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="seconds between redraws with --watch (default: %(default)s)",
    )
    status.add_argument("--config", type=Path, help="TOML settings file (or LORAWARM_CONFIG)")
    return parser


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse turns the ValueError into a usage error)."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
    _setting(parser, "--max-lora-rank", "max_lora_rank", type=int)
    _setting(parser, "--base-model", "base_model")
    _setting(parser, "--base-model-alias", "base_model_aliases", action="append", repeatable=True)
    _setting(parser, "--max-adapter-bytes", "max_adapter_bytes", type=int)
    _setting(
        parser,
        "--safetensors-only",
        "safetensors_only",
        action=argparse.BooleanOptionalAction,
        default=None,
    )


def _setting(
    parser: argparse.ArgumentParser, flag: str, field: str, *, repeatable: bool = False, **kw: Any
) -> None:
    """A flag for setting `field`, its help generated from the field's description (so that
    `--help`, the README table and the code cannot disagree); the parser remembers which flag
    sets which field, so that an error names the flag the user typed."""
    text = field_help(field)
    if repeatable:  # the flag takes one value per use; commas are for the environment and file
        text = text.replace(" (comma-separated)", "") + " Repeat the flag for several."
    if kw.get("action") is not argparse.BooleanOptionalAction and "choices" not in kw:
        kw["metavar"] = flag.removeprefix("--").upper().replace("-", "_")
    parser.add_argument(flag, dest=field, help=text.replace("%", "%%"), **kw)
    flags = parser.get_default("flag_names") or {}
    parser.set_defaults(flag_names={**flags, field: flag})


_NOT_SETTINGS = {"command", "config", "paths", "json", "url", "watch", "interval", "flag_names"}


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    return load(args.config, flags=getattr(args, "flag_names", None), **overrides)


def _run_problem(settings: Settings) -> str | None:
    """What stops `lorawarm run` from starting with these settings, as one line naming the
    setting the way the user gave it (flag, environment variable or config file key)."""
    public = not _is_loopback(settings.status_host)
    if public and settings.status_token is None and not settings.status_allow_public:
        return (
            f"{settings.origin('status_host')}: {settings.status_host!r} is not a loopback "
            "address and no status token is set, so anyone who can reach it could read "
            "every adapter and server: set LORAWARM_STATUS_TOKEN, or "
            "LORAWARM_STATUS_ALLOW_PUBLIC=true to serve it without one"
        )
    if settings.cache_dir is None:
        return (
            f"{settings.origin('cache_dir')}: required: the directory adapters are dropped "
            "into (--cache-dir, LORAWARM_CACHE_DIR or VLLM_LORA_RESOLVER_CACHE_DIR)"
        )
    if not settings.cache_dir.is_dir():
        missing = "" if settings.cache_dir.exists() else " (it does not exist)"
        return f"{settings.origin('cache_dir')}: {settings.cache_dir} is not a directory{missing}"
    try:
        (settings.state_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"{settings.origin('state_dir')}: cannot create {settings.state_dir}: {err.strerror}"
    return None


def _is_loopback(host: str) -> bool:
    """Whether binding `host` exposes the status API to this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # another host name: it may resolve to any address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors (2), --help and --version (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        settings = _settings(args)
    except ConfigError as err:
        print(f"lorawarm: configuration error: {err}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "validate":
        return _validate(args.paths, settings, as_json=args.json)
    if args.command == "status":
        from lorawarm.status_cli import show_status, watch_status

        if args.watch:
            return watch_status(settings, url=args.url, as_json=args.json, interval=args.interval)
        return show_status(settings, url=args.url, as_json=args.json)
    problem = _run_problem(settings)
    if problem is not None:
        print(printable(f"lorawarm: configuration error: {problem}"), file=sys.stderr)
        return EX_CONFIG
    from lorawarm.daemon import run_daemon

    return run_daemon(settings)


def _validate(paths: list[Path], settings: Settings, *, as_json: bool) -> int:
    rules = settings.rules()
    worst = EXIT_OK
    for path in paths:
        absolute = path.absolute()
        result = inspect_adapter(
            absolute,
            root=absolute.parent,
            rules=rules,
            name=absolute.name,
            context=Context.COMMAND,
        )
        print(_render(path, result, as_json=as_json), flush=True)
        if isinstance(result, Invalid):
            worst = EXIT_INVALID
    return worst


def _render(path: Path, result: Valid | Invalid, *, as_json: bool) -> str:
    if as_json:
        doc: dict[str, Any] = {"path": str(path), "name": result.name, "valid": result.ok}
        if isinstance(result, Valid):
            doc.update(rank=result.rank, weights=result.weights, base_model=result.base_model)
        else:
            doc.update(reason=str(result.reason), message=result.message)
        return json.dumps(doc)
    if isinstance(result, Valid):
        return f"{path}: valid (rank {result.rank}, {result.weights})"
    return f"{path}: invalid: {result.reason}: {result.message}"


if __name__ == "__main__":  # pragma: no cover - `python -m lorawarm.cli` convenience
    sys.exit(main())
