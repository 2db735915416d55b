#!/usr/bin/env python
"""Measure three tutorial claims on the digits CNN of ``train_cnn.py``:

1. batch normalization speeds up and stabilises convergence;
2. Adam converges faster than SGD with momentum (and RMSprop is shown beside);
3. global-norm gradient clipping prevents blow-ups.

Each configuration is trained from several seeds (weights and batch order;
the train/test split stays fixed) and summarised by the last epoch's mean
training loss, the final test accuracy, the number of epochs until the test
accuracy first reaches 95%, and the number of failed runs (a non-finite loss,
or a final test accuracy under 50%: on ten classes that is a network that
stopped learning, usually every ReLU dead or the logits collapsed to a
constant, which is how a blow-up ends when the cross-entropy caps the
gradient). Everything except the epoch count and the seeds is fixed here, so
the figures in the README can be regenerated:

    python examples/experiments.py                 # 15 epochs, seeds 0-4: ~3-5 min on 2 cores
    python examples/experiments.py --epochs 5 --seeds 0 --out /tmp/quick
    python examples/experiments.py --replot        # redraw from the saved .json

Writes ``<out>.png`` (loss and accuracy curves), ``<out>.md`` (the table) and
``<out>.json`` (every run's per-epoch figures). Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_cnn import Config, load_dataset, train  # noqa: E402

TARGET_ACC = 0.95
FAILED_ACC = 0.50
BASE = Config(optimizer="adam", batch_norm=True, clip=1.0, epochs=15)

# (group, label, config overrides); a configuration listed twice is run once
GRID: List[Tuple[str, str, Dict[str, Any]]] = []
for opt, lr, clip in (("adam", 1e-3, 1.0), ("sgd", 1e-2, 1.0), ("sgd", 1e-1, 1.0),
                      ("sgd", 1e-1, None)):
    for bn in (True, False):
        GRID.append(("bn", f"{opt} lr {lr:g}{'' if clip else ', no clip'}, "
                           f"{'BN' if bn else 'no BN'}",
                     dict(optimizer=opt, lr=lr, batch_norm=bn, clip=clip)))
for opt, lrs in (("adam", (3e-4, 1e-3, 3e-3)), ("sgd", (1e-2, 3e-2, 1e-1)),
                 ("rmsprop", (3e-4, 1e-3, 3e-3))):
    for lr in lrs:
        GRID.append(("optimizer", f"{opt} lr {lr:g}", dict(optimizer=opt, lr=lr)))
for opt, lr, bn in (("adam", 1e-3, True), ("sgd", 1e-1, False), ("adam", 3e-2, False),
                    ("sgd", 3e-1, True), ("adam", 1e-1, True)):
    for clip in (1.0, None):
        GRID.append(("clip", f"{opt} lr {lr:g}, {'BN' if bn else 'no BN'}, "
                             f"{'clip 1' if clip else 'no clip'}",
                     dict(optimizer=opt, lr=lr, batch_norm=bn, clip=clip)))


def _key(cfg: Config) -> Tuple:
    return (cfg.optimizer, cfg.lr, cfg.batch_norm, cfg.clip, cfg.epochs, cfg.seed)


def run_all(epochs: int, seeds: Sequence[int], log=print) -> Dict[Tuple, Dict[str, Any]]:
    """Train every configuration of GRID from every seed (each distinct run once)."""
    data = load_dataset("digits")
    runs: Dict[Tuple, Dict[str, Any]] = {}
    todo = []
    for _, _, over in GRID:
        for seed in seeds:
            cfg = replace(BASE, epochs=epochs, seed=seed, **over)
            if _key(cfg) not in runs:
                runs[_key(cfg)] = {}
                todo.append(cfg)
    t0 = time.perf_counter()
    for i, cfg in enumerate(todo, 1):
        with np.errstate(all="ignore"):     # an exploding run overflows exp() on purpose
            h = train(cfg, log=lambda s: None, progress=False, data=data)
        runs[_key(cfg)] = {k: h[k] for k in ("epoch_loss", "test_loss", "test_acc", "diverged_at")}
        # the largest loss before a run stopped (a NaN step loss would hide it)
        steps = np.asarray(h["step_loss"], dtype=np.float64)
        steps = steps[np.isfinite(steps)]
        runs[_key(cfg)]["max_step_loss"] = float(steps.max()) if steps.size else float("nan")
        log(f"[{i:3d}/{len(todo)}] {cfg.optimizer:7s} lr {cfg.lr:<6g} BN {cfg.batch_norm!s:5s} "
            f"clip {cfg.clip!s:4s} seed {cfg.seed}: loss {h['epoch_loss'][-1]:.4f} "
            f"acc {100 * h['test_acc'][-1]:.1f}%  ({time.perf_counter() - t0:.0f} s)")
    return runs


def _padded(values: Sequence[float], n: int) -> np.ndarray:
    """A stopped (non-finite) run's curve, NaN after the epoch it stopped in."""
    out = np.full(n, np.nan)
    out[:len(values)] = values
    return out


