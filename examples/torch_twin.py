"""The example's network in PyTorch, stepped beside the bncore model.

``--compare-torch`` builds two twins of the NumPy/bncore model with its
initial weights: one in float32 (what is compared) and one in float64 (the
yardstick). Both take torch's own ``nn.BatchNorm2d``, ``clip_grad_norm_`` and
optimizer on the same batches. The float64 twin says how far *any* float32
implementation of this trajectory drifts through rounding alone, so the
difference between bncore and torch can be read against it: bncore and torch
agree "to float32 precision" when their difference is no larger than torch's
own distance from float64.

Imported only when a comparison is asked for (it needs torch).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from cnn_numpy import SmallCNN, pool_windows

#: float32 machine epsilon, 2^-23: "agree to float32 precision" is counted in it
F32_EPS = float(np.finfo(np.float32).eps)

#: per-step relative loss difference taken as "the same to float32 precision":
#: about 84 eps, room for different BLAS kernels and summation orders in the
#: ~6 float32 layers between the weights and the loss (measured: about 1 eps)
LOSS_RTOL = 1e-5

#: step counts after which parameters are compared (and the last step)
CHECKPOINTS = (1, 10, 100, 1000)

Diff = Tuple[float, float, str]     # (largest |a - b|, that / largest |b| of the tensor, name)


def host(a) -> np.ndarray:
    """A NumPy copy of a NumPy, CuPy or torch array."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def max_diff(a: Sequence[Tuple[str, Any]], b: Dict[str, Any]) -> Diff:
    """The largest elementwise |a - b| over named tensors (in float64)."""
    best: Diff = (0.0, 0.0, "")
    for name, x in a:
        xa = host(x).astype(np.float64)
        xb = host(b[name]).astype(np.float64)
        d = float(np.max(np.abs(xa - xb)))
        if not d <= best[0]:      # NaN wins too
            best = (d, d / max(float(np.max(np.abs(xb))), 1e-30), name)
    return best


def _module(layer) -> nn.Module:
    kind = type(layer).__name__
    if kind == "Conv2d":
        cout, cin, k, _ = layer.weight.shape
        return nn.Conv2d(cin, cout, k, padding=layer.pad, bias=layer.bias is not None)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(layer.bn.num_features, eps=layer.bn.eps, momentum=layer.bn.momentum)
    if kind == "ReLU":
        return nn.ReLU()
    if kind == "MaxPool2d":
        return nn.MaxPool2d(2)
    if kind == "Flatten":
        return nn.Flatten()
    if kind == "Linear":
        fout, fin = layer.weight.shape
        return nn.Linear(fin, fout)
    raise TypeError(f"no torch twin for {kind}")


class TorchTwin:
    """The same network in PyTorch (CPU), the model's weights copied in,
    trained by torch's optimizer and ``clip_grad_norm_`` with the same
    hyperparameters.

    It keeps the input of each max-pooling layer, so that a step where torch
    and bncore's model take a window's maximum from different entries (a
    near-tie decided by rounding) can be found: from such a step on the
    gradient flows through another pixel and the trajectories separate by
    more than rounding.
    """

    def __init__(self, model: SmallCNN, optimizer: str, lr: float, momentum: float,
                 clip: Optional[float], dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.np_dtype = np.float32 if dtype == torch.float32 else np.float64
        self.net = nn.Sequential(OrderedDict((n, _module(l)) for n, l in model.layers))
        self.net.to(dtype).train()
        self._pool_inputs: Dict[str, np.ndarray] = {}
        for lname, mod in self.net.named_children():
            if isinstance(mod, nn.MaxPool2d):
                mod.register_forward_hook(self._keep_input(lname))
        tparams = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, p in model.named_params():
                tparams[name].copy_(torch.from_numpy(host(p)))
        self.params = [tparams[name] for name, _ in model.named_params()]
        if optimizer == "adam":
            self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        elif optimizer == "sgd":
            self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        elif optimizer == "rmsprop":
            self.opt = torch.optim.RMSprop(self.params, lr=lr, alpha=0.99, eps=1e-8)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        self.clip = clip

    def _keep_input(self, lname: str) -> Callable:
        def hook(module, inputs, output) -> None:
            self._pool_inputs[lname] = host(inputs[0]).copy()
        return hook

    def pool_flips(self, model: SmallCNN) -> int:
        """Windows of the last step whose maximum torch and the model took from
        different entries. Both take the first maximum, so exact ties agree;
        only near-ties that rounding decides can differ."""
        n = 0
        for lname, layer in model.layers:
            if lname in self._pool_inputs:
                theirs = pool_windows(self._pool_inputs[lname]).argmax(axis=-1)
                n += int((theirs != host(layer.argmax)).sum())
        return n

    def step(self, xb: np.ndarray, yb: np.ndarray) -> float:
        """One training step on the batch; returns the loss before it."""
        self.opt.zero_grad(set_to_none=True)
        x = torch.from_numpy(np.ascontiguousarray(xb, dtype=self.np_dtype))
        loss = nn.functional.cross_entropy(self.net(x), torch.from_numpy(yb))
        loss.backward()
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip)     # coef = clip / (norm + 1e-6)
        self.opt.step()
        return loss.item()

    def state(self) -> Dict[str, torch.Tensor]:
        return self.net.state_dict()


