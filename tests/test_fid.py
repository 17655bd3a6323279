"""CIFAR-10 at full scale without the data or a GPU: the FID path end to end on CIFAR-shaped images made
here (a data folder in the official format, cached reference statistics, periodic FID in the run log,
the CLI's final FID), and torch's bf16 autocast that leaves the JVP in float32.  The Inception network
is replaced by a small stand-in where a few hundred images would take minutes on a CPU core
(``tests/test_metrics.py`` runs the real one on a handful)."""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from onestep import cli, evaluation, get_backend, metrics
from onestep.backends.architectures import UNetConfig
from onestep.methods import cm, make_loss
from onestep.presets import run_preset
from onestep.runs import fit
from onestep.train import TrainConfig, init_state

PER_BATCH, N_TEST = 60, 100  # 300 training images in five batches


class StandIn(torch.nn.Module):
    """Inception's interface (3 × 299 × 299 in [-1, 1] -> features) at a fraction of its cost: 4×4
    average colours and their squares, 96 features."""

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.cat([pooled, pooled**2], dim=1)


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """A CIFAR-10 folder in the official pickled format (smooth random images), a fresh cache and the
    stand-in network; returns a counter of the images the network has seen."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [*((f"data_batch_{k}", PER_BATCH) for k in range(1, 6)), ("test_batch", N_TEST)]:
        base = rng.uniform(0, 255, size=(n, 3, 1, 1)) * np.ones((1, 1, 32, 32))
        images = np.clip(base + rng.normal(0, 20, size=(n, 3, 32, 32)), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images.reshape(n, -1), b"labels": list(rng.integers(0, 10, n))}, f)
    monkeypatch.setenv("ONESTEP_CIFAR10", str(folder))
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    seen = []
    net = StandIn()

    def stand_in(x):
        seen.append(len(x))
        return net(x)
    monkeypatch.setattr(metrics, "_inception", lambda device: stand_in)
    return seen


def test_fid_against_the_cached_training_statistics(cifar):
    train = evaluation.load("cifar10", split="train").x
    assert train.shape == (5 * PER_BATCH, 3, 32, 32)
    same = evaluation.evaluate("cifar10", train)["fid"]
    assert sum(cifar) == 2 * len(train)  # the reference statistics, then the "samples"
    assert len(os.listdir(os.environ["ONESTEP_CACHE"])) == 1
    rng = np.random.default_rng(1)
    noisy = evaluation.evaluate("cifar10", np.clip(train + rng.normal(0, 0.3, train.shape), -1, 1))["fid"]
    noise = evaluation.evaluate("cifar10", rng.uniform(-1, 1, train.shape))["fid"]
    assert sum(cifar) == 4 * len(train)  # the reference came from the cache
    print(f"stand-in FID: training set {same:.3g}, noisy {noisy:.3g}, uniform noise {noise:.3g}")
    assert same < 1e-6 < noisy < noise


def test_periodic_fid_goes_to_the_run_log_and_the_cli_scores_the_ema(cifar, tmp_path):
    preset = run_preset("cm", "cifar10", "smoke", variant="sct", steps=4, batch_size=8, eval_every=2, log_every=1)
    preset = replace(preset, periodic_eval_n=50, model=replace(preset.model, base=8, emb_dim=16))
    state, history, _ = fit(get_backend("torch"), preset, seed=0, progress=False)
    assert [e["step"] for e in state.evals] == [2, 4] and all(np.isfinite(e["fid"]) for e in state.evals)
    assert len(history) == 4

    out = tmp_path / "run"
    assert cli.main(["train", "--method", "cm", "--variant", "sct", "--dataset", "cifar10", "--scale", "smoke",
                     "--steps", "2", "--batch-size", "8", "--out", str(out)]) == 0
    with open(out / "metrics.json") as f:
        assert np.isfinite(json.load(f)["eval"]["fid"])


def test_full_scale_cifar10_preset(monkeypatch):
    monkeypatch.delenv("ONESTEP_SCALE", raising=False)  # make test sets it to smoke, which would win over "full"
    preset = run_preset("fm", "cifar10", "full")
    assert preset.model.attention == (16,) and preset.model.base == 128
    assert preset.eval_n == 50_000 and preset.periodic_eval_n == 10_000 and preset.train.eval_every == 10_000
    assert preset.train.mixed_precision and preset.train.ckpt_every > 0
    assert not run_preset("fm", "cifar10", "smoke").train.mixed_precision


def test_bf16_autocast_leaves_the_jvp_in_float32():
    """Under a mixed-precision state the network runs in bf16, except inside ``bk.jvp``; sCT trains."""
    bk = get_backend("torch")
    cfg = UNetConfig(channels=3, size=8, base=8, mults=(1, 2), emb_dim=16, attention=(4,), head_channels=8,
                     log_weight_head=True)  # sCT learns its loss weight w(τ) with this head
    model = bk.make_model(cfg, bk.key(0))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x, t).dtype == torch.bfloat16
        out, tangent = bk.jvp(lambda x: model(x, t), (x,), (torch.ones_like(x),))
        assert out.dtype == tangent.dtype == torch.float32
    state = init_state(bk, cfg, TrainConfig(steps=2, batch_size=4, mixed_precision=True), seed=0)
    loss_fn = make_loss(bk, cm.variant_config("sct"), 2)
    data = {"x": torch.randn(4, 3, 8, 8), "y": None}
    for _ in range(2):
        state, loss, _ = bk.train_step(loss_fn, state, data, np.arange(4), bk.key(1))
    assert torch.isfinite(loss) and state.step == 2
