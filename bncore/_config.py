"""What this build of bncore is: version, OpenMP, threads, compile flags."""
from __future__ import annotations

import platform
import sys
from typing import Any, Dict

import numpy as np

from bncore import _openmp
from bncore._threads import get_num_threads
from bncore._version import __version__


def build_info() -> Dict[str, Any]:
    """The facts :func:`show_config` prints, as a dict."""
    return {
        "version": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "openmp": _openmp.openmp_enabled(),
        "openmp_requested": _openmp.openmp_requested(),
        "openmp_note": _openmp.openmp_note(),
        "default_threads": get_num_threads(),
        "omp_max_threads": _openmp.max_threads(),
        "compile_flags": _openmp.build_flags(),
    }


def show_config() -> None:
    """Print the version, OpenMP on/off, default thread count and compile flags."""
    info = build_info()
    omp = "on" if info["openmp"] else "OFF"
    if info["openmp_note"]:
        omp += f" ({info['openmp_note']})"
    print(f"bncore {info['version']}")
    print(f"  python          {info['python']}  numpy {info['numpy']}")
    print(f"  platform        {info['platform']}")
    print(f"  OpenMP          {omp}")
    print(f"  default threads {info['default_threads']}  (omp_get_max_threads: {info['omp_max_threads']})")
    print(f"  compile flags   {info['compile_flags']}")
