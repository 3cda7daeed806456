"""A direction method of a researcher's own, loaded as a plugin by tests/test_direction_methods.py:
the difference of the two labels' per-coordinate medians."""

import numpy as np

from pipeline.direction_methods import DIRECTION_METHODS, DirectionMethod


@DIRECTION_METHODS.register("median_diff")
class MedianDiff(DirectionMethod):
    label = "difference of medians"

    def compute(self, harmful, harmless):
        return np.median(harmful, 0) - np.median(harmless, 0)
