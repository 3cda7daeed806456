"""Charts as PNG bytes, written by the stages like any other output (atomically)."""

from __future__ import annotations

import io


def pyplot():
    """matplotlib's pyplot on the file-only backend: jobs have no screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
