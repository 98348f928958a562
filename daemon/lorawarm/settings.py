"""The one settings object: defaults < TOML file < environment < command-line flags.

Built once in `main()` and passed down by constructors; nothing reads settings at import time.
Environment names start with `LORAWARM_` and fall back to vLLM's own names where they exist
(`VLLM_LORA_RESOLVER_CACHE_DIR`, `VLLM_API_KEY`) and to systemd's `STATE_DIRECTORY`.
A bad value raises `ConfigError`, which `main()` turns into exit code 78 (EX_CONFIG).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from lorawarm.fit import FitPolicy
from lorawarm.inspection import DEFAULT_MAX_ADAPTER_BYTES, Rules
from lorawarm.names import BadName, check_name

EX_CONFIG = 78


class ConfigError(ValueError):
    """A setting has a value lorawarm cannot work with; the message names the setting."""


def _default_state_dir() -> Path:
    # systemd's StateDirectory= sets STATE_DIRECTORY (a colon-separated list; ours is the first).
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "lorawarm"


CommaList = Annotated[list[str], NoDecode]

DEFAULT_VLLM_URL = "http://127.0.0.1:8000"


def _check_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest.strip("/"):
        raise ValueError(f"{url!r} is not an http(s) URL such as {DEFAULT_VLLM_URL}")
    return url.rstrip("/")


class ServerEntry(BaseModel):
    """One `[[servers]]` table of the config file: a vLLM server and what differs for it.

    Everything but `url` is an override: unset, the server's own flags (learned from it) and
    the global settings apply."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="The server's base URL.")
    api_key: SecretStr | None = Field(default=None, description="Its --api-key.")
    warm_limit: int | None = Field(default=None, ge=1, description="Adapters kept loaded there.")
    max_lora_rank: int | None = Field(
        default=None, ge=1, le=1024, description="Largest rank sent there."
    )
    base_model: str | None = Field(
        default=None, description="The base model adapters for it must name (enforced)."
    )
    base_model_aliases: list[str] = Field(
        default=[], description="Further accepted names of its base model."
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        return _check_url(url)


@dataclass(frozen=True)
class ServerConfig:
    """What the daemon is told about one server: settings and its `[[servers]]` entry merged."""

    url: str
    api_key: str | None
    warm_limit: int | None
    policy: FitPolicy


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Everything lorawarm can be told. Field descriptions feed the README's reference table."""

    model_config = SettingsConfigDict(
        env_prefix="LORAWARM_",
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        validate_default=True,
    )

    cache_dir: Path | None = Field(
        default=None,
        validation_alias=_env("LORAWARM_CACHE_DIR", "VLLM_LORA_RESOLVER_CACHE_DIR"),
        description="The drop directory of adapter folders (vLLM's resolver cache dir). "
        "Falls back to VLLM_LORA_RESOLVER_CACHE_DIR.",
    )
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Where immutable adapter snapshots live; vLLM loads from here. Falls back "
        "to systemd's STATE_DIRECTORY, then $XDG_STATE_HOME/lorawarm.",
    )
    vllm_urls: CommaList = Field(
        default=[],
        description="Base URLs of the vLLM servers to warm (comma-separated); with neither "
        "these nor `[[servers]]` entries, http://127.0.0.1:8000.",
    )
    servers: list[ServerEntry] = Field(
        default=[],
        description="Config file `[[servers]]` tables: `url` and any of `api_key`, "
        "`warm_limit`, `max_lora_rank`, `base_model`, `base_model_aliases` for that server "
        "only (JSON in the environment).",
    )
    vllm_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=_env("LORAWARM_VLLM_API_KEY", "VLLM_API_KEY"),
        description="API key of the vLLM servers (their --api-key). Falls back to VLLM_API_KEY.",
    )
    max_lora_rank: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Largest LoRA rank accepted, overriding each server's --max-lora-rank; "
        "unset: each server's own limit where it is learned, else not checked before loading.",
    )
    base_model: str | None = Field(
        default=None,
        description="Enforce this base model: an adapter whose base_model_name_or_path names "
        "neither it, an alias nor the server's model is refused (base_model_mismatch). Unset: "
        "each server's --model is learned, and an adapter naming another model is served when "
        "its modules and shapes fit that server, with a base_model_differs warning.",
    )
    base_model_aliases: CommaList = Field(
        default=[],
        description="Other names of the base model accepted in base_model_name_or_path "
        "without a base_model_differs warning, and with base_model set (comma-separated).",
    )
    served_model_names: CommaList = Field(
        default=[],
        description="Further names no adapter may take (comma-separated); each server's own "
        "served names are learned from it.",
    )
    max_adapter_bytes: int = Field(
        default=DEFAULT_MAX_ADAPTER_BYTES,
        ge=1,
        description="Largest adapter accepted, in bytes (adapter_config.json plus the weights "
        "file); nothing larger is digested, copied or loaded. The default, 8 GiB, is more than "
        "twice a rank-64 LoRA on every linear layer of a 70B model saved in fp32 (~3.3 GB).",
    )
    safetensors_only: bool = Field(
        default=True,
        description="Refuse .bin/.pt weights: vLLM unpickles them (torch.load with weights_only, "
        "which has had bypasses), and pre-warming does so on every server before anyone asks. "
        "PEFT writes safetensors by default; set false only to serve pickled adapters from a "
        "directory that only trusted users can write.",
    )
    settle_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="Quiet period after the last change before an in-place copied folder is "
        "taken; folders published by rename are taken at once.",
    )
    resync_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="Rescan of the drop directory and of every server's adapters. While "
        "inotify watches every folder, four rescans in five only look where a directory "
        "changed and the fifth reads every folder; with polling, every rescan reads every "
        "folder.",
    )
    warm_limit: int | None = Field(
        default=None,
        ge=1,
        description="How many adapters to keep loaded per server (pinned first, then the most "
        "recently requested there, then the newest). Unset: what the server's engine keeps in "
        "memory (--max-cpu-loras) where lorawarm's resolver serves the rest on demand, else "
        "every adapter that fits the server.",
    )
    pinned: CommaList = Field(
        default=[],
        description="Adapters always kept loaded, first in the warm set (comma-separated).",
    )
    polling: bool = Field(
        default=False,
        description="Use the polling observer instead of inotify (network filesystems).",
    )
    poll_seconds: float = Field(
        default=1.0, gt=0, le=3600, description="Interval of the polling observer."
    )
    request_timeout: float = Field(
        default=60.0, gt=0, le=3600, description="Timeout of one request to vLLM, in seconds."
    )
    health_seconds: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="How often each vLLM server's /health is probed (a restart is re-warmed).",
    )
    max_backoff_seconds: float = Field(
        default=60.0, gt=0, le=3600, description="Cap of the retry backoff after a failure."
    )
    snapshot_grace_seconds: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="Unreferenced snapshots younger than this are kept (the plugin may have "
        "just made one for vLLM).",
    )
    # -- adapters from object storage (lorawarm.sources) ----------------------------------
    sources: CommaList = Field(
        default=[],
        description="Object-storage prefixes adapters are synced from, such as "
        "s3://bucket/adapters/ (comma-separated; the first source that has a name wins). "
        "Credentials come from the standard AWS chain, an S3-compatible store from "
        "AWS_ENDPOINT_URL_S3.",
    )
    source_poll_seconds: float = Field(
        default=30.0,
        gt=0,
        le=86400,
        description="How often each source is listed (SIGHUP lists at once). One listing is "
        "one LIST request per 1,000 objects: 30 s costs ~2,900 requests a day per 1,000 "
        "objects and replica.",
    )
    source_concurrency: int = Field(
        default=4, ge=1, le=64, description="Downloads from the sources at the same time."
    )
    source_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds a source may stay silent during one request before it is retried.",
    )
    status_host: str = Field(default="127.0.0.1", description="Address the status API binds.")
    status_port: int = Field(
        default=8765, ge=0, le=65535, description="Port of the status API (0: pick a free one)."
    )
    status_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the status API requires (all routes but /healthz).",
    )
    status_allow_public: bool = Field(
        default=False,
        description="Let `lorawarm run` serve the status API on a non-loopback status_host "
        "without a status_token (anyone who can reach it reads every adapter and server).",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="auto: JSON lines when stdout is not a terminal (journald), console otherwise.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )

    # Where each setting that was given came from, as messages name it (filled by `load()`).
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator(
        "vllm_urls", "base_model_aliases", "served_model_names", "pinned", "sources", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator(
        "warm_limit",
        "cache_dir",
        "base_model",
        "vllm_api_key",
        "status_token",
        "max_lora_rank",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `KEY=` in an env file means "not set", never "the empty string" (an empty token
        # would otherwise be a token every client knows).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("state_dir", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        # An empty path would be the current directory.
        return _default_state_dir() if isinstance(value, str) and not value.strip() else value

    @field_validator("vllm_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        checked = [_check_url(url) for url in urls]
        if len(set(checked)) != len(checked):
            raise ValueError("the same vLLM URL is listed twice")
        return checked

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, servers: list[ServerEntry]) -> list[ServerEntry]:
        urls = [s.url for s in servers]
        if len(set(urls)) != len(urls):
            raise ValueError("the same vLLM URL has two [[servers]] entries")
        return servers

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, urls: list[str]) -> list[str]:
        from lorawarm.sources.location import parse_source

        checked = [parse_source(url).url for url in urls]
        if len(set(checked)) != len(checked):
            raise ValueError("the same source is listed twice")
        return checked

    @field_validator("pinned")
    @classmethod
    def _check_pinned(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                check_name(name)
            except BadName as bad:
                raise ValueError(bad.message) from None
        return names

    @model_validator(mode="after")
    def _check_dirs(self) -> Settings:
        if self.cache_dir is not None and self.state_dir is not None:
            cache, state = self.cache_dir.resolve(), self.state_dir.resolve()
            if cache == state or state.is_relative_to(cache):
                raise ValueError(
                    "state_dir must not be the cache dir or inside it (snapshots would be "
                    "picked up as adapters)"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI flags arrive as init kwargs and win; the TOML file is merged in by `load()`.
        return (init_settings, env_settings)

    def origin(self, field: str) -> str:
        """How to name `field` in a message: the flag, environment variable or config file key
        it was given by, like `--cache-dir (cache_dir)`; its main variable when not given."""
        if field in self._origins:
            return self._origins[field]
        if field == "state_dir" and os.environ.get("STATE_DIRECTORY"):
            return "STATE_DIRECTORY (state_dir)"
        return f"{env_name(field)} ({field})"

    def server_configs(self) -> list[ServerConfig]:
        """Every server to warm: the `[[servers]]` entries, then `vllm_urls` not among them
        (or the default URL when neither names one), each with its overrides merged over
        the global settings."""
        entries = {s.url: s for s in self.servers}
        for url in self.vllm_urls or ([] if entries else [DEFAULT_VLLM_URL]):
            entries.setdefault(url, ServerEntry(url=url))

        def secret(value: SecretStr | None) -> str | None:
            return None if value is None else value.get_secret_value()

        return [
            ServerConfig(
                url=e.url,
                api_key=secret(e.api_key) or secret(self.vllm_api_key),
                warm_limit=e.warm_limit if e.warm_limit is not None else self.warm_limit,
                policy=FitPolicy(
                    base_model=e.base_model or self.base_model,
                    base_model_aliases=(*e.base_model_aliases, *self.base_model_aliases),
                    max_lora_rank=e.max_lora_rank or self.max_lora_rank,
                    served_model_names=tuple(self.served_model_names),
                ),
            )
            for e in entries.values()
        ]

    def watched_rules(self) -> Rules:
        """The inspection rules of the daemon and the plugin: only what holds on every server.
        The rank limit, the base model and the served names are judged per server
        (`lorawarm.fit`, with `policy()` and what was learned of the server)."""
        return Rules(
            max_adapter_bytes=self.max_adapter_bytes, safetensors_only=self.safetensors_only
        )

    def policy(self) -> FitPolicy:
        """The operator's overrides for every server (a `[[servers]]` table adds to them)."""
        return FitPolicy(
            base_model=self.base_model,
            base_model_aliases=tuple(self.base_model_aliases),
            max_lora_rank=self.max_lora_rank,
            served_model_names=tuple(self.served_model_names),
        )

    def rules(self) -> Rules:
        """The inspection rules these settings imply with no server to judge against
        (`lorawarm validate`): every limit that is set is checked."""
        return Rules(
            max_lora_rank=self.max_lora_rank,
            base_model=self.base_model,
            base_model_aliases=tuple(self.base_model_aliases),
            served_model_names=tuple(self.served_model_names),
            max_adapter_bytes=self.max_adapter_bytes,
            safetensors_only=self.safetensors_only,
        )


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return f"LORAWARM_{field.upper()}"


def load(
    config_file: Path | None = None, *, flags: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Build the settings: defaults, then the TOML file, then the environment, then `overrides`.

    `config_file` defaults to `LORAWARM_CONFIG`. `flags` names the command-line flag each
    override came from (`{"vllm_urls": "--vllm-url"}`; default `--field-name`), for messages.
    Raises `ConfigError` with one line naming the setting as the user gave it and what is wrong.
    """
    if config_file is None and os.environ.get("LORAWARM_CONFIG"):
        config_file = Path(os.environ["LORAWARM_CONFIG"])
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            file_values = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"config file {config_file}: {err.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {config_file}: not valid TOML ({err})") from None
        unknown = sorted(set(file_values) - set(Settings.model_fields))
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown setting {unknown[0]!r}")
    # The environment beats the file: drop file values the environment sets.
    from_env = {f: n for f in Settings.model_fields if (n := _env_given(f)) is not None}
    init = {k: v for k, v in file_values.items() if k not in from_env}
    from_cli = {k: v for k, v in overrides.items() if v is not None}
    init.update(from_cli)
    flags = flags or {}
    where: dict[str, str] = {f: f"config file {config_file}: {f}" for f in init}
    where.update({f: f"{n} ({f})" for f, n in from_env.items() if f not in from_cli})
    where.update({f: f"{flags.get(f, '--' + f.replace('_', '-'))} ({f})" for f in from_cli})
    try:
        settings = Settings(**init)
    except ValidationError as err:
        raise ConfigError(_describe(err, where)) from None
    settings._origins = where
    return settings


def _env_given(field: str) -> str | None:
    """The environment variable that sets `field`, if one does (as pydantic-settings reads them:
    the first of the alias choices, names compared without case)."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    names = (
        [n for n in alias.choices if isinstance(n, str)]
        if isinstance(alias, AliasChoices)
        else [env_name(field)]
    )
    present = {k.upper(): k for k in os.environ}
    return next((present[n.upper()] for n in names if n.upper() in present), None)


def _describe(err: ValidationError, where: dict[str, str]) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    field = loc[0] if loc else ""
    if field in Settings.model_fields:
        what = where.get(field, f"{env_name(field)} ({field})")
    else:
        what = "settings"
    if field in Settings.model_fields and len(loc) > 1:  # inside a table: servers[1].url
        what += "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = (
        ""
        # a source URL may carry a credential by mistake: its message shows what is safe
        if "key" in field or "token" in field or field == "sources" or isinstance(given, dict)
        else f" (got {given!r})"
    )
    return f"{what}: {message}{shown}"


def _environment_names(name: str) -> list[str]:
    """Every environment variable that sets `name`, the main one first."""
    alias = Settings.model_fields[name].validation_alias
    envs = (
        [n for n in alias.choices if isinstance(n, str)]
        if isinstance(alias, AliasChoices)
        else [env_name(name)]
    )
    if name == "state_dir":
        envs.append("STATE_DIRECTORY")
    return envs


def _default_text(name: str) -> str:
    info = Settings.model_fields[name]
    if info.default_factory is not None:
        return "see meaning"
    if info.default is None:
        return "unset"
    if isinstance(info.default, list):
        return ",".join(info.default) or "empty"
    return str(info.default)


def field_help(name: str) -> str:
    """The help text of the command-line flag for setting `name`: what it does, its default
    and its environment variables, from the same field description as the README table."""
    info = Settings.model_fields[name]
    default = _default_text(name)
    default = "see above" if default == "see meaning" else default
    envs = " or ".join(_environment_names(name))
    return f"{info.description} Default: {default}. Environment: {envs}."


def reference_markdown() -> str:
    """The configuration reference table of the README, generated from the model itself."""
    rows = [
        "| setting (TOML key) | environment | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, info in Settings.model_fields.items():
        env_text = " or ".join(f"`{e}`" for e in _environment_names(name))
        rows.append(f"| `{name}` | {env_text} | `{_default_text(name)}` | {info.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - `python -m lorawarm.settings` prints the table
    print(reference_markdown())
