"""The `lorawarm` command: `run` (the daemon), `validate` (for CI pipelines), `status`.

Exit codes: 0 fine, 1 something is invalid / unreachable, 2 usage error, 78 bad configuration.
Secrets (the vLLM API key, the status token) are read from the environment or the TOML file
only, never from flags: a flag shows up in `ps` for every user of the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorawarm import __version__
from lorawarm.inspection import Context, Invalid, Valid, inspect_adapter
from lorawarm.settings import EX_CONFIG, ConfigError, Settings, load

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
    run.add_argument("--cache-dir", type=Path, help="the adapter drop directory")
    run.add_argument("--state-dir", type=Path, help="where snapshots are kept")
    run.add_argument(
        "--vllm-url", dest="vllm_urls", action="append", help="a vLLM base URL (repeatable)"
    )
    _add_rule_flags(run)
    run.add_argument("--settle-seconds", type=float)
    run.add_argument("--resync-seconds", type=float)
    run.add_argument("--warm-limit", type=int)
    run.add_argument("--pin", dest="pinned", action="append", help="a pinned adapter (repeatable)")
    run.add_argument(
        "--polling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="use the polling observer (network filesystems)",
    )
    run.add_argument("--status-host")
    run.add_argument("--status-port", type=int)
    run.add_argument("--log-format", choices=["auto", "json", "console"])
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

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
    status.add_argument("--config", type=Path, help="TOML settings file (or LORAWARM_CONFIG)")
    return parser


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-lora-rank", type=int, help="largest accepted LoRA rank")
    parser.add_argument("--base-model", help="the base model adapters must be trained for")
    parser.add_argument(
        "--base-model-alias",
        dest="base_model_aliases",
        action="append",
        help="another accepted name of the base model (repeatable)",
    )
    parser.add_argument(
        "--max-adapter-bytes", type=int, help="largest accepted adapter (config + weights)"
    )
    parser.add_argument(
        "--safetensors-only",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refuse .bin/.pt (pickled) weights; --no-safetensors-only accepts them",
    )


_NOT_SETTINGS = {"command", "config", "paths", "json", "url"}


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    return load(args.config, **overrides)


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
        from lorawarm.status_cli import show_status

        return show_status(settings, url=args.url, as_json=args.json)
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
