"""Speed benchmarks: print numbers, never pass or fail on time.

  python benchmarks/run.py                    # step times and JVP ratio (CPU), chapter times at smoke scale
  python benchmarks/run.py --chapters book    # ... and at book scale too (minutes)
  python benchmarks/run.py --only steps       # just the step-time table

Step times are the median over repeated timed windows after a warm-up (compilation excluded),
in one process, so ratios within one run compare like with like on a noisy machine.
The JVP probe is the MeanFlow-shaped objective ``u - sg(v - (t - r) du/dt)`` whose ``du/dt`` is
one forward-mode JVP through the same network: its cost over the plain FM step is the overhead
every JVP-based method (MeanFlow, sCT, AYF-EMD) pays.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np

from onestep import get_backend
from onestep.backends.architectures import MLPConfig, UNetConfig
from onestep.methods import cm, fm, make_loss
from onestep.paths import LINEAR


def fm_probe(bk):
    """Plain FM regression on a two-time network fed (t, t): the baseline step."""
    def loss_fn(model, target, batch, key, step):
        x0 = batch["x"]
        kt, kx = bk.split(key, 2)
        t = bk.uniform(kt, (x0.shape[0],))
        x1 = bk.normal(kx, tuple(x0.shape))
        cond = bk.xp.stack([t, t], axis=1)
        err = model(LINEAR.sample(bk.xp, x0, x1, t), cond) - (x1 - x0)
        return bk.xp.mean(err ** 2), {}
    return loss_fn


def jvp_probe(bk):
    """The same network and batch, with a target built from one JVP in (z, t)."""
    def loss_fn(model, target, batch, key, step):
        x0 = batch["x"]
        kt, kr, kx = bk.split(key, 3)
        t = bk.uniform(kt, (x0.shape[0],))
        r = t * bk.uniform(kr, (x0.shape[0],))
        x1 = bk.normal(kx, tuple(x0.shape))
        v = x1 - x0
        u, du_dt = bk.jvp(lambda z, s: model(z, bk.xp.stack([r, s], axis=1)),
                          (LINEAR.sample(bk.xp, x0, x1, t), t), (v, bk.xp.ones_like(t)))
        gap = (t - r).reshape((-1,) + (1,) * (x0.ndim - 1))
        target = bk.stop_gradient(v - gap * du_dt)
        return bk.xp.mean((u - target) ** 2), {}
    return loss_fn


def step_time(bk, cfg, loss_fn, batch: int, steps: int, repeats: int = 5) -> float:
    """Median seconds per optimisation step (after a warm-up that includes compilation)."""
    shape = (cfg.data_dim,) if isinstance(cfg, MLPConfig) else (cfg.channels, cfg.size, cfg.size)
    data = {"x": bk.from_numpy(np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)),
            "y": None}
    idx = np.arange(batch)
    state = bk.init_train_state(bk.make_model(cfg, bk.key(0)), lr=1e-4, ema_decay=0.999)
    key = bk.key(1)

    def window(n):
        nonlocal state
        start = time.perf_counter()
        for _ in range(n):
            state, loss, _ = bk.train_step(loss_fn, state, data, idx, key)
        float(loss)  # waits for asynchronous work (JAX dispatch, CUDA)
        return (time.perf_counter() - start) / n

    window(3)
    return statistics.median(window(steps) for _ in range(repeats))


def method_losses(bk) -> dict:
    """The methods' own training losses (one-time network): FM, iCT (two forward passes) and sCT (a JVP)."""
    steps = 10**6  # curriculum length: the timed steps sit at its start
    return {"fm": make_loss(bk, fm.Config(), steps),
            "ict": make_loss(bk, cm.variant_config("ict"), steps),
            "sct": make_loss(bk, cm.variant_config("sct", warmup_fraction=0.1), steps)}


