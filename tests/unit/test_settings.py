"""Settings: public environment names, fallbacks, the TOML file, precedence and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from lorawarm.inspection import Rules
from lorawarm.settings import EX_CONFIG, ConfigError, Settings, env_name, load, reference_markdown

FALLBACKS = ("VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_API_KEY", "STATE_DIRECTORY", "XDG_STATE_HOME")


def toml(tmp_path: Path, text: str, name: str = "lorawarm.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    """With nothing set, the defaults are vLLM's (rank 16) and a loopback status API."""
    s = load()
    assert s.cache_dir is None
    assert s.state_dir == tmp_path / "home" / ".local" / "state" / "lorawarm"
    assert s.vllm_urls == []
    assert [c.url for c in s.server_configs()] == ["http://127.0.0.1:8000"]
    assert s.vllm_api_key is None
    assert s.status_token is None
    assert (s.max_lora_rank, s.base_model, s.base_model_aliases) == (None, None, [])
    assert (s.settle_seconds, s.resync_seconds, s.warm_limit, s.pinned) == (5.0, 60.0, None, [])
    assert (s.polling, s.status_host, s.status_port) == (False, "127.0.0.1", 8765)
    assert (s.log_format, s.log_level) == ("auto", "info")
    assert EX_CONFIG == 78


@pytest.mark.parametrize(
    ("var", "value", "field", "expected"),
    [
        ("LORAWARM_CACHE_DIR", "/srv/adapters", "cache_dir", Path("/srv/adapters")),
        ("LORAWARM_STATE_DIR", "/var/lib/lw", "state_dir", Path("/var/lib/lw")),
        ("LORAWARM_VLLM_URLS", "http://a:1, https://b/,", "vllm_urls", ["http://a:1", "https://b"]),
        ("LORAWARM_MAX_LORA_RANK", "64", "max_lora_rank", 64),
        ("LORAWARM_BASE_MODEL", "meta/Llama", "base_model", "meta/Llama"),
        ("LORAWARM_BASE_MODEL_ALIASES", "a, /models/b,,", "base_model_aliases", ["a", "/models/b"]),
        ("LORAWARM_SERVED_MODEL_NAMES", "chat,llama", "served_model_names", ["chat", "llama"]),
        ("LORAWARM_SETTLE_SECONDS", "0.5", "settle_seconds", 0.5),
        ("LORAWARM_RESYNC_SECONDS", "10", "resync_seconds", 10.0),
        ("LORAWARM_WARM_LIMIT", "3", "warm_limit", 3),
        ("LORAWARM_WARM_LIMIT", "", "warm_limit", None),
        ("LORAWARM_PINNED", "x, org/y", "pinned", ["x", "org/y"]),
        ("LORAWARM_POLLING", "true", "polling", True),
        ("LORAWARM_POLLING", "1", "polling", True),
        ("LORAWARM_POLLING", "off", "polling", False),
        ("LORAWARM_POLL_SECONDS", "2", "poll_seconds", 2.0),
        ("LORAWARM_REQUEST_TIMEOUT", "5", "request_timeout", 5.0),
        ("LORAWARM_HEALTH_SECONDS", "3", "health_seconds", 3.0),
        ("LORAWARM_MAX_BACKOFF_SECONDS", "30", "max_backoff_seconds", 30.0),
        ("LORAWARM_STATUS_HOST", "0.0.0.0", "status_host", "0.0.0.0"),
        ("LORAWARM_STATUS_PORT", "0", "status_port", 0),
        ("LORAWARM_LOG_FORMAT", "JSON", "log_format", "json"),
        ("LORAWARM_LOG_LEVEL", "Debug", "log_level", "debug"),
        ("LORAWARM_CACHE_DIR", "", "cache_dir", None),
        ("LORAWARM_BASE_MODEL", " ", "base_model", None),
    ],
)  # fmt: skip
def test_environment_names(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, field: str, expected: object
) -> None:
    """Each public LORAWARM_* variable sets its setting; comma lists are split and trimmed."""
    monkeypatch.setenv(var, value)
    assert getattr(load(), field) == expected
    assert env_name(field) == var


