"""The README stays true to the code it documents."""

from __future__ import annotations

from pathlib import Path

from lorawarm.inspection import Reason
from lorawarm.settings import reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_configuration_reference_matches_the_settings_model() -> None:
    """The README's configuration table is exactly what the settings model generates."""
    text = README.read_text()
    start = text.index("<!-- settings-reference:start -->")
    end = text.index("<!-- settings-reference:end -->")
    assert text[start:end].split("\n", 1)[1].strip() == reference_markdown().strip()


def test_every_reason_code_is_documented() -> None:
    """Every inspection reason code a user can see is listed in the README."""
    text = README.read_text()
    missing = [r.value for r in Reason if f"`{r.value}`" not in text]
    assert missing == []
