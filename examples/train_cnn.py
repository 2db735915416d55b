#!/usr/bin/env python
"""Train a small CNN with bncore as the numeric backend (and, optionally,
check it step for step against the same network in PyTorch).

The network (``examples/cnn_numpy.py``) is conv3x3-BN-ReLU-maxpool twice, then
two fully connected layers; convolutions, pooling, linear layers and the loss
are NumPy, every batch-norm, clipping and optimizer computation is bncore's.
The default data are scikit-learn's bundled 8x8 handwritten digits (1,797
images, no download).

    python examples/train_cnn.py                           # Adam, BN, clip 1.0, 10 epochs
    python examples/train_cnn.py --compare-torch           # + the same network in torch
    python examples/train_cnn.py --optimizer sgd --lr 0.05 --no-bn --clip 0
    python examples/train_cnn.py --dataset my_images.npz   # arrays x (N,H,W | N,C,H,W), y
    python examples/train_cnn.py --device gpu              # CuPy + bncore_gpu

Needs scikit-learn for the default dataset (``pip install "bncore[examples]"``);
tqdm for the progress bar (a plain one is used without it); torch for
``--compare-torch``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cnn_numpy import SmallCNN, count_params, cross_entropy  # noqa: E402

#: learning rate when --lr is not given (torch's default for Adam; RMSprop's is
#: Keras' 1e-3, torch's 1e-2 being too large for this network; SGD has no useful
#: default, 0.01 with momentum 0.9 is the usual starting point)
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "rmsprop": 1e-3}


class SetupError(RuntimeError):
    """What the run needs is missing or unusable (a package, a GPU, the dataset)."""


# --------------------------------------------------------------------------
# configuration

@dataclass
class Config:
    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"            # adam | sgd | rmsprop
    lr: Optional[float] = None         # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9              # SGD only
    batch_norm: bool = True
    clip: Optional[float] = 1.0        # global 2-norm clip; None: no clipping
    seed: int = 0                      # weights and batch order
    split_seed: int = 0                # the train/test split (fixed across --seed)
    test_fraction: float = 0.2
    limit: Optional[int] = None        # use only this many images (a small slice)
    channels: Tuple[int, ...] = (8, 16)
    hidden: int = 64
    device: str = "cpu"                # cpu | gpu
    compare_torch: bool = False
    compare_steps: Optional[int] = None    # None: every step of the run
    threads: Optional[int] = 1         # BLAS/OpenMP threads; None: the libraries' defaults
    stop_on_nonfinite: bool = True

    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray     # (N, C, H, W) float32, standardised with the training mean/std
    y_train: np.ndarray     # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


# --------------------------------------------------------------------------
# data

def _load_arrays(name: str) -> Tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise SetupError("the digits dataset needs scikit-learn: "
                               "pip install scikit-learn (or bncore[examples])") from e
        d = load_digits()
        return d.images.astype(np.float32), d.target.astype(np.int64)
    if not name.endswith(".npz"):
        raise SetupError(f"unknown dataset {name!r}: use 'digits' or a path to an .npz file")
    if not os.path.isfile(name):
        raise SetupError(f"dataset file {name!r} does not exist")
    with np.load(name) as f:
        xkey = next((k for k in ("x", "X", "images", "data") if k in f), None)
        ykey = next((k for k in ("y", "labels", "target") if k in f), None)
        if xkey is None or ykey is None:
            raise SetupError(f"{name} needs an image array (x, X, images or data) and a "
                             f"label array (y, labels or target); it has {sorted(f.files)}")
        return f[xkey].astype(np.float32), f[ykey].astype(np.int64)


def load_dataset(name: str = "digits", *, split_seed: int = 0, test_fraction: float = 0.2,
                 limit: Optional[int] = None) -> Dataset:
    """Images as float32 (N, C, H, W), split at random into train and test.

    Pixels are standardised with the training set's scalar mean and standard
    deviation (the network without BN trains poorly on raw 0..16 values).
    """
    x, y = _load_arrays(name)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise SetupError(f"expected images (N, H, W) or (N, C, H, W) and labels (N,); "
                         f"got {x.shape} and {y.shape}")
    if min(x.shape[2:]) < 4:
        raise SetupError(f"images must be at least 4 x 4 (the network max-pools twice by 2); "
                         f"got {x.shape[2]} x {x.shape[3]}")
    perm = np.random.default_rng(split_seed).permutation(len(x))
    if limit is not None:
        perm = perm[:limit]
    n_test = max(1, int(round(len(perm) * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    xtr = x[train]
    mu, sd = float(xtr.mean()), float(xtr.std()) or 1.0
    standardise = lambda a: np.ascontiguousarray((a - mu) / sd, dtype=np.float32)  # noqa: E731
    n_classes = int(y.max()) + 1
    return Dataset(os.path.basename(name), standardise(xtr), y[train], standardise(x[test]),
                   y[test], n_classes)


def epoch_batches(rng: np.random.Generator, n: int, batch_size: int) -> List[np.ndarray]:
    """A fresh permutation cut into batches; a last batch of one image is dropped
    (batch statistics of one sample per channel are degenerate for BN)."""
    perm = rng.permutation(n)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


# --------------------------------------------------------------------------
# device

def get_device(device: str) -> Tuple[Any, Any]:
    """(array module, bncore implementation) for "cpu" or "gpu".

    The GPU path imports CuPy and ``bncore_gpu`` (the same API as bncore over
    CuPy arrays) only when asked for, and says what is missing otherwise.
    """
    if device == "cpu":
        import bncore
        return np, bncore
    if device != "gpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    try:
        import cupy
    except ImportError as e:
        raise SetupError("--device gpu needs CuPy (pip install cupy-cuda12x, or "
                           "bncore[gpu]) and a CUDA GPU") from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError without a driver
        raise SetupError(f"--device gpu: CuPy is installed but no CUDA GPU is usable ({e})") from e
    if n < 1:
        raise SetupError("--device gpu: CuPy is installed but sees no CUDA GPU")
    try:
        import bncore_gpu
    except ImportError as e:
        raise SetupError("--device gpu needs the bncore_gpu package (bncore's CuPy "
                           f"backend), which could not be imported: {e}") from e
    return cupy, bncore_gpu


@contextlib.contextmanager
def thread_limit(n: Optional[int]):
    """Cap BLAS and OpenMP (hence bncore) threads at n while training.

    A 6k-parameter network on batches of 32 gives every thread microseconds
    of work; more threads only add wake-up latency, which on a busy machine
    reaches milliseconds per GEMM (measured: 3x slower epochs on 2 loaded
    cores). threadpoolctl does it when installed; otherwise this is a no-op.
    """
    if not n:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n):
        yield


# --------------------------------------------------------------------------
# optimizer

def make_optimizer(backend, cfg: Config, params: Sequence[Any]):
    """bncore's optimizer class for cfg.optimizer, PyTorch's formulas and defaults."""
    lr = cfg.resolved_lr()
    if cfg.optimizer == "adam":
        return backend.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if cfg.optimizer == "sgd":
        return backend.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "rmsprop":
        return backend.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8)
    raise ValueError(f"optimizer must be adam, sgd or rmsprop, got {cfg.optimizer!r}")


# --------------------------------------------------------------------------
# progress bar

class _PlainBar:
    """A minimal progress bar on stderr (used when tqdm is not installed)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self.tty = sys.stderr.isatty()

    def update(self, loss: float) -> None:
        self.n += 1
        if self.tty:
            filled = int(30 * self.n / max(self.total, 1))
            sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.n}/{self.total} loss {loss:.4f}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * (len(self.desc) + 60) + "\r")
            sys.stderr.flush()


