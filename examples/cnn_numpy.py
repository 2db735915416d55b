"""A small CNN whose convolutions, pooling, linear layers and loss are NumPy
(or CuPy) code, and whose batch normalization is bncore's (or bncore_gpu's).

Every layer keeps what its backward pass needs and exposes ``params`` /
``grads`` as parallel lists of arrays in a fixed order, so that an optimizer
(``bncore.optim.Adam``) and ``bncore.clip_grad_norm`` can take them as they
are and update the parameters in place.

``xp`` is the array module (``numpy`` or ``cupy``) and ``backend`` the bncore
implementation on the same device (``bncore`` or ``bncore_gpu``); nothing here
names either directly, so the same code runs on both.

Layout and formulas follow PyTorch (``nn.Conv2d``, ``nn.MaxPool2d``,
``nn.Linear``, ``nn.CrossEntropyLoss``), so the network can be mirrored in
torch weight for weight (``examples/train_cnn.py --compare-torch``).
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

import numpy as np


def uniform_init(rng: np.random.Generator, shape: Tuple[int, ...], fan_in: int) -> np.ndarray:
    """PyTorch's default for Conv2d and Linear weights and biases.

    ``kaiming_uniform_(a=sqrt(5))`` gives ``bound = gain * sqrt(3 / fan_in)`` with
    ``gain = sqrt(2 / (1 + a^2)) = sqrt(1/3)``, i.e. ``bound = 1 / sqrt(fan_in)``;
    the bias uses the same bound. Drawn on the host so CPU and GPU runs (and
    the torch twin) start from identical weights.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


class Conv2d:
    """Stride-1 convolution with zero padding, as im2col + one GEMM.

    With ``cols[(n, i, j), (c, u, v)] = xpad[n, c, i + u, j + v]`` the
    forward pass is ``y = cols @ W.reshape(Cout, -1).T (+ b)``; backward is
    ``dW = dy^T @ cols``, ``db = sum(dy)`` and ``dcols = dy @ W``, whose entries
    are scattered back onto the (padded) input positions they were read from.
    """

    def __init__(self, xp, rng: np.random.Generator, cin: int, cout: int, k: int = 3,
                 pad: int = 1, bias: bool = True) -> None:
        self.xp, self.k, self.pad = xp, k, pad
        fan_in = cin * k * k
        self.weight = xp.asarray(uniform_init(rng, (cout, cin, k, k), fan_in))
        self.bias = xp.asarray(uniform_init(rng, (cout,), fan_in)) if bias else None
        self.grad_weight = self.grad_bias = None
        self._saved = None

    @property
    def params(self) -> List[Any]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def grads(self) -> List[Any]:
        return [self.grad_weight] + ([self.grad_bias] if self.bias is not None else [])

    def forward(self, x):
        xp, k, p = self.xp, self.k, self.pad
        n, c, h, w = x.shape
        ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
        xpad = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        # (n, c, u, v, ho, wo) -> rows (n, ho, wo), columns (c, u, v): W's own order
        cols = xp.empty((n, c, k, k, ho, wo), dtype=x.dtype)
        for u in range(k):
            for v in range(k):
                cols[:, :, u, v] = xpad[:, :, u:u + ho, v:v + wo]
        cols = cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * k * k)
        cout = self.weight.shape[0]
        y = cols @ self.weight.reshape(cout, -1).T
        if self.bias is not None:
            y += self.bias
        self._saved = (cols, x.shape)
        return xp.ascontiguousarray(y.reshape(n, ho, wo, cout).transpose(0, 3, 1, 2))

    def backward(self, dy):
        xp, k, p = self.xp, self.k, self.pad
        cols, (n, c, h, w) = self._saved
        cout, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, cout)
        self.grad_weight = (dy2.T @ cols).reshape(self.weight.shape)
        if self.bias is not None:
            self.grad_bias = dy2.sum(axis=0)
        dcols = (dy2 @ self.weight.reshape(cout, -1)).reshape(n, ho, wo, c, k, k)
        dxpad = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dy.dtype)
        for u in range(k):
            for v in range(k):
                dxpad[:, :, u:u + ho, v:v + wo] += dcols[:, :, :, :, u, v].transpose(0, 3, 1, 2)
        return dxpad[:, :, p:p + h, p:p + w] if p else dxpad


