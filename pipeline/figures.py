"""Charts as PNG bytes, written by the stages like any other output (atomically)."""

from __future__ import annotations

import io

import numpy as np


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


def interval_errors(value, low, high) -> np.ndarray:
    """matplotlib's asymmetric `yerr` ([2, n], distances below and above) from interval bounds;
    0 where a bound is missing, so a bar without an interval draws none."""
    value, low, high = (np.asarray(a, dtype=np.float64) for a in (value, low, high))
    below, above = np.nan_to_num(value - low), np.nan_to_num(high - value)
    return np.clip(np.stack([below, above]), 0, None)  # rounding must not make a negative length