@pytest.mark.parametrize("var", ["LORAWARM_VLLM_API_KEY", "LORAWARM_STATUS_TOKEN"])
def test_secret_environment_names(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    """The API key and status token are read as secrets; an empty value means unset."""
    monkeypatch.setenv(var, "s3cret")
    value = getattr(load(), env_name_field(var))
    assert isinstance(value, SecretStr)
    assert value.get_secret_value() == "s3cret"
    monkeypatch.setenv(var, "")
    assert getattr(load(), env_name_field(var)) is None


def env_name_field(var: str) -> str:
    return var.removeprefix("LORAWARM_").lower()


def test_vllm_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own VLLM_LORA_RESOLVER_CACHE_DIR and VLLM_API_KEY are used when ours are unset."""
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", "/srv/vllm-loras")
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    s = load()
    assert s.cache_dir == Path("/srv/vllm-loras")
    assert s.vllm_api_key is not None
    assert s.vllm_api_key.get_secret_value() == "from-vllm"


def test_own_names_beat_vllm_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """LORAWARM_CACHE_DIR and LORAWARM_VLLM_API_KEY win over vLLM's names."""
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", "/srv/vllm-loras")
    monkeypatch.setenv("LORAWARM_CACHE_DIR", "/srv/ours")
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    monkeypatch.setenv("LORAWARM_VLLM_API_KEY", "ours")
    s = load()
    assert s.cache_dir == Path("/srv/ours")
    assert s.vllm_api_key is not None
    assert s.vllm_api_key.get_secret_value() == "ours"


def test_state_dir_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The state dir is LORAWARM_STATE_DIR, else systemd's STATE_DIRECTORY, else XDG_STATE_HOME."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert load().state_dir == tmp_path / "xdg" / "lorawarm"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/lorawarm:/var/lib/other")
    assert load().state_dir == Path("/var/lib/lorawarm")
    monkeypatch.setenv("LORAWARM_STATE_DIR", "/srv/state")
    assert load().state_dir == Path("/srv/state")
    monkeypatch.setenv("LORAWARM_STATE_DIR", "")
    assert load().state_dir == Path("/var/lib/lorawarm")  # empty means unset, never the cwd


def test_toml_file(tmp_path: Path) -> None:
    """A TOML file sets settings by field name, lists as arrays or comma strings."""
    path = toml(
        tmp_path,
        'cache_dir = "/srv/a"\n'
        'vllm_urls = ["http://a:1", "http://b:2"]\n'
        'pinned = "x,y"\n'
        "max_lora_rank = 32\n"
        "polling = true\n"
        'vllm_api_key = "k"\n',
    )
    s = load(path)
    assert s.cache_dir == Path("/srv/a")
    assert s.vllm_urls == ["http://a:1", "http://b:2"]
    assert (s.pinned, s.max_lora_rank, s.polling) == (["x", "y"], 32, True)
    assert s.vllm_api_key is not None


def test_servers_tables_override_per_server(tmp_path: Path) -> None:
    """`[[servers]]` tables name servers with their own overrides, merged over the global
    settings; `vllm_urls` adds servers with none; without a URL anywhere the default is used
    only when no table names one."""
    path = toml(
        tmp_path,
        'vllm_urls = ["http://plain:1", "http://a:1"]\n'
        'vllm_api_key = "global-key"\n'
        "warm_limit = 5\n"
        'base_model_aliases = "org/tiny"\n'
        "[[servers]]\n"
        'url = "http://a:1/"\n'
        'api_key = "a-key"\n'
        "warm_limit = 2\n"
        "max_lora_rank = 8\n"
        'base_model = "/models/a"\n'
        'base_model_aliases = ["org/a"]\n'
        "[[servers]]\n"
        'url = "http://b:1"\n',
    )
    configs = {c.url: c for c in load(path).server_configs()}
    assert list(configs) == ["http://a:1", "http://b:1", "http://plain:1"]
    a, b, plain = configs["http://a:1"], configs["http://b:1"], configs["http://plain:1"]
    assert (a.api_key, a.warm_limit) == ("a-key", 2)
    assert (a.policy.max_lora_rank, a.policy.base_model) == (8, "/models/a")
    assert a.policy.base_model_aliases == ("org/a", "org/tiny")
    assert (b.api_key, b.warm_limit, b.policy.base_model) == ("global-key", 5, None)
    assert plain.policy.max_lora_rank is None  # learned from the server
    only_tables = toml(tmp_path, '[[servers]]\nurl = "http://c:1"\n', name="only.toml")
    assert [c.url for c in load(only_tables).server_configs()] == ["http://c:1"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[servers]]\nurl = "ftp://x"\n', "not an http(s) URL"),
        ('[[servers]]\nurl = "http://x"\nwarm_limt = 2\n', "warm_limt"),
        ('[[servers]]\nurl = "http://x"\n[[servers]]\nurl = "http://x/"\n', "two [[servers]]"),
        ("[[servers]]\nwarm_limit = 2\n", "url"),
        ('[[servers]]\nurl = "http://x"\nmax_lora_rank = 0\n', "greater than or equal to 1"),
    ],
)
def test_bad_servers_table_is_one_clear_error(tmp_path: Path, text: str, problem: str) -> None:
    """A bad `[[servers]]` table is a ConfigError naming the file and the problem."""
    with pytest.raises(ConfigError) as caught:
        load(toml(tmp_path, text))
    assert "servers" in str(caught.value)
    assert problem in str(caught.value)


