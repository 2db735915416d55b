#!/usr/bin/env python
"""Accuracy on adversarial data: bncore (and torch, where installed) against
the float64 oracle, as norm-wise relative errors.

Channels whose mean is `ratio` times their standard deviation, plus one
nearly constant channel, in float32, NCHW and channels-last.

    python scripts/accuracy.py                 # ratios 1e3, 1e4, 1e5
    python scripts/accuracy.py --json acc.json
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bncore  # noqa: E402
from bncore.testing.reference import batch_norm_backward as ref_bwd  # noqa: E402
from bncore.testing.reference import batch_norm_forward as ref_fwd  # noqa: E402
from bncore.testing.reference import normwise_relative_error as rel  # noqa: E402


def data(ratio, shape=(16, 32, 14, 14), seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    std = rng.uniform(0.5, 2.0, C)
    std[0] = 1e-4
    mean = std * ratio
    mean[0] = 3.0
    x = mean[None, :, None, None] + std[None, :, None, None] * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    return x.astype(np.float32), dy.astype(np.float32)


def measure(ratio):
    rows = []
    x, dy = data(ratio)
    C = x.shape[1]
    rm0, rv0 = np.zeros(C, np.float32), np.ones(C, np.float32)
    ey, emean, einv, erm, erv = ref_fwd(x, None, None, rm0, rv0, momentum=0.1)
    edx, edw, edb = ref_bwd(dy, x, emean, einv)
    try:
        import torch
    except ImportError:
        torch = None
    for layout in ("NCHW", "channels-last"):
        xl = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dyl = dy if layout == "NCHW" else np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        rm, rv = rm0.copy(), rv0.copy()
        y, mean, inv = bncore.batch_norm_forward(xl, None, None, rm, rv, momentum=0.1)
        dx, dw, db = bncore.batch_norm_backward(dyl, xl, mean, inv)
        res = {"impl": "bncore", "layout": layout, "ratio": ratio,
               "y": rel(y, ey), "dx": rel(dx, edx), "dweight": rel(dw, edw), "dbias": rel(db, edb),
               "running_mean": rel(rm, erm), "running_var": rel(rv, erv)}
        rows.append(res)
        if torch is not None:
            fmt = torch.contiguous_format if layout == "NCHW" else torch.channels_last
            tx = torch.from_numpy(x).contiguous(memory_format=fmt).requires_grad_(True)
            trm, trv = torch.from_numpy(rm0.copy()), torch.from_numpy(rv0.copy())
            ty = torch.nn.functional.batch_norm(tx, trm, trv, None, None, True, 0.1, 1e-5)
            (tdx,) = torch.autograd.grad(ty, tx, torch.from_numpy(dy).contiguous(memory_format=fmt))
            rows.append({"impl": f"torch {torch.__version__}", "layout": layout, "ratio": ratio,
                         "y": rel(ty.detach().numpy(), ey), "dx": rel(tdx.numpy(), edx),
                         "dweight": float("nan"), "dbias": float("nan"),
                         "running_mean": rel(trm.numpy(), erm), "running_var": rel(trv.numpy(), erv)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1e3, 1e4, 1e5])
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    rows = [r for ratio in args.ratios for r in measure(ratio)]
    keys = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
    print("| impl | layout | mean/std | " + " | ".join(keys) + " |")
    print("|---" * (3 + len(keys)) + "|")
    for r in rows:
        print(f"| {r['impl']} | {r['layout']} | {r['ratio']:.0e} | "
              + " | ".join("-" if np.isnan(r[k]) else f"{r[k]:.1e}" for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