def summarise(runs: Dict[Tuple, Dict[str, Any]], epochs: int, seeds: Sequence[int]):
    """One row per GRID entry: figures over the seeds."""
    rows = []
    for group, label, over in GRID:
        per = [runs[_key(replace(BASE, epochs=epochs, seed=s, **over))] for s in seeds]
        loss = np.array([_padded(r["epoch_loss"], epochs) for r in per])
        acc = np.array([_padded(r["test_acc"], epochs) for r in per])
        final_acc = acc[:, -1]
        failed = [r["diverged_at"] is not None or not (a >= FAILED_ACC)
                  for r, a in zip(per, final_acc)]
        reach = []
        for a in acc:
            hit = np.flatnonzero(a >= TARGET_ACC)
            reach.append(int(hit[0]) + 1 if hit.size else None)
        ok = [e for e in reach if e is not None]
        # means over the seeds that ran to the end (NaN only when none did); the
        # stopped ones are counted in "failed"
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            final_loss = float(np.nanmean(loss[:, -1]))
            acc_mean, acc_std = float(np.nanmean(final_acc)), float(np.nanstd(final_acc))
            worst = float(np.nanmax([r["max_step_loss"] for r in per]))
        rows.append({
            "group": group, "label": label, "config": over,
            "final_loss": final_loss,
            "final_acc_mean": acc_mean, "final_acc_std": acc_std,
            "epochs_to_target": reach,
            "median_epochs_to_target": float(np.median(ok)) if len(ok) == len(reach) else None,
            "failed": int(sum(failed)), "seeds": len(seeds),
            # a blow-up shows as a spike of the per-step loss (ln 10 = 2.3 at chance)
            "max_step_loss": worst,
            "loss_curve": loss.tolist(), "acc_curve": acc.tolist(),
        })
    return rows


def _reach(r: Dict[str, Any]) -> str:
    e = r["epochs_to_target"]
    got = [x for x in e if x is not None]
    if not got:
        return "never"
    med = np.median(got)
    s = f"{med:g}"
    if len(got) < len(e):
        s += f" ({len(got)}/{len(e)} runs)"
    return s


def _fmt_big(v: float) -> str:
    return f"{v:.1f}" if v < 1e4 else f"{v:.1e}"


def markdown_table(rows: List[Dict[str, Any]], epochs: int, seeds: Sequence[int]) -> str:
    names = {"bn": "BN", "optimizer": "optimizer (BN, clip 1)", "clip": "clipping"}
    out = [f"| experiment | configuration | train loss, epoch {epochs} | test accuracy | "
           f"epochs to {100 * TARGET_ACC:.0f}% | failed runs | worst step loss |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {names[r['group']]} | {r['label']} | {r['final_loss']:.3f} | "
                   f"{100 * r['final_acc_mean']:.1f}% ± {100 * r['final_acc_std']:.1f} | "
                   f"{_reach(r)} | {r['failed']}/{r['seeds']} | {_fmt_big(r['max_step_loss'])} |")
    out.append("")
    out.append(f"Means over seeds {', '.join(map(str, seeds))} (± is the standard deviation); "
               f"{epochs} epochs of {BASE.batch_size}-image batches on scikit-learn's digits "
               f"(1,438 train / 359 test). Unless stated, BN on and global-norm clip 1.0. "
               f"\"epochs to {100 * TARGET_ACC:.0f}%\": median over the runs that got there; "
               f"\"failed\": final test accuracy under {100 * FAILED_ACC:.0f}% or a non-finite loss; "
               f"\"worst step loss\": the largest single-batch training loss of any seed "
               f"(a fresh network starts at about ln 10 = 2.3).")
    return "\n".join(out) + "\n"


