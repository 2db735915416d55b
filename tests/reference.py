"""The float64 NumPy oracle (DESIGN.md names it tests/reference.py).

It lives in bncore.testing.reference so that `bncore check` can use it after
a plain `pip install`; this module is the same oracle under its design name.
"""
from bncore.testing.reference import *  # noqa: F401,F403
from bncore.testing.reference import batch_norm_backward, batch_norm_forward, normwise_relative_error  # noqa: F401
