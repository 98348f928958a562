"""The source settings: how sources are given and which URLs are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorawarm.settings import ConfigError, load
from lorawarm.sources.location import parse_source


def test_sources_from_the_environment_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """LORAWARM_SOURCES splits on commas; a prefix without a trailing slash gets one."""
    monkeypatch.setenv("LORAWARM_SOURCES", "s3://bucket-a/adapters, s3://bucket-b/")
    monkeypatch.setenv("LORAWARM_SOURCE_POLL_SECONDS", "5")
    settings = load()
    assert settings.sources == ["s3://bucket-a/adapters/", "s3://bucket-b/"]
    assert settings.source_poll_seconds == 5


def test_sources_from_a_toml_list(tmp_path: Path) -> None:
    """`sources = [...]` in the config file."""
    config = tmp_path / "lorawarm.toml"
    config.write_text('sources = ["s3://team-bucket/lora/"]\n')
    assert load(config).sources == ["s3://team-bucket/lora/"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://bucket/x/", "not an s3:// URL"),
        ("s3://AKID:secret@bucket/x/", "carries no credentials"),
        ("s3://b/x/", "not a bucket name"),
        ("s3://bucket/../x/", "'..'"),
    ],
)
def test_bad_source_urls_are_a_config_error_naming_the_setting(
    url: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that is not a plain s3:// bucket/prefix is refused at start (exit 78), with the
    variable named and the credential-looking part never echoed back for a URL with '@'."""
    monkeypatch.setenv("LORAWARM_SOURCES", url)
    with pytest.raises(ConfigError) as err:
        load()
    assert str(err.value).startswith("LORAWARM_SOURCES (sources): ")
    assert why in str(err.value)
    assert "secret" not in str(err.value)


def test_parse_source_keeps_bucket_and_prefix() -> None:
    """`s3://bucket` is the whole bucket; `s3://bucket/a/b` is the prefix `a/b/`."""
    assert parse_source("s3://bucket").prefix == ""
    assert parse_source("s3://bucket/a/b").prefix == "a/b/"
    assert parse_source("s3://bucket/a/b").url == "s3://bucket/a/b/"