NETS = {
    "mlp-2d": (MLPConfig(data_dim=2, n_cond=2, width=128, depth=3), 512),
    "mlp-digits": (MLPConfig(data_dim=64, n_cond=2, width=256, depth=3), 256),
    "unet-digits": (UNetConfig(channels=1, size=8, n_cond=2, base=32, mults=(1, 2)), 64),
    "unet-mnist": (UNetConfig(channels=1, size=28, n_cond=2, base=32, mults=(1, 2, 2)), 32),
}


def bench_steps(backends, nets, device, steps, batch_override=None) -> list[dict]:
    rows = []
    for name in backends:
        bk = get_backend(name, device=device)
        if name == "torch" and bk.device.type == "cpu":
            import torch
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        for net in nets:
            cfg, batch = NETS[net]
            batch = batch_override or batch
            fm_s = step_time(bk, cfg, fm_probe(bk), batch, steps)
            jvp_s = step_time(bk, cfg, jvp_probe(bk), batch, steps)
            one_time = replace(cfg, n_cond=1)  # FM and CM networks see one time
            method_s = {m: step_time(bk, one_time, loss, batch, steps) for m, loss in method_losses(bk).items()}
            rows.append({"backend": name, "device": str(bk.device), "net": net, "batch": batch,
                         "fm_ms": 1e3 * fm_s, "jvp_ms": 1e3 * jvp_s, "jvp_over_fm": jvp_s / fm_s,
                         "steps_per_s": 1 / fm_s, **{f"{m}_loss_ms": 1e3 * v for m, v in method_s.items()},
                         "sct_over_fm": method_s["sct"] / method_s["fm"]})
            print(f"  {name:5s} {net:12s} FM {1e3 * fm_s:8.2f} ms  JVP {1e3 * jvp_s:8.2f} ms  "
                  f"ratio {jvp_s / fm_s:5.2f} | methods: "
                  + "  ".join(f"{m} {1e3 * v:.2f} ms" for m, v in method_s.items())
                  + f"  sCT/FM {method_s['sct'] / method_s['fm']:5.2f}", flush=True)
    return rows


def bench_chapters(backends, scales) -> list[dict]:
    from onestep.notebooks import chapter_name, chapters, execute

    rows = []
    for scale in scales:
        for name in backends:
            for source in chapters():
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    execute(source, {"backend": name, "scale": scale}, os.path.join(tmp, "out.ipynb"))
                    seconds = time.perf_counter() - start
                rows.append({"chapter": chapter_name(source), "backend": name, "scale": scale, "seconds": seconds})
                print(f"  {chapter_name(source):16s} {name:5s} {scale:5s} {seconds:7.1f} s", flush=True)
    return rows


def table(rows, cols) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(cell(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,jax")
    p.add_argument("--nets", default="mlp-2d,mlp-digits,unet-digits",
                   help=f"comma-separated, from {', '.join(NETS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--batch", type=int, help="batch size for every net (default: each net's own)")
    p.add_argument("--chapters", default="smoke", help="scales to time chapters at: smoke, book, 'smoke,book' or none")
    p.add_argument("--only", choices=("steps", "chapters"))
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [n for n in args.nets.split(",") if n not in NETS]
    if unknown:
        p.error(f"unknown net(s) {', '.join(unknown)}; accepted: {', '.join(NETS)}")
    report = {"host": platform.node(), "threads": os.environ["OMP_NUM_THREADS"], "python": sys.version.split()[0]}
    if args.only != "chapters":
        print("train step time (median): FM vs the JVP probe (two-time net), and FM, iCT, sCT (one-time net):")
        report["steps"] = bench_steps(backends, args.nets.split(","), args.device, args.steps, args.batch)
        print(table(report["steps"], ["backend", "device", "net", "batch", "fm_ms", "jvp_ms", "jvp_over_fm",
                                      "fm_loss_ms", "ict_loss_ms", "sct_loss_ms", "sct_over_fm"]))
    if args.only != "steps" and args.chapters != "none":
        print("chapter wall time (papermill, kernel start included):")
        report["chapters"] = bench_chapters(backends, args.chapters.split(","))
        print(table(report["chapters"], ["chapter", "backend", "scale", "seconds"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
