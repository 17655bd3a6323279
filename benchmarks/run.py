"""Speed benchmarks: print numbers, never pass or fail on time.

  python benchmarks/run.py                    # step times and JVP ratio (CPU), chapter times at smoke scale
  python benchmarks/run.py --chapters book    # ... and at book scale too (minutes)
  python benchmarks/run.py --only steps       # just the step-time table

Step times are medians over repeated timed windows after a warm-up (compilation excluded), in one
process; the losses compared on one network take turns window by window, and each ratio is the
median of the ratios of neighbouring windows, so a noisy machine slows both sides of a ratio alike.
The JVP probe is the MeanFlow-shaped objective ``u - sg(v - (t - r) du/dt)`` whose ``du/dt`` is
one forward-mode JVP through the same network: its cost over the plain FM step is the overhead
every JVP-based method (MeanFlow, sCT, AYF-EMD) pays. ``flops_ratio`` is the same ratio in matmul
and convolution FLOPs (counted by torch; the arithmetic is the same in both backends): a tangent
costs one more forward and the backward runs through the primal only, so it is about 4/3.

torch reaches the JVP step several ways (``--torch-options``): ``fast`` is the backend's ``bk.jvp``
(the tangent carried by hand through our layers), ``func`` is ``torch.func.jvp`` (the path before it),
``split`` runs the primal with its graph and ``torch.func.jvp`` without one, and ``compile-*`` put the
objective (FM and JVP alike) under ``torch.compile``; ``compile_s`` is the time of their first steps
(compilation), and a compile that fails (inductor needs a C++ compiler) is reported, eager being the
fallback.
"""
from __future__ import annotations

import argparse
import functools
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
import torch
from torch.utils.flop_counter import FlopCounterMode

from onestep import get_backend
from onestep.backends.architectures import MLPConfig, UNetConfig, model_shape
from onestep.methods import cm, fm, make_loss
from onestep.paths import LINEAR, expand


def draws(bk, x0, key):
    """Noise ``x1``, times ``t`` and ``r ≤ t``: every random number of one probe step."""
    kt, kr, kx = bk.split(key, 3)
    t = bk.uniform(kt, (x0.shape[0],))
    return bk.normal(kx, tuple(x0.shape)), t, t * bk.uniform(kr, (x0.shape[0],))


def fm_objective(bk, jvp, model, x0, x1, t, r):
    """Plain FM regression on a two-time network fed (t, t): the baseline step."""
    err = model(LINEAR.sample(bk.xp, x0, x1, t), bk.xp.stack([t, t], axis=1)) - (x1 - x0)
    return bk.xp.mean(err ** 2)


def jvp_objective(bk, jvp, model, x0, x1, t, r):
    """The same network and batch, with the MeanFlow-shaped target ``sg(v − (t − r)·du/dt)`` built from
    one JVP in (z, t) whose primal output ``u`` is the prediction."""
    v = x1 - x0
    u, du_dt = jvp(lambda z, s: model(z, bk.xp.stack([r, s], axis=1)),
                   (LINEAR.sample(bk.xp, x0, x1, t), t), (v, bk.xp.ones_like(t)))
    target = bk.stop_gradient(v - expand(t - r, v) * du_dt)
    return bk.xp.mean((u - target) ** 2)


def func_jvp(fn, primals, tangents):
    """The torch path before the hand-carried tangent: ``torch.func.jvp``, the tangent detached."""
    out, tangent = torch.func.jvp(fn, primals, tangents)
    return out, tangent.detach()


def split_jvp(fn, primals, tangents):
    """The primal forward with its graph, then ``torch.func.jvp`` without one for the tangent (it runs
    the primal a second time)."""
    with torch.no_grad():
        tangent = torch.func.jvp(fn, primals, tangents)[1]
    return fn(*primals), tangent


