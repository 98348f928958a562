"""vLLM resolver plugin of lorawarm (filled in by the plugin issue)."""


def register() -> None:
    """Entry point vLLM calls in every process it starts; registers nothing yet."""