class _TqdmBar:
    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False)

    def update(self, loss: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _NoBar:
    def update(self, loss: float) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        return _TqdmBar(total, desc)
    except ImportError:
        return _PlainBar(total, desc)


# --------------------------------------------------------------------------
# training

def evaluate(model: SmallCNN, xp, x, y, batch_size: int = 512) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) in inference mode (BN uses running statistics)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model.forward(x[i:i + batch_size])
        loss, _ = cross_entropy(xp, logits, y[i:i + batch_size])
        total_loss += loss * len(logits)
        correct += int((logits.argmax(axis=1) == y[i:i + batch_size]).sum())
    model.train()
    return total_loss / len(x), correct / len(x)


def train_step(model: SmallCNN, opt, backend, xb, yb,
               clip: Optional[float]) -> Tuple[float, Optional[float]]:
    """Forward, backward, clip, update: (loss, gradient norm before clipping)."""
    loss, _ = model.loss_and_grads(xb, yb)
    grads = model.grads()
    norm = None
    if clip is not None:
        # eps=1e-6 is torch's clip_grad_norm_: grads *= clip / (norm + 1e-6) when that is < 1
        norm = backend.clip_grad_norm(grads, clip, eps=1e-6)
    opt.step(grads)
    return loss, norm


def train(cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True,
          data: Optional[Dataset] = None) -> Dict[str, Any]:
    """Train per cfg; return the per-step and per-epoch history (and the torch
    comparison, under "compare", when cfg.compare_torch)."""
    xp, backend = get_device(cfg.device)
    twin_module = None
    if cfg.compare_torch:
        try:
            import torch_twin as twin_module
        except ImportError as e:
            raise SetupError(f"--compare-torch needs PyTorch: {e}") from e
    data = data or load_dataset(cfg.dataset, split_seed=cfg.split_seed,
                                test_fraction=cfg.test_fraction, limit=cfg.limit)
    init_rng, batch_rng = (np.random.default_rng(s)
                           for s in np.random.SeedSequence(cfg.seed).spawn(2))
    model = SmallCNN(xp, backend, init_rng, data.x_train.shape[1:], data.n_classes,
                     channels=cfg.channels, hidden=cfg.hidden, batch_norm=cfg.batch_norm)
    opt = make_optimizer(backend, cfg, model.params())
    hist: Dict[str, Any] = {"config": cfg, "n_params": count_params(model),
                            "n_train": len(data.y_train), "n_test": len(data.y_test),
                            "step_loss": [], "grad_norm": [], "epoch_loss": [],
                            "test_loss": [], "test_acc": [], "epoch_time": [],
                            "diverged_at": None, "model": model}
    log(f"{data.name}: {hist['n_train']} train / {hist['n_test']} test images of shape "
        f"{data.x_train.shape[1:]}, {data.n_classes} classes; {hist['n_params']} parameters; "
        f"{cfg.optimizer} lr {cfg.resolved_lr():g}, BN {'on' if cfg.batch_norm else 'off'}, "
        f"clip {cfg.clip if cfg.clip is not None else 'off'}, device {cfg.device}")
    with thread_limit(cfg.threads):
        # created and closed inside the thread limit: each restores the thread
        # counts it found, so they must be undone in the reverse order
        cmp = None
        if twin_module is not None:
            cmp = twin_module.Comparison(model, cfg.optimizer, cfg.resolved_lr(),
                                         cfg.momentum, cfg.clip, last_step=cfg.compare_steps)
        try:
            run_epochs(cfg, model, opt, backend, xp, data, batch_rng, hist, cmp, log, progress)
        finally:
            if cmp is not None:
                hist["compare"] = cmp.close(model)
    if cmp is not None and hist["compare"]["steps"]:
        twin_module.report(hist["compare"], log)
    return hist