def plot(rows: List[Dict[str, Any]], path: str, epochs: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("bn", "batch normalization"), ("optimizer", "optimizers (BN, clip 1)"),
              ("clip", "clipping (lr 1e-3 for adam is the default; the rest are high)")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.6), sharex=True)
    x = np.arange(1, epochs + 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (group, title) in enumerate(groups):
        rs = [r for r in rows if r["group"] == group]
        if group == "optimizer":
            # each optimizer at its best learning rate (lowest final loss), solid;
            # the other rates dotted and thin
            best = {}
            for r in rs:
                o = r["config"]["optimizer"]
                if o not in best or r["final_loss"] < best[o]["final_loss"]:
                    best[o] = r
            styles = [(r, colors[list(best).index(r["config"]["optimizer"])],
                       "-" if best[r["config"]["optimizer"]] is r else ":",
                       2.0 if best[r["config"]["optimizer"]] is r else 1.0) for r in rs]
        else:
            pairs: Dict[str, int] = {}
            styles = []
            for r in rs:
                c = dict(r["config"])
                solid = c.pop("batch_norm", True) if group == "bn" else c.pop("clip", None) is not None
                if group == "clip":
                    c.pop("batch_norm", None)
                    c["bn"] = r["config"]["batch_norm"]
                k = str(sorted(c.items()))
                pairs.setdefault(k, len(pairs))
                styles.append((r, colors[pairs[k] % len(colors)], "-" if solid else "--", 1.6))
        for r, color, ls, lw in styles:
            loss = np.nanmean(np.array(r["loss_curve"], float), axis=0)
            acc = np.nanmean(np.array(r["acc_curve"], float), axis=0)
            axes[0, col].plot(x, loss, ls, color=color, lw=lw, label=r["label"])
            axes[1, col].plot(x, 100 * acc, ls, color=color, lw=lw)
        axes[0, col].set_title(title, fontsize=10)
        axes[0, col].set_yscale("log")
        axes[1, col].legend(*axes[0, col].get_legend_handles_labels(), fontsize=7.5, ncol=2,
                            loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        axes[1, col].set_xlabel("epoch")
        axes[1, col].set_xticks(x[::max(1, epochs // 8)])
        axes[1, col].set_ylim(0, 100)
        axes[1, col].axhline(100 * TARGET_ACC, color="0.7", lw=0.8)
    axes[0, 0].set_ylabel("training loss (epoch mean, mean over seeds)")
    axes[1, 0].set_ylabel("test accuracy % (mean over seeds)")
    fig.suptitle("digits CNN trained through bncore. Solid: BN on (left), each optimizer at "
                 "its best learning rate (middle), clipping on (right); dashed: BN / clipping "
                 "off; dotted: the other learning rates", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="BN, optimizer and clipping experiments")
    p.add_argument("--epochs", type=int, default=BASE.epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "docs",
                                                                  "cnn_experiments")),
                   help="output path without extension (.png, .md, .json are written)")
    p.add_argument("--replot", action="store_true",
                   help="redraw the plot and table from <out>.json without training")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:                               # before minutes of training, not after
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: experiments.py draws its plot with matplotlib: "
              "pip install -e '.[examples]'", file=sys.stderr)
        return 2
    if a.replot:
        with open(a.out + ".json") as f:
            saved = json.load(f)
        rows, a.epochs, a.seeds = saved["rows"], saved["epochs"], saved["seeds"]
    else:
        rows = summarise(run_all(a.epochs, a.seeds), a.epochs, a.seeds)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    table = markdown_table(rows, a.epochs, a.seeds)
    with open(a.out + ".md", "w") as f:
        f.write(table)
    if not a.replot:
        with open(a.out + ".json", "w") as f:
            json.dump({"base": asdict(BASE), "epochs": a.epochs, "seeds": a.seeds,
                       "seconds": round(time.perf_counter() - t0), "rows": rows},
                      f, default=str)
    plot(rows, a.out + ".png", a.epochs)
    print(table)
    print(f"wrote {a.out}.png, .md{'' if a.replot else ', .json'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