# torch's ways to a JVP step: (jvp, torch.compile the objective?); None is the backend's own bk.jvp
TORCH_OPTIONS = {"fast": (None, False), "func": (func_jvp, False), "split": (split_jvp, False),
                 "compile-fast": (None, True), "compile-func": (func_jvp, True)}


def probe(bk, objective, jvp=None, compile=False):
    """A train-step loss: draws made eagerly, then ``objective`` (under ``torch.compile`` if asked)."""
    fn = functools.partial(objective, bk, jvp or bk.jvp)
    if compile:
        fn = torch.compile(fn)

    def loss_fn(model, target, batch, key, step):
        return fn(model, batch["x"], *draws(bk, batch["x"], key)), {}
    return loss_fn


def batch_data(bk, cfg, batch: int) -> dict:
    return {"x": bk.from_numpy(np.random.default_rng(0).standard_normal((batch, *model_shape(cfg)))
                               .astype(np.float32)), "y": None}


def step_times(bk, cfg, losses: dict, batch: int, steps: int, repeats: int = 7) -> dict:
    """Seconds per optimisation step of each loss in ``repeats`` timed windows of ``steps`` steps,
    after a warm-up that includes compilation (``{name}_first``: the first step's seconds). The
    losses take turns window by window."""
    data, idx, key = batch_data(bk, cfg, batch), np.arange(batch), bk.key(1)
    states = {name: bk.init_train_state(bk.make_model(cfg, bk.key(0)), lr=1e-4, ema_decay=0.999)
              for name in losses}

    def window(name, n):
        start = time.perf_counter()
        for _ in range(n):
            states[name], loss, _ = bk.train_step(losses[name], states[name], data, idx, key)
        float(loss)  # waits for asynchronous work (JAX dispatch, CUDA)
        return (time.perf_counter() - start) / n

    times = {name: [] for name in losses}
    for name in losses:
        start = time.perf_counter()
        window(name, 1)
        times[f"{name}_first"] = time.perf_counter() - start  # compilation included
        window(name, 2)
    for _ in range(repeats):
        for name in losses:
            times[name].append(window(name, steps))
    return times