def run_epochs(cfg: Config, model: SmallCNN, opt, backend, xp, data: Dataset,
               batch_rng: np.random.Generator, hist: Dict[str, Any], cmp,
               log: Callable[[str], None], progress: bool) -> None:
    """The training loop; appends to hist's lists as it goes."""
    xtr, ytr = xp.asarray(data.x_train), xp.asarray(data.y_train)
    xte, yte = xp.asarray(data.x_test), xp.asarray(data.y_test)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        batches = epoch_batches(batch_rng, len(data.y_train), cfg.batch_size)
        bar = progress_bar(len(batches), f"epoch {epoch}/{cfg.epochs}", progress)
        losses = []
        for idx in batches:
            ib = xp.asarray(idx)
            loss, norm = train_step(model, opt, backend, xtr[ib], ytr[ib], cfg.clip)
            step += 1
            losses.append(loss)
            hist["grad_norm"].append(norm)
            bar.update(loss)
            if cmp is not None and (cfg.compare_steps is None or step <= cfg.compare_steps):
                cmp.step(model, loss, data.x_train[idx], data.y_train[idx])
            if not math.isfinite(loss) and hist["diverged_at"] is None:
                hist["diverged_at"] = step
                if cfg.stop_on_nonfinite:
                    break
        bar.close()
        hist["step_loss"].extend(losses)
        hist["epoch_loss"].append(float(np.mean(losses)))
        stopped = hist["diverged_at"] is not None and cfg.stop_on_nonfinite
        test_loss, acc = (math.nan, math.nan) if stopped else evaluate(model, xp, xte, yte)
        hist["test_loss"].append(test_loss)
        hist["test_acc"].append(acc)
        hist["epoch_time"].append(time.perf_counter() - t0)
        if stopped:
            log(f"epoch {epoch:3d}: the loss became non-finite at step {hist['diverged_at']}; "
                f"stopping")
            return
        log(f"epoch {epoch:3d}/{cfg.epochs}  loss {hist['epoch_loss'][-1]:.4f}  "
            f"test loss {test_loss:.4f}  test acc {100 * acc:6.2f}%  "
            f"({hist['epoch_time'][-1]:.2f} s)")


# --------------------------------------------------------------------------
# command line

def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits",
                   help="'digits' (scikit-learn's bundled 8x8 digits) or an .npz with x, y")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=("adam", "sgd", "rmsprop"), default="adam")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: adam 1e-3, sgd 1e-2, rmsprop 1e-3)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--no-bn", action="store_true", help="no batch normalization")
    p.add_argument("--clip", type=float, default=1.0,
                   help="global gradient 2-norm clip; 0 turns clipping off (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="weights and batch order")
    p.add_argument("--split-seed", type=int, default=0, help="the train/test split")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--limit", type=int, default=None, help="use only this many images")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--compare-torch", action="store_true",
                   help="step the same network in PyTorch alongside and compare")
    p.add_argument("--compare-steps", type=int, default=None,
                   help="compare this many steps (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS/OpenMP threads while training (0: the libraries' defaults)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = Config(dataset=a.dataset, epochs=a.epochs, batch_size=a.batch_size,
                 optimizer=a.optimizer, lr=a.lr, momentum=a.momentum, batch_norm=not a.no_bn,
                 clip=a.clip if a.clip > 0 else None, seed=a.seed, split_seed=a.split_seed,
                 test_fraction=a.test_fraction, limit=a.limit, device=a.device,
                 compare_torch=a.compare_torch, compare_steps=a.compare_steps,
                 threads=a.threads or None)
    return cfg, a


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg, a = parse_args(argv)
    try:
        train(cfg, progress=not a.no_progress)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
