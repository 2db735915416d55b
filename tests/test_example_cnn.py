"""The worked example (examples/train_cnn.py): it trains, and it matches PyTorch.

Two epochs on a 400-image slice of scikit-learn's digits (320 train / 80 test,
20 steps of 32), with torch twins in float32 and float64 stepped beside it
(examples/torch_twin.py). Criteria, for Adam, SGD with momentum and RMSprop:

* loss, every step: |l_bncore - l_torch| / l_torch <= LOSS_RTOL = 1e-5 (~84
  float32 eps), and <= 8 eps at step 1. Measured: <= 1.4e-7 (1.2 eps).
* parameters after 1, 10 and 20 steps: |p_bncore - p_torch| <= max(1e-6,
  2 * |p_torch - p_torch_float64|), i.e. bncore and torch differ by no more
  than twice torch's own float32 rounding drift on this trajectory. Measured:
  3% (Adam, SGD) and 23% (RMSprop, whose first steps move each weight by about
  10 * lr whatever the gradient, so rounding in small gradients shows) of that.
* BN running statistics: <= 1e-5 relative. Measured: 2.4e-7.

Simulated bugs (the same change in both torch twins, so that bncore is the
odd one out): BN eps 1e-4 for 1e-5, BN momentum 0.01, optimizer eps 1e-7,
SGD momentum 0.89, a learning rate 1% off, a clip at 0.9 or 0.99, no clip:
each fails at least one criterion for every optimizer, except a clip at
0.99 with Adam (always-active clipping only rescales the gradient, which
Adam's m / sqrt(v) cancels; SGD and RMSprop catch it).

Agreement is asserted up to the first step where max pooling takes a window's
maximum from different entries in the two implementations (a near-tie that
rounding decides; after it the trajectories legitimately separate). On the
full dataset that first happens at step 194; here it does not happen, and at
least 10 comparable steps are required.
"""
import importlib.util
import math
import os
import sys

import numpy as np
import pytest

# BNCORE_EXAMPLE_DATASET names an .npz copy of the digits (x, y) for machines
# without scikit-learn (the GPU check machine); otherwise scikit-learn's own copy.
DATASET = os.environ.get("BNCORE_EXAMPLE_DATASET", "digits")
if DATASET == "digits":
    pytest.importorskip("sklearn", reason="the example's dataset ships with scikit-learn")

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


def _load(name):
    """Import examples/<name>.py (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


train_cnn = _load("train_cnn")

SLICE = dict(epochs=2, limit=400, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def data():
    return train_cnn.load_dataset(DATASET, limit=SLICE["limit"])


def test_loss_goes_down(data):
    cfg = train_cnn.Config(**SLICE)
    h = train_cnn.train(cfg, log=lambda s: None, progress=False, data=data)
    assert len(h["epoch_loss"]) == 2 and h["diverged_at"] is None
    assert all(math.isfinite(v) for v in h["step_loss"])
    # the first epoch's mean starts near ln(10) = 2.30 for a fresh network
    assert h["epoch_loss"][1] < h["epoch_loss"][0] - 0.05, h["epoch_loss"]
    assert h["test_loss"][1] < h["test_loss"][0], h["test_loss"]
    assert np.mean(h["step_loss"][-5:]) < np.mean(h["step_loss"][:5]) - 0.1


def test_deterministic(data):
    cfg = train_cnn.Config(**dict(SLICE, epochs=1))
    a = train_cnn.train(cfg, log=lambda s: None, progress=False, data=data)
    b = train_cnn.train(cfg, log=lambda s: None, progress=False, data=data)
    assert a["step_loss"] == b["step_loss"]
    for p, q in zip(a["model"].params(), b["model"].params()):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop"])
def test_agrees_with_torch(data, optimizer):
    pytest.importorskip("torch")
    torch_twin = _load("torch_twin")
    import torch

    cfg = train_cnn.Config(**SLICE, optimizer=optimizer, compare_torch=True)
    lines = []
    threads = torch.get_num_threads()
    h = train_cnn.train(cfg, log=lines.append, progress=False, data=data)
    # the comparison runs torch on one thread; it must give the others back
    assert torch.get_num_threads() == threads
    report = "\n".join(lines)
    c = h["compare"]
    assert c["steps"] == 20
    flip = c["first_pool_flip"]
    n_ok = c["steps"] if flip is None else flip
    assert n_ok >= 10, f"max pooling routed differently already at step {flip}\n{report}"
    rel = np.asarray(c["rel_loss_diff"][:n_ok])
    # step 1 is one forward pass apart, nothing accumulated yet: a few eps
    assert rel[0] <= 8 * torch_twin.F32_EPS, report
    assert rel.max() <= torch_twin.LOSS_RTOL, report
    for step, d in c["checkpoints"].items():
        if step > n_ok:
            continue
        # bncore and torch (float32) differ by at most twice torch's own
        # distance from the float64 twin, or 1e-6 (~10 ulp of an O(0.1) weight)
        allowed = max(1e-6, 2 * d["torch_vs_f64"][0])
        assert d["params"][0] <= allowed, (step, d, report)
        assert d["stats"][1] <= 1e-5, (step, d, report)
    assert "bncore vs PyTorch" in report


def test_compare_steps_takes_parameters_at_its_last_step(data):
    """--compare-steps k on a longer run: the last checkpoint is step k's state,
    not the model's state at the end of training (which is many steps on)."""
    pytest.importorskip("torch")
    cfg = train_cnn.Config(**SLICE, compare_torch=True, compare_steps=12)
    h = train_cnn.train(cfg, log=lambda s: None, progress=False, data=data)
    c = h["compare"]
    assert c["steps"] == 12 and len(h["step_loss"]) == 20
    assert sorted(c["checkpoints"]) == [1, 10, 12]
    d = c["checkpoints"][12]
    assert d["params"][0] <= max(1e-6, 2 * d["torch_vs_f64"][0]), d