def median_ratio(times: dict, a: str, b: str) -> float:
    """The median over windows of ``a``'s step time over ``b``'s in the same turn."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True))


def flops_ratio(cfg, batch: int) -> float:
    """Matmul and convolution FLOPs of one JVP-probe step (forward and backward) over one FM step."""
    bk = get_backend("torch", device="cpu")
    model, data = bk.make_model(cfg, bk.key(0)), batch_data(bk, cfg, batch)
    flops = []
    for objective in (jvp_objective, fm_objective):
        with FlopCounterMode(display=False) as counter:
            loss, _ = probe(bk, objective)(model, None, data, bk.key(1), 0)
            loss.backward()
        flops.append(counter.get_total_flops())
    return flops[0] / flops[1]


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


def bench_steps(backends, nets, device, steps, torch_options, batch_override=None) -> list[dict]:
    """One row per backend × way to the JVP × net: FM and JVP-probe step times and their ratio; the
    default way (torch's ``bk.jvp``, JAX's jit) also times the methods' own FM, iCT and sCT losses."""
    rows = []
    # counted before anything is compiled: once torch.compile has run in this process, torch's FLOP
    # counter fails on forward-AD dual tensors (an internal assert in make_dual)
    flops = {net: flops_ratio(NETS[net][0], batch_override or NETS[net][1]) for net in nets}
    for name in backends:
        bk = get_backend(name, device=device)
        if name == "torch" and bk.device.type == "cpu":
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        options = {o: TORCH_OPTIONS[o] for o in torch_options} if name == "torch" else {"jit": (None, False)}
        for net in nets:
            cfg, batch = NETS[net]
            batch = batch_override or batch
            for option, (jvp, compile) in options.items():
                if compile:
                    torch._dynamo.reset()  # each net and option compiles afresh; compile_s counts it
                row = {"backend": name, "option": option, "device": str(bk.device), "net": net, "batch": batch}
                try:
                    probes = step_times(bk, cfg, {"fm": probe(bk, fm_objective, jvp, compile),
                                                  "jvp": probe(bk, jvp_objective, jvp, compile)}, batch, steps)
                except Exception as e:  # noqa: BLE001 -- torch.compile fails many ways (no C++ compiler, ...)
                    print(f"  {name:5s} {option:12s} {net:12s} failed, eager is the fallback: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                    rows.append({**row, "failed": f"{type(e).__name__}"})
                    continue
                ms = {k: 1e3 * statistics.median(probes[k]) for k in ("fm", "jvp")}
                row.update({"fm_ms": ms["fm"], "jvp_ms": ms["jvp"], "jvp_over_fm": median_ratio(probes, "jvp", "fm"),
                            "flops_ratio": flops[net], "steps_per_s": 1e3 / ms["fm"],
                            "compile_s": probes["fm_first"] + probes["jvp_first"] if compile else None})
                line = (f"  {name:5s} {option:12s} {net:12s} FM {ms['fm']:8.2f} ms  JVP {ms['jvp']:8.2f} ms  "
                        f"ratio {row['jvp_over_fm']:5.2f} (FLOPs {row['flops_ratio']:4.2f})")
                if compile:
                    line += f"  first steps {row['compile_s']:.1f} s"
                if jvp is None and not compile:
                    one_time = replace(cfg, n_cond=1)  # FM and CM networks see one time
                    methods = step_times(bk, one_time, method_losses(bk), batch, steps)
                    method_ms = {m: 1e3 * statistics.median(methods[m]) for m in ("fm", "ict", "sct")}
                    row.update({**{f"{m}_loss_ms": v for m, v in method_ms.items()},
                                "sct_over_fm": median_ratio(methods, "sct", "fm")})
                    line += (" | methods: " + "  ".join(f"{m} {v:.2f} ms" for m, v in method_ms.items())
                             + f"  sCT/FM {row['sct_over_fm']:5.2f}")
                rows.append(row)
                print(line, flush=True)
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
        return f"{v:.2f}" if isinstance(v, float) else "" if v is None else str(v)
    rows = [{c: r.get(c) for c in cols} for r in rows]
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
    p.add_argument("--torch-options", default=",".join(TORCH_OPTIONS),
                   help=f"ways to torch's JVP step, comma-separated, from {', '.join(TORCH_OPTIONS)}")
    p.add_argument("--batch", type=int, help="batch size for every net (default: each net's own)")
    p.add_argument("--chapters", default="smoke", help="scales to time chapters at: smoke, book, 'smoke,book' or none")
    p.add_argument("--only", choices=("steps", "chapters"))
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [n for n in args.nets.split(",") if n not in NETS]
    if unknown:
        p.error(f"unknown net(s) {', '.join(unknown)}; accepted: {', '.join(NETS)}")
    unknown = [o for o in args.torch_options.split(",") if o not in TORCH_OPTIONS]
    if unknown:
        p.error(f"unknown torch option(s) {', '.join(unknown)}; accepted: {', '.join(TORCH_OPTIONS)}")
    report = {"host": platform.node(), "threads": os.environ["OMP_NUM_THREADS"], "python": sys.version.split()[0]}
    if args.only != "chapters":
        print("train step time (median): FM vs the JVP probe (two-time net), and FM, iCT, sCT (one-time net):")
        report["steps"] = bench_steps(backends, args.nets.split(","), args.device, args.steps,
                                      args.torch_options.split(","), args.batch)
        print(table(report["steps"], ["backend", "option", "device", "net", "batch", "fm_ms", "jvp_ms", "jvp_over_fm",
                                      "flops_ratio", "compile_s", "fm_loss_ms", "ict_loss_ms", "sct_loss_ms",
                                      "sct_over_fm", "failed"]))
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
