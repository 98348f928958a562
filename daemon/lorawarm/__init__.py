"""lorawarm: validate LoRA adapters dropped into a directory and pre-warm them into vLLM.

This package is imported by the vLLM plugin too, so importing it must stay cheap and must not
pull in watchdog, httpx or the web server: those live in the modules only the daemon imports.
"""

__version__ = "0.1.0"