def test_no_bn_and_no_clip_run(data):
    cfg = train_cnn.Config(**dict(SLICE, epochs=1), batch_norm=False, clip=None,
                           optimizer="sgd", lr=0.05)
    h = train_cnn.train(cfg, log=lambda s: None, progress=False, data=data)
    assert h["grad_norm"] == [None] * len(h["step_loss"])
    assert not any(name.startswith("bn") for name, _ in h["model"].named_params())
    assert h["step_loss"][-1] < h["step_loss"][0]


def test_stops_on_a_non_finite_loss(data):
    """SGD at lr 1e3 without clipping overflows within a few steps: the run
    stops there and says so instead of training on NaN."""
    cfg = train_cnn.Config(**SLICE, optimizer="sgd", lr=1e3, clip=None, batch_norm=False)
    lines = []
    with np.errstate(all="ignore"):
        h = train_cnn.train(cfg, log=lines.append, progress=False, data=data)
    k = h["diverged_at"]
    assert k is not None and k == len(h["step_loss"]) and k < 10
    assert not math.isfinite(h["step_loss"][-1])
    assert len(h["epoch_loss"]) == 1 and math.isnan(h["test_acc"][0])
    assert "non-finite" in lines[-1]


def test_command_line(capsys):
    rc = train_cnn.main(["--epochs", "1", "--limit", "200", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "epoch   1/1" in out and "test acc" in out


def test_other_datasets_from_npz(tmp_path, capsys):
    """Any images (N, H, W) or (N, C, H, W) with integer labels; here 14x14
    three-channel images: the second pooling gets 7x7 and drops the odd row
    and column (torch's floor mode), checked against torch where it is installed."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    x = rng.standard_normal((120, 3, 14, 14)).astype(np.float32) + y[:, None, None, None]
    path = tmp_path / "blobs.npz"
    np.savez(path, images=x, labels=y)
    try:
        import torch  # noqa: F401
        compare = True
    except ImportError:
        compare = False
    h = train_cnn.train(train_cnn.Config(dataset=str(path), epochs=2, batch_size=16,
                                         compare_torch=compare),
                        log=lambda s: None, progress=False)
    assert h["n_train"] == 96 and h["model"].named_params()[0][1].shape == (8, 3, 3, 3)
    assert h["model"].named_params()[-4][1].shape == (64, 16 * 3 * 3)      # fc1 after 14->7->3
    assert h["epoch_loss"][1] < h["epoch_loss"][0]
    if compare:
        assert max(h["compare"]["rel_loss_diff"][:5]) <= 1e-5
    assert train_cnn.main(["--dataset", str(tmp_path / "missing.npz"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gpu_request_fails_clearly_without_gpu():
    try:
        import cupy  # noqa: F401
        import bncore_gpu  # noqa: F401
        has = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001
        has = False
    if has:
        pytest.skip("a GPU is usable here; see test_gpu_matches_cpu")
    with pytest.raises(train_cnn.SetupError, match="CuPy|bncore_gpu|GPU"):
        train_cnn.get_device("gpu")
    assert train_cnn.main(["--device", "gpu", "--epochs", "1", "--no-progress"]) == 2


def test_gpu_matches_cpu(data, gpu_backend):
    """The same run on CuPy + bncore_gpu: per-step losses as close as two float32
    implementations can be over a few steps (cuBLAS vs OpenBLAS summation orders)."""
    steps = dict(SLICE, epochs=1)
    cpu = train_cnn.train(train_cnn.Config(**steps), log=lambda s: None, progress=False,
                          data=data)
    gpu = train_cnn.train(train_cnn.Config(**steps, device="gpu"), log=lambda s: None,
                          progress=False, data=data)
    a, b = np.asarray(cpu["step_loss"][:5]), np.asarray(gpu["step_loss"][:5])
    np.testing.assert_allclose(b, a, rtol=1e-5)      # torch_twin.LOSS_RTOL, without torch
    assert gpu["epoch_loss"][0] == pytest.approx(cpu["epoch_loss"][0], rel=1e-3)