class Comparison:
    """Steps the float32 and float64 twins beside the bncore model and keeps
    the figures: per-step losses, max-pool routing differences, parameter and
    running-statistic differences after CHECKPOINTS steps."""

    def __init__(self, model: SmallCNN, optimizer: str, lr: float, momentum: float,
                 clip: Optional[float], last_step: Optional[int] = None) -> None:
        # the step after which comparing stops (None: every step of the run); the
        # model keeps training past it, so its parameters must be taken then
        self.last_step = last_step
        # one thread: torch's and bncore's OpenMP pools spinning on the same
        # cores slow a network this small down several-fold; restored by close()
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        args = (model, optimizer, lr, momentum, clip)
        self.t32 = TorchTwin(*args, dtype=torch.float32)
        self.t64 = TorchTwin(*args, dtype=torch.float64)
        self.bncore_loss: List[float] = []
        self.torch_loss: List[float] = []
        self.flips: List[int] = []
        self.checkpoints: Dict[int, Dict[str, Diff]] = {}

    def step(self, model: SmallCNN, loss: float, xb: np.ndarray, yb: np.ndarray) -> None:
        """After the model's step on (xb, yb): the twins' steps on the same batch."""
        self.bncore_loss.append(loss)
        self.torch_loss.append(self.t32.step(xb, yb))
        self.t64.step(xb, yb)
        self.flips.append(self.t32.pool_flips(model))
        if len(self.bncore_loss) in CHECKPOINTS or len(self.bncore_loss) == self.last_step:
            self._measure(model)

    def _measure(self, model: SmallCNN) -> None:
        params = model.named_params()
        s32, s64 = self.t32.state(), self.t64.state()
        d = {"params": max_diff(params, s32),
             "bncore_vs_f64": max_diff(params, s64),
             "torch_vs_f64": max_diff([(n, s32[n]) for n, _ in params], s64)}
        if model.running_stats():
            d["stats"] = max_diff(model.running_stats(), s32)
        self.checkpoints[len(self.bncore_loss)] = d

    def close(self, model: SmallCNN) -> Dict[str, Any]:
        """Restore torch's thread count; the summary (see summarise)."""
        torch.set_num_threads(self._threads)
        k = len(self.bncore_loss)
        # the model's state is the state after step k only if the run ended there
        if k and k not in self.checkpoints and (self.last_step is None or k < self.last_step):
            self._measure(model)
        return summarise(self.bncore_loss, self.torch_loss, self.flips, self.checkpoints)


def summarise(bn_loss: Sequence[float], torch_loss: Sequence[float], flips: Sequence[int],
              checkpoints: Dict[int, Dict[str, Diff]], first: int = 10) -> Dict[str, Any]:
    """The comparison's figures; loss differences are |l_bncore - l_torch| / |l_torch|."""
    a = np.asarray(bn_loss, np.float64)
    b = np.asarray(torch_loss, np.float64)
    steps = len(a)
    if steps == 0:
        return {"steps": 0}
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
    over = np.flatnonzero(~(rel <= LOSS_RTOL))
    flipped = np.flatnonzero(np.asarray(flips) > 0)
    return {"steps": steps, "bncore_loss": a.tolist(), "torch_loss": b.tolist(),
            "rel_loss_diff": rel.tolist(), "first": min(first, steps),
            "max_rel_loss_diff_first": float(rel[:first].max()),
            "max_rel_loss_diff_all": float(rel.max()),
            # 1-based step numbers, None for never
            "first_step_over_rtol": int(over[0]) + 1 if over.size else None,
            "first_pool_flip": int(flipped[0]) + 1 if flipped.size else None,
            "pool_flips": [int(f) for f in flips],
            "checkpoints": dict(sorted(checkpoints.items()))}


def report(c: Dict[str, Any], log: Callable[[str], None] = print) -> None:
    """Print the comparison: first losses, agreement, parameter differences."""
    log(f"\nbncore vs PyTorch {torch.__version__} (same weights, same batches), "
        f"{c['steps']} steps:")
    log("  step   bncore loss     torch loss      |diff|/loss   in float32 eps")
    for k in range(min(5, c["steps"])):
        r = c["rel_loss_diff"][k]
        log(f"  {k + 1:4d}   {c['bncore_loss'][k]:.9f}     {c['torch_loss'][k]:.9f}     "
            f"{r:.2e}      {r / F32_EPS:6.2f}")
    r1, ra = c["max_rel_loss_diff_first"], c["max_rel_loss_diff_all"]
    log(f"  largest |diff|/loss, first {c['first']} steps: {r1:.2e} ({r1 / F32_EPS:.1f} eps); "
        f"all {c['steps']} steps: {ra:.2e}")
    over, flip = c["first_step_over_rtol"], c["first_pool_flip"]
    log(f"  losses within {LOSS_RTOL:g} (relative) "
        + ("at every step" if over is None else f"up to step {over - 1}"))
    if flip is None:
        log("  max pooling took every window's maximum from the same entry in both, every step")
    else:
        log(f"  step {flip}: first max-pool window whose maximum the two took from different "
            f"entries (a near-tie that rounding decides); the gradient then flows through "
            f"another pixel and the trajectories separate")
    log("  largest parameter difference after k steps (and, as the yardstick, each one's "
        "distance from torch in float64):")
    for k, d in c["checkpoints"].items():
        p, b64, t64 = d["params"], d["bncore_vs_f64"], d["torch_vs_f64"]
        line = (f"  {k:5d}: bncore-torch {p[0]:.2e} ({p[2]}, {p[1]:.1e} of its max |value|); "
                f"from float64: bncore {b64[0]:.2e}, torch {t64[0]:.2e}")
        if "stats" in d:
            line += f"; running stats {d['stats'][0]:.2e}"
        log(line)
