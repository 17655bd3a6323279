"""Throughput at full scale, on one device and on all of them, in both backends: one short run per method.

    python benchmarks/scale_check.py --out runs/scale             # a GPU machine (CIFAR-10 in $ONESTEP_CIFAR10)
    python benchmarks/scale_check.py --out /tmp/scale --dry-run   # the CPU: smoke scale, 2 host devices / 2 processes

Each run is ``python -m onestep train --scale full`` with fewer steps (``--steps``), started on one device
and then data-parallel on every device (torch: ``torchrun --nproc_per_node N``; JAX: one process, all
devices), and prints steps/s and images/s (after the first logged step, so compilation is left out), the
peak accelerator memory and the FID-10k of the EMA after the short run.  FM trains first: it is the
teacher of the distillation methods.  Numbers are printed and saved (``scale_check.json``), never judged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from onestep.methods import METHODS, get_method

# every method with a chapter, by its variants worth timing; methods registered later join with their default
VARIANTS = {"fm": [None], "cm": ["ict", "sct"], "ctm": [None], "shortcut": [None]}


def runs() -> list[tuple[str, str | None]]:
    return [(m, v) for m in METHODS for v in VARIANTS.get(m, [None])]


def device_count(backend: str, dry_run: bool) -> int:
    if dry_run:
        return 2
    probe = ("import torch; print(torch.cuda.device_count())" if backend == "torch"
             else "import jax; print(jax.local_device_count())")
    return int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)


def command(backend: str, devices: int, dry_run: bool) -> tuple[list[str], dict]:
    """How to start ``python -m onestep`` on ``devices`` devices, and the environment to add."""
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "ONESTEP_PROGRESS": "0"}
    if backend == "torch" and devices > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices),
                "-m", "onestep"], env
    if backend == "jax" and dry_run and devices > 1:  # host devices stand in for GPUs
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} " + os.environ.get("XLA_FLAGS", "")
    return [sys.executable, "-m", "onestep"], env


def train(args, backend: str, method: str, variant: str | None, devices: int, teacher: str | None) -> dict:
    name = f"{method}{'-' + variant if variant else ''}-{backend}-{devices}dev"
    out = os.path.join(args.out, name)
    base, env = command(backend, devices, args.dry_run)
    cmd = [*base, "train", "--method", method, "--backend", backend, "--dataset", args.dataset,
           "--scale", args.scale, "--steps", str(args.steps), "--eval-n", str(args.fid_n), "--eval-every", "0",
           "--out", out, "--overwrite"]
    if backend == "jax":
        cmd += ["--devices", str(devices)]
    if variant:
        cmd += ["--variant", variant]
    if teacher:
        cmd += ["--teacher", teacher]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT, check=False)
    row = {"run": name, "backend": backend, "method": method, "variant": variant, "devices": devices,
           "wall_seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode}
    if done.returncode:
        row["error"] = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return row
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out, "run.json")) as f:
        record = json.load(f)
    row.update(metrics["throughput"], world_size=record["world_size"], devices_used=record["devices"],
               **{k: v for k, v in metrics["eval"].items() if k in ("fid", "w2", "fd")})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--backends", default="torch,jax")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--steps", type=int, default=2000, help="training steps per run (a few minutes on a GPU)")
    p.add_argument("--fid-n", type=int, default=10_000, help="samples of the FID after the short run")
    p.add_argument("--batch-size", type=int, help="global batch (default: the preset's)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU check of this script: smoke scale, 8gaussians, 150 steps, 2 host devices / processes")
    args = p.parse_args()
    args.scale = "full"
    if args.dry_run:
        args.scale, args.dataset, args.steps, args.fid_n = "smoke", "8gaussians", 150, 500
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for backend in args.backends.split(","):
        counts = sorted({1, device_count(backend, args.dry_run)})
        for devices in counts:
            teacher = None
            for method, variant in runs():
                needs = get_method(method).needs_teacher(get_method(method).Config(**({"variant": variant}
                                                                                   if variant else {})))
                row = train(args, backend, method, variant, devices, teacher if needs else None)
                if method == "fm" and not row["returncode"]:
                    teacher = os.path.join(args.out, row["run"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "scale_check.json"), "w") as f:
        json.dump(rows, f, indent=2)
    cols = ("run", "world_size", "steps_per_second", "images_per_second", "peak_memory_gb", "fid", "w2")
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "—")) for c in cols)
              + " |")


if __name__ == "__main__":
    main()
