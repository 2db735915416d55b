"""Optimizer and clipping benchmark cases for scripts/bench.py (CPU)."""
from typing import List


def optim_cases(threads: int) -> List:
    # filled in with the optimizer kernels (issue 3)
    return []
