"""Command line: ``python -m onestep train | sample | evaluate | batch``.

Bad input stops at once with a message naming the bad value and the accepted ones
(argparse ``choices`` and the validators below); an existing run directory is only
replaced with ``--overwrite``, and only after the new run succeeded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np

from .backends import BACKENDS
from .data import DATASETS
from .methods import METHODS
from .ode import SOLVERS
from .presets import SCALES
from .train import Interrupted, NonFiniteLoss

INTERRUPTED = 75  # exit status of a run stopped by SIGTERM/SIGINT after its checkpoint (EX_TEMPFAIL: retry)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


BATCH_OWNED = ("backend", "scale", "seed", "out_dir", "device")  # set by batch's own options


def chapter_param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value): the value read as JSON (``true``, ``3``, ``[1, 2]``), else as a word."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a parameter name, got {text!r}")
    if key in BATCH_OWNED:
        raise argparse.ArgumentTypeError(f"{key} is set by batch's own --{key.replace('_dir', '')} option, "
                                         f"not by --param")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def devices_arg(text: str) -> int | str:
    return text if text == "all" else positive_int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m onestep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one method on one data set; writes a run directory")
    t.add_argument("--method", required=True, choices=METHODS)
    t.add_argument("--variant", help="the method's variant (cm: ict, ct, cd, sct, scd; ayf: emd, lmd, emd+lmd); "
                   "default: the first")
    t.add_argument("--teacher", help="distillation teacher: 'exact' (analytic data sets) or a trained fm run directory")
    t.add_argument("--weak-teacher", help="ayf: a weaker fm run of the teacher (fewer steps) for autoguidance")
    t.add_argument("--backend", default="torch", choices=BACKENDS)
    t.add_argument("--dataset", required=True, choices=DATASETS)
    t.add_argument("--scale", default="smoke", choices=SCALES)
    t.add_argument("--seed", type=non_negative_int, default=0)
    t.add_argument("--out", required=True, help="run directory to create")
    t.add_argument("--conditional", action="store_true", help="class-conditional (labelled data sets)")
    t.add_argument("--steps", type=positive_int, help="override the preset's number of training steps")
    t.add_argument("--batch-size", type=positive_int, help="override the preset's batch size")
    t.add_argument("--ema-decay", type=float, help="override the decay of the EMA the samples come from")
    t.add_argument("--eval-n", type=positive_int, help="override the number of samples of the final evaluation")
    t.add_argument("--eval-every", type=non_negative_int,
                   help="override the steps between evaluations during training (0: none)")
    t.add_argument("--device", default="auto")
    t.add_argument("--devices", type=devices_arg, default="all",
                   help="JAX: how many devices to train on, data-parallel (default: all); torch: one per process, "
                        "launch more with torchrun --nproc_per_node N")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")

    s = sub.add_parser("sample", help="generate samples from a trained run")
    s.add_argument("--run", required=True)
    s.add_argument("--steps", type=positive_int, default=1, help="sampler steps (ODE steps for fm, jumps otherwise)")
    s.add_argument("--solver", choices=SOLVERS, help="ODE solver (fm only; default heun)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--noise", help=".npy file of shape (n, d): the noise x1 to transport")
    src.add_argument("--n", type=positive_int, help="number of samples (noise drawn from --seed)")
    s.add_argument("--seed", type=non_negative_int, default=0)
    s.add_argument("--label", type=non_negative_int, help="class label for conditional runs")
    s.add_argument("--out", required=True, help="output .npy file")
    s.add_argument("--device", default="auto")

    e = sub.add_parser("evaluate", help="sample from a run and print the standard metrics as JSON")
    e.add_argument("--run", required=True)
    e.add_argument("--steps", type=positive_int, help="sampler steps (default: what training evaluates with)")
    e.add_argument("--solver", choices=SOLVERS, help="ODE solver (fm only; default heun)")
    e.add_argument("--n", type=positive_int, default=2000)
    e.add_argument("--seed", type=non_negative_int, default=0)
    e.add_argument("--device", default="auto")

    b = sub.add_parser("batch", help="execute chapters with papermill")
    b.add_argument("--scale", default="full", choices=SCALES)
    b.add_argument("--backend", default="torch", choices=BACKENDS)
    b.add_argument("--chapters", required=True, help="comma-separated chapter names, or 'all'")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=non_negative_int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--param", action="append", default=[], type=chapter_param, metavar="KEY=VALUE",
                   help="set one more parameter of the chapters (a JSON value or a word), e.g. study=true")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="run every chapter again, replacing finished ones")
    g.add_argument("--resume", action="store_true",
                   help="skip chapters whose run directory is finished; continue the others from their checkpoints")
    return p


# -- train, sample, evaluate ----------------------------------------------------------------
def _train(args) -> dict:
    from . import get_backend
    from .backends.distributed import check_batch
    from .methods import make_loss
    from .presets import run_preset
    from .runs import (
        CKPT,
        RunDir,
        evaluate_samples,
        fit,
        load_teacher,
        provenance,
        sample_run,
        throughput,
        training_data,
    )

    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("ema_decay", args.ema_decay), ("eval_every", args.eval_every)) if v is not None}
    preset = run_preset(args.method, args.dataset, args.scale, conditional=args.conditional, variant=args.variant,
                        autoguided=args.weak_teacher is not None, **overrides)
    if args.eval_n:
        preset = replace(preset, eval_n=args.eval_n)
    bk = get_backend(args.backend, device=args.device, devices=args.devices)
    check_batch(preset.train.batch_size, bk.topology.world_size)
    data = training_data(preset, args.seed)  # a missing data folder stops here, before anything is written
    teacher = load_teacher(bk, args.teacher, preset, args.device, weak=args.weak_teacher)
    make_loss(bk, preset.method_cfg, preset.train.steps, teacher)  # refuses a missing or unwanted teacher now
    record = {"method": args.method, "variant": preset.variant, "dataset": args.dataset, "scale": args.scale,
              "backend": args.backend, "seed": args.seed, "conditional": args.conditional, "teacher": args.teacher,
              "weak_teacher": args.weak_teacher,
              "train_overrides": overrides, "preset": preset, **bk.topology.record(), "provenance": provenance(bk)}
    with RunDir(args.out, overwrite=args.overwrite, resume=args.resume, main=bk.topology.is_main) as run:
        if args.resume:
            run.check_resume(record)
        run.write_json("run.json", record)
        bk.barrier()  # the other processes read the checkpoint only once process 0 has staged the run
        start, timing = time.perf_counter(), []
        state, history, _ = fit(bk, preset, seed=args.seed, ckpt_path=run.file(CKPT), resume=args.resume,
                                teacher=teacher, data=data, timing=timing)
        seconds = time.perf_counter() - start
        samples, labels = sample_run(bk, state.ema, preset, n=preset.eval_n, seed=args.seed, steps=preset.eval_steps)
        metrics = {"train_seconds": seconds, "steps": state.step, "final_loss": history[-1][1],
                   "loss_history": history, "evals": state.evals,
                   "throughput": throughput(timing, preset.train.batch_size, bk),
                   "eval": {"steps": preset.eval_steps, "n": preset.eval_n,
                            **evaluate_samples(args.dataset, samples, labels, bk.topology.is_main)}}
        run.write_json("metrics.json", metrics)
        path = run.commit()
        bk.barrier()
    if bk.topology.is_main:
        print(json.dumps({"run": path, "final_loss": metrics["final_loss"], **metrics["eval"]}, indent=2))
    return metrics


def _sample(args) -> None:
    from .files import atomic_write
    from .runs import load_run, sample_run

    bk, model, preset, _ = load_run(args.run, args.device)
    noise = None
    if args.noise:
        if not os.path.isfile(args.noise):
            raise FileNotFoundError(f"noise file {args.noise} does not exist")
        noise = _read_noise(args.noise)
    x, _ = sample_run(bk, model, preset, n=args.n or 1000, seed=args.seed, steps=args.steps,
                      solver=args.solver, noise=noise, label=args.label)
    atomic_write(args.out, lambda f: np.save(f, x))
    print(f"wrote {x.shape} samples to {args.out}")


def _read_noise(path: str) -> np.ndarray:
    """A ``.npy`` array of floats (never unpickled)."""
    try:
        noise = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"noise file {path} is not a .npy array of floats ({e})") from None
    if not isinstance(noise, np.ndarray):  # a .npz archive: a ValueError like every other bad input here
        raise ValueError(f"noise file {path} holds {type(noise).__name__}, not one array; save it with numpy.save")  # noqa: TRY004
    return noise


def _evaluate(args) -> None:
    from .evaluation import evaluate
    from .runs import load_run, sample_run

    bk, model, preset, _ = load_run(args.run, args.device)
    steps = args.steps or preset.eval_steps
    x, labels = sample_run(bk, model, preset, n=args.n, seed=args.seed, steps=steps, solver=args.solver)
    print(json.dumps({"run": args.run, "solver": args.solver, "steps": steps,
                      **evaluate(preset.dataset, x, labels)}, indent=2))


def _batch(args) -> None:
    import shutil
    import tempfile

    from .notebooks import chapter_name, chapters, execute

    available = {chapter_name(p): p for p in chapters()}
    names = list(available) if args.chapters == "all" else [c.strip() for c in args.chapters.split(",")]
    unknown = [c for c in names if c not in available]
    if unknown:
        raise ValueError(f"unknown chapter(s) {', '.join(unknown)}; accepted: {', '.join(available)}")
    outs = {name: os.path.abspath(os.path.join(args.out, f"{name}-{args.backend}-{args.scale}")) for name in names}
    if not (args.overwrite or args.resume):
        done = [out for out in outs.values() if os.path.exists(out)]
        if done:
            raise FileExistsError(f"{done[0]} already exists; pass --overwrite to replace it or --resume to skip "
                                  "finished chapters")
    main_process = _process_index() == 0
    for name, out in outs.items():
        if args.resume and os.path.exists(out):
            print(f"{name}: finished earlier -> {out}")
            continue
        if not args.resume and main_process and os.path.exists(out + ".partial"):
            shutil.rmtree(out + ".partial")  # a fresh start: the chapter would resume from these checkpoints
        params = {**dict(args.param), "backend": args.backend, "scale": args.scale, "seed": args.seed,
                  "out_dir": out, "device": args.device}
        # every data-parallel process runs the chapter; process 0 keeps the executed notebook
        notebook = out + ".ipynb" if main_process else os.path.join(tempfile.mkdtemp(), f"{name}.ipynb")
        start = time.perf_counter()
        execute(available[name], params, notebook, cwd=os.path.dirname(os.path.abspath(available[name])))
        if main_process:
            print(f"{name}: {time.perf_counter() - start:.0f} s -> {out}")


def _process_index() -> int:
    """This process's index in a torchrun or multi-host JAX launch (0 when launched alone)."""
    from .backends.distributed import jax_cluster_env, torchrun_env

    torch_cluster, jax_cluster = torchrun_env(), jax_cluster_env()
    return torch_cluster[0] if torch_cluster else jax_cluster[2] if jax_cluster else 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": _train, "sample": _sample, "evaluate": _evaluate, "batch": _batch}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return INTERRUPTED
    return 0
