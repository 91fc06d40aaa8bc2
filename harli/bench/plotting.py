"""matplotlib, loaded only when a plot is drawn: it is the optional ``plots`` extra.

The daemon and the CLI run without it; ``harli bench`` and ``harli profile --evaluate`` still
write their JSON results and say how to get the picture, and ``harli job plot`` says so.
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "pip install 'harli[plots]'"


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or PlotsUnavailable."""
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable(f"plots need matplotlib, which is not installed "
                               f"({INSTALL_HINT})") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