def pool_windows(x):
    """(N, C, H, W) -> (N, C, H//2, W//2, 4): each 2x2 window in row-major order."""
    n, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    xc = x[:, :, :2 * h2, :2 * w2]
    return xc.reshape(n, c, h2, 2, w2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h2, w2, 4)


class MaxPool2d:
    """2x2 max pooling, stride 2, odd edges dropped (torch's floor mode).

    The gradient goes to the first maximum of each window in row-major order,
    which is where ``torch.nn.MaxPool2d`` sends it too, so ties agree.
    """

    def __init__(self, xp) -> None:
        self.xp = xp
        self.params: List[Any] = []
        self.grads: List[Any] = []
        self._saved = None

    def forward(self, x):
        win = pool_windows(x)
        idx = win.argmax(axis=-1)
        self._saved = (idx, x.shape)
        return win.max(axis=-1)

    @property
    def argmax(self):
        """Which entry of each window won in the last forward (0..3, row-major)."""
        return self._saved[0]

    def backward(self, dy):
        xp = self.xp
        idx, (n, c, h, w) = self._saved
        h2, w2 = dy.shape[2], dy.shape[3]
        onehot = idx[..., None] == xp.arange(4)
        dwin = onehot * dy[..., None]
        dxc = dwin.reshape(n, c, h2, w2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h2, 2 * w2)
        if (2 * h2, 2 * w2) == (h, w):
            return dxc
        dx = xp.zeros((n, c, h, w), dtype=dy.dtype)
        dx[:, :, :2 * h2, :2 * w2] = dxc
        return dx


class ReLU:
    """``y = max(x, 0)``; the gradient passes where ``y > 0`` (torch's threshold_backward)."""

    def __init__(self, xp) -> None:
        self.xp = xp
        self.params: List[Any] = []
        self.grads: List[Any] = []
        self._mask = None

    def forward(self, x):
        y = self.xp.maximum(x, 0)
        self._mask = y > 0
        return y

    def backward(self, dy):
        return dy * self._mask


class Flatten:
    """(N, C, H, W) -> (N, C*H*W) in C order, as ``torch.flatten(x, 1)``."""

    def __init__(self) -> None:
        self.params: List[Any] = []
        self.grads: List[Any] = []
        self._shape = None

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


class Linear:
    """``y = x W^T + b``, W of shape (out, in) as in torch; ``dW = dy^T x``, ``dx = dy W``."""

    def __init__(self, xp, rng: np.random.Generator, fin: int, fout: int) -> None:
        self.weight = xp.asarray(uniform_init(rng, (fout, fin), fin))
        self.bias = xp.asarray(uniform_init(rng, (fout,), fin))
        self.grad_weight = self.grad_bias = None
        self._x = None

    @property
    def params(self) -> List[Any]:
        return [self.weight, self.bias]

    @property
    def grads(self) -> List[Any]:
        return [self.grad_weight, self.grad_bias]

    def forward(self, x):
        self._x = x
        return x @ self.weight.T + self.bias

    def backward(self, dy):
        self.grad_weight = dy.T @ self._x
        self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight


class BatchNorm2d:
    """The backend's ``BatchNorm`` layer (PyTorch convention: momentum 0.1,
    eps 1e-5, unbiased running variance) seen as a layer of this network."""

    def __init__(self, backend, channels: int) -> None:
        self.bn = backend.BatchNorm(channels)

    @property
    def params(self) -> List[Any]:
        return [self.bn.weight, self.bn.bias]

    @property
    def grads(self) -> List[Any]:
        return [self.bn.grad_weight, self.bn.grad_bias]

    def forward(self, x):
        return self.bn.forward(x)

    def backward(self, dy):
        return self.bn.backward(dy)

    def train(self, mode: bool = True) -> None:
        self.bn.train(mode)


