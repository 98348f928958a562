"""Adapter names: what is accepted, what is refused and why, and where a name lives."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorawarm.names import (
    MAX_COMPONENT_LENGTH,
    MAX_NAME_LENGTH,
    BadName,
    check_name,
    folder_for,
    is_name,
)

GOOD = [
    "support-bot",
    "acme/support-bot",
    "Llama_3.1-sql",
    "a",
    "0",
    "_x",
    "-x",
    "v1..2",
    "a" * MAX_COMPONENT_LENGTH,
    "o" * (MAX_NAME_LENGTH - MAX_COMPONENT_LENGTH - 1) + "/" + "n" * MAX_COMPONENT_LENGTH,
]

BAD = [
    ("", "invalid_name"),
    (".", "invalid_name"),
    ("..", "invalid_name"),
    ("../x", "invalid_name"),
    ("x/..", "invalid_name"),
    ("a/../../b", "invalid_name"),
    ("./x", "invalid_name"),
    ("/etc/passwd", "invalid_name"),
    ("/x", "invalid_name"),
    ("x/", "invalid_name"),
    ("a//b", "invalid_name"),
    ("a/b/c", "invalid_name"),
    (".hidden", "invalid_name"),
    ("org/.hidden", "invalid_name"),
    (".x.tmp", "invalid_name"),
    ("x\\y", "invalid_name"),
    ("x%2Fy", "invalid_name"),
    ("x y", "invalid_name"),
    ("x\n", "invalid_name"),
    ("x\0", "invalid_name"),
    ("lor\u0430", "invalid_name"),  # Cyrillic a
    ("\uff41", "invalid_name"),  # full-width a
    ("a\u2215b", "invalid_name"),  # division slash
    ("caf\u00e9", "invalid_name"),
    ("a" * (MAX_COMPONENT_LENGTH + 1), "name_too_long"),
    ("o/" + "n" * (MAX_COMPONENT_LENGTH + 1), "name_too_long"),
    ("o" * 80 + "/" + "n" * 80, "name_too_long"),
    ("x" * 10_000, "name_too_long"),
]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_are_accepted(name: str) -> None:
    """Letters, digits, '.', '_', '-' in one or two levels, within the length limits, pass."""
    assert check_name(name) == name
    assert is_name(name)


@pytest.mark.parametrize(("name", "reason"), BAD, ids=[ascii(n)[:30] for n, _ in BAD])
def test_bad_names_are_refused(name: str, reason: str) -> None:
    """Traversal, absolute paths, three levels, dot names, look-alikes and long names fail."""
    with pytest.raises(BadName) as caught:
        check_name(name)
    assert caught.value.reason == reason
    assert str(caught.value) == caught.value.message
    assert "\n" not in caught.value.message
    assert "\0" not in caught.value.message
    assert not is_name(name)


def test_served_model_name_is_refused() -> None:
    """A name equal to a served base model is refused; other names are not affected."""
    with pytest.raises(BadName) as caught:
        check_name("llama", served_models=["llama", "chat"])
    assert caught.value.reason == "name_is_base_model"
    assert check_name("llama-sql", served_models=iter(["llama"])) == "llama-sql"
    assert is_name("llama")  # is_name ignores served names


def test_message_shows_hostile_name_escaped() -> None:
    """A message never echoes control or non-ASCII characters raw, so a log line stays one line."""
    with pytest.raises(BadName) as caught:
        check_name("evil\x1b[2J\u0430")
    assert "\x1b" not in caught.value.message
    assert "\\x1b" in caught.value.message


def test_folder_for_maps_good_names(tmp_path: Path) -> None:
    """A good name maps to the folder under the root, one or two levels deep."""
    assert folder_for(tmp_path, "x") == tmp_path / "x"
    assert folder_for(tmp_path, "org/x") == tmp_path / "org" / "x"


@pytest.mark.parametrize("name", ["../x", "/etc", "a/../../b", "", ".", "a/b/c"])
def test_folder_for_refuses_hostile_names(tmp_path: Path, name: str) -> None:
    """A hostile name never maps to anything, let alone outside the root."""
    assert folder_for(tmp_path, name) is None


def test_folder_for_refuses_symlinked_org_out_of_root(tmp_path: Path) -> None:
    """An `org` folder that is a symlink out of the root makes `org/x` map to nothing."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "org").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "self").symlink_to(".", target_is_directory=True)
    assert folder_for(root, "org/x") is None
    assert folder_for(root, "self") is None  # the root itself is no adapter