def test_toml_file_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """LORAWARM_CONFIG names the TOML file; an explicit path wins over it."""
    monkeypatch.setenv("LORAWARM_CONFIG", str(toml(tmp_path, "max_lora_rank = 8\n")))
    assert load().max_lora_rank == 8
    other = tmp_path / "other.toml"
    other.write_text("max_lora_rank = 64\n")
    assert load(other).max_lora_rank == 64


def test_precedence_flags_env_toml_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Flags beat the environment, which beats the TOML file, which beats the defaults."""
    path = toml(tmp_path, 'max_lora_rank = 8\nwarm_limit = 2\nbase_model = "toml"\n')
    monkeypatch.setenv("LORAWARM_WARM_LIMIT", "3")
    monkeypatch.setenv("LORAWARM_BASE_MODEL", "env")
    s = load(path, base_model="flag", max_lora_rank=None)
    assert s.max_lora_rank == 8  # TOML over default; a None flag is "not given"
    assert s.warm_limit == 3  # env over TOML
    assert s.base_model == "flag"  # flag over env
    assert s.resync_seconds == 60.0  # default


def test_lowercase_environment_beats_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A variable pydantic-settings reads (names are not case-sensitive) also beats the file."""
    monkeypatch.setenv("lorawarm_warm_limit", "4")
    assert load(toml(tmp_path, "warm_limit = 2\n")).warm_limit == 4


def test_fallback_environment_and_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """vLLM's cache-dir variable counts as environment (beats TOML); STATE_DIRECTORY does not."""
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", "/srv/vllm-loras")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/lorawarm")
    s = load(toml(tmp_path, 'cache_dir = "/srv/toml"\nstate_dir = "/srv/toml-state"\n'))
    assert s.cache_dir == Path("/srv/vllm-loras")
    assert s.state_dir == Path("/srv/toml-state")


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("LORAWARM_MAX_LORA_RANK", "abc", "valid integer"),
        ("LORAWARM_MAX_LORA_RANK", "0", "greater than or equal to 1"),
        ("LORAWARM_MAX_LORA_RANK", "4096", "less than or equal to 1024"),
        ("LORAWARM_STATUS_PORT", "70000", "less than or equal to 65535"),
        ("LORAWARM_POLLING", "maybe", "valid boolean"),
        ("LORAWARM_VLLM_URLS", "ftp://x", "not an http(s) URL"),
        ("LORAWARM_VLLM_URLS", "localhost:8000", "not an http(s) URL"),
        ("LORAWARM_VLLM_URLS", "http://", "not an http(s) URL"),
        ("LORAWARM_VLLM_URLS", "http://a:1,http://a:1/", "listed twice"),
        ("LORAWARM_LOG_LEVEL", "verbose", "'debug', 'info', 'warning' or 'error'"),
        ("LORAWARM_LOG_FORMAT", "xml", "'auto', 'json' or 'console'"),
        ("LORAWARM_SETTLE_SECONDS", "-1", "greater than or equal to 0"),
        ("LORAWARM_RESYNC_SECONDS", "0", "greater than 0"),
        ("LORAWARM_WARM_LIMIT", "0", "greater than or equal to 1"),
        ("LORAWARM_PINNED", "ok,../x", "'..' part"),
    ],
)
def test_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, words: str
) -> None:
    """A bad value is one ConfigError line naming the variable, the setting and the problem."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as caught:
        load()
    message = str(caught.value)
    assert message.startswith(f"{var} ({env_name_field(var)}): ")
    assert words in message
    assert "\n" not in message


def test_state_dir_inside_fallback_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state dir may not lie in the cache dir when that comes from vLLM's variable either."""
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", "/srv/a")
    monkeypatch.setenv("LORAWARM_STATE_DIR", "/srv/a/state")
    with pytest.raises(ConfigError, match="state_dir must not be the cache dir or inside it"):
        load()


def test_bad_toml_value_names_the_file(tmp_path: Path) -> None:
    """A bad value from the TOML file is reported against the file and the setting."""
    path = toml(tmp_path, 'max_lora_rank = "lots"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith(f"config file {path}: max_lora_rank: ")


def test_bad_flag_value_names_the_flag() -> None:
    """A bad value given as a flag is reported against the flag."""
    with pytest.raises(ConfigError) as caught:
        load(max_lora_rank=0)
    assert str(caught.value).startswith("--max-lora-rank (max_lora_rank): ")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("cache_dirr = '/srv'\n", "unknown setting 'cache_dirr'"),
        ("[status]\nport = 1\n", "unknown setting 'status'"),
        ("max_lora_rank = \n", "not valid TOML"),
    ],
)
def test_bad_toml_file(tmp_path: Path, text: str, words: str) -> None:
    """An unknown key or broken TOML is a ConfigError naming the file."""
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith(f"config file {path}: ")
    assert words in str(caught.value)


