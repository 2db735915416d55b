"""Imported first by the emulated suite (inside tests/test_gpu_emulated.py's
subprocess): puts the emulated cupy first on sys.path and checks it is the one."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))           # tests/, for conftest helpers

import cupy  # noqa: E402

assert getattr(cupy, "EMULATED", False), "the emulated cupy must shadow any real one here"