def cross_entropy(xp, logits, labels) -> Tuple[float, Any]:
    """Mean softmax cross-entropy and its gradient with respect to the logits.

    ``loss = mean_n (logsumexp(z_n) - z_n[y_n])`` with the max subtracted first
    (``logsumexp(z) = m + log sum exp(z - m)``) so that large logits do not
    overflow; ``dloss/dz = (softmax(z) - onehot(y)) / N``. The per-sample
    terms are float32 like torch's; their mean is taken in float64.
    """
    n = logits.shape[0]
    m = logits.max(axis=1, keepdims=True)
    shifted = logits - m
    e = xp.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    logp = shifted - xp.log(s)
    rows = xp.arange(n)
    loss = float(-(logp[rows, labels].astype(xp.float64)).mean())
    grad = e / s
    grad[rows, labels] -= 1
    grad /= n
    return loss, grad


class SmallCNN:
    """conv3x3-[BN]-ReLU-maxpool, twice, then Linear-ReLU-Linear.

    For 8x8 digits with the defaults: 1x8x8 -> 8x8x8 -> 8x4x4 -> 16x4x4 ->
    16x2x2 -> 64 -> 64 -> 10 (6,082 parameters with BN). With batch
    normalization the convolutions have no bias: BN subtracts the per-channel
    mean, so a bias there has zero gradient and does nothing.
    """

    def __init__(self, xp, backend, rng: np.random.Generator, in_shape: Tuple[int, int, int],
                 n_classes: int, channels: Sequence[int] = (8, 16), hidden: int = 64,
                 batch_norm: bool = True) -> None:
        self.xp = xp
        self.batch_norm = batch_norm
        c, h, w = in_shape
        self.layers: List[Tuple[str, Any]] = []
        for i, cout in enumerate(channels, start=1):
            self.layers.append((f"conv{i}", Conv2d(xp, rng, c, cout, 3, 1, bias=not batch_norm)))
            if batch_norm:
                self.layers.append((f"bn{i}", BatchNorm2d(backend, cout)))
            self.layers.append((f"relu{i}", ReLU(xp)))
            self.layers.append((f"pool{i}", MaxPool2d(xp)))
            c, h, w = cout, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {in_shape} is too small for {len(channels)} 2x2 poolings")
        self.layers.append(("flatten", Flatten()))
        self.layers.append(("fc1", Linear(xp, rng, c * h * w, hidden)))
        self.layers.append(("relu_fc", ReLU(xp)))
        self.layers.append(("fc2", Linear(xp, rng, hidden, n_classes)))

    def named_params(self) -> List[Tuple[str, Any]]:
        """(name, array) in the order used everywhere: layer order, weight before bias."""
        out = []
        for lname, layer in self.layers:
            for pname, p in zip(("weight", "bias"), layer.params):
                out.append((f"{lname}.{pname}", p))
        return out

    def params(self) -> List[Any]:
        return [p for _, p in self.named_params()]

    def grads(self) -> List[Any]:
        return [g for _, layer in self.layers for g in layer.grads]

    def train(self, mode: bool = True) -> None:
        """Training mode: BN normalises with batch statistics and updates the running ones."""
        for _, layer in self.layers:
            if hasattr(layer, "train"):
                layer.train(mode)

    def eval(self) -> None:
        self.train(False)

    def forward(self, x):
        for _, layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dlogits) -> None:
        d = dlogits
        for _, layer in reversed(self.layers):
            d = layer.backward(d)

    def loss_and_grads(self, x, labels) -> Tuple[float, Any]:
        """Forward, loss, backward: afterwards ``grads()`` holds this batch's gradients."""
        logits = self.forward(x)
        loss, dlogits = cross_entropy(self.xp, logits, labels)
        self.backward(dlogits)
        return loss, logits

    def running_stats(self) -> List[Tuple[str, Any]]:
        """(name, array) for every BN running mean and variance."""
        out = []
        for lname, layer in self.layers:
            if isinstance(layer, BatchNorm2d):
                out.append((f"{lname}.running_mean", layer.bn.running_mean))
                out.append((f"{lname}.running_var", layer.bn.running_var))
        return out


def count_params(model: SmallCNN) -> int:
    return int(sum(int(np.prod(p.shape)) for p in model.params()))