def test_unreadable_toml_file(tmp_path: Path) -> None:
    """A missing or non-UTF-8 TOML file is a ConfigError naming the file and the OS error."""
    with pytest.raises(ConfigError, match="No such file or directory"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"base_model = '\xe9'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_secrets_are_never_printed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The API key and the status token appear in no repr, str, dump or error message."""
    monkeypatch.setenv("VLLM_API_KEY", "sk-vllm-SECRET")
    monkeypatch.setenv("LORAWARM_STATUS_TOKEN", "tok-SECRET")
    s = load()
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        assert "SECRET" not in text
    for field in ("vllm_api_key", "status_token"):
        path = toml(tmp_path, f"{field} = 12345678\n")
        monkeypatch.delenv("VLLM_API_KEY")
        monkeypatch.delenv("LORAWARM_STATUS_TOKEN", raising=False)
        with pytest.raises(ConfigError) as caught:
            load(path)
        assert field in str(caught.value)
        assert "12345678" not in str(caught.value)
        monkeypatch.setenv("VLLM_API_KEY", "x")


@pytest.mark.parametrize("state", ["/srv/a", "/srv/a/state", "/srv/a/../a/deep/er"])
def test_state_dir_inside_cache_dir_is_refused(state: str) -> None:
    """Snapshots inside the drop directory would be picked up as adapters: refused."""
    with pytest.raises(ConfigError, match="state_dir must not be the cache dir or inside it"):
        load(cache_dir=Path("/srv/a"), state_dir=Path(state))


def test_state_dir_beside_cache_dir_is_fine() -> None:
    """A state dir next to the cache dir (sharing a prefix) is accepted."""
    s = load(cache_dir=Path("/srv/a"), state_dir=Path("/srv/ab"))
    assert s.state_dir == Path("/srv/ab")


def test_rules_follow_settings() -> None:
    """The inspection rules are built from the settings that matter for inspection."""
    s = Settings(
        max_lora_rank=32,
        base_model="/models/llama",
        base_model_aliases=["meta/llama"],
        served_model_names=["chat"],
        max_adapter_bytes=1 << 30,
        safetensors_only=False,
    )
    assert s.rules() == Rules(
        max_lora_rank=32,
        base_model="/models/llama",
        base_model_aliases=("meta/llama",),
        served_model_names=("chat",),
        max_adapter_bytes=1 << 30,
        safetensors_only=False,
    )


def test_size_limit_and_pickle_refusal_have_safe_defaults() -> None:
    """Out of the box, adapters above 8 GiB and pickled (.bin/.pt) weights are refused."""
    rules = Settings().rules()
    assert rules.max_adapter_bytes == 8 << 30
    assert rules.safetensors_only is True


def test_size_limit_and_pickle_refusal_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """LORAWARM_MAX_ADAPTER_BYTES and LORAWARM_SAFETENSORS_ONLY set the two rules; a limit
    that is not a positive integer is a configuration error naming the variable."""
    monkeypatch.setenv("LORAWARM_MAX_ADAPTER_BYTES", "1048576")
    monkeypatch.setenv("LORAWARM_SAFETENSORS_ONLY", "false")
    rules = load().rules()
    assert (rules.max_adapter_bytes, rules.safetensors_only) == (1 << 20, False)
    monkeypatch.setenv("LORAWARM_MAX_ADAPTER_BYTES", "0")
    with pytest.raises(ConfigError, match="LORAWARM_MAX_ADAPTER_BYTES"):
        load()


def test_reference_table_lists_every_setting() -> None:
    """The README's generated reference table has one row per setting with its variables."""
    table = reference_markdown().splitlines()
    assert len(table) == 2 + len(Settings.model_fields)
    rows = {line.split("|")[1].strip(" `"): line for line in table[2:]}
    assert set(rows) == set(Settings.model_fields)
    assert "`LORAWARM_CACHE_DIR` or `VLLM_LORA_RESOLVER_CACHE_DIR`" in rows["cache_dir"]
    assert "`LORAWARM_VLLM_API_KEY` or `VLLM_API_KEY`" in rows["vllm_api_key"]
    assert "`STATE_DIRECTORY`" in rows["state_dir"]
    assert "`unset`" in rows["max_lora_rank"]
    assert "`unset`" in rows["warm_limit"]
    assert "http://127.0.0.1:8000" in rows["vllm_urls"]
    assert "`empty`" in rows["pinned"]
