"""Run directories: parameters, provenance and metrics, written so a failure never
destroys earlier results.

A run writes into ``<dir>.partial`` and only a successful ``commit()`` moves it to
``<dir>`` (replacing an earlier run only when overwriting was asked for).  An
interrupted run leaves its ``.partial`` folder, whose checkpoint ``resume`` continues.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata

from .backends.checkpoint import atomic_write

_PACKAGES = ("numpy", "scipy", "torch", "jax", "jaxlib", "equinox", "optax", "pot", "papermill")


def to_jsonable(obj):
    """Dataclasses, tuples, numpy scalars and arrays as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **{f.name: to_jsonable(getattr(obj, f.name))
                                              for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def write_json(path: str, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def git_revision() -> dict:
    """The commit of the onestep checkout and whether it has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha or None, "dirty": dirty if sha else None}


def provenance(bk=None) -> dict:
    """Versions, git revision, machine and device: enough to reproduce or question a number."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": sys.version.split()[0], "packages": versions, "git": git_revision(),
            "host": platform.node(), "platform": platform.platform(),
            "backend": getattr(bk, "name", None), "device": str(getattr(bk, "device", None)),
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class RunDir:
    """A run's output folder, staged in ``<path>.partial`` until ``commit()``."""

    def __init__(self, path: str, overwrite: bool = False, resume: bool = False):
        self.path = os.path.abspath(path)
        self.staging = self.path + ".partial"
        if os.path.exists(self.path) and not (overwrite or resume):
            raise FileExistsError(f"run directory {self.path} already exists; "
                                  "pass --overwrite to replace it or --resume to continue it")
        if not resume and os.path.exists(self.staging):
            shutil.rmtree(self.staging)
        if resume and not os.path.exists(self.staging) and os.path.exists(self.path):
            shutil.copytree(self.path, self.staging)
        os.makedirs(self.staging, exist_ok=True)

    def file(self, name: str) -> str:
        """Path of ``name`` inside the (staged) run."""
        return os.path.join(self.staging, name)

    def write_json(self, name: str, obj) -> None:
        write_json(self.file(name), obj)

    def commit(self) -> str:
        """Publish the staged run at ``path``; the earlier run there is removed only now."""
        old = self.path + ".old"
        if os.path.exists(self.path):
            os.replace(self.path, old)
        os.replace(self.staging, self.path)
        if os.path.exists(old):
            shutil.rmtree(old)
        return self.path


def read_run(path: str) -> dict:
    """The ``run.json`` of a committed run directory, with a clear error when absent."""
    f = os.path.join(path, "run.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path} is not a run directory (no run.json); "
                                "create one with `python -m onestep train ... --out DIR`")
    with open(f) as fh:
        return json.load(fh)


CKPT = "checkpoint"


def _fields(cfg, ignore=("type",)) -> dict:
    return {k: v for k, v in to_jsonable(cfg).items() if k not in ignore}


def load_run(path: str, device: str = "auto", backend=None):
    """``(backend, ema_model, preset, run_info)`` of a committed run directory.

    With ``backend`` given (a Backend object), the run must have been trained with it; this
    is how a student loads its teacher into its own framework.
    """
    from . import get_backend
    from .presets import run_preset
    from .train import run_keys

    info = read_run(path)
    preset = run_preset(info["method"], info["dataset"], info["scale"], conditional=info["conditional"],
                        variant=info.get("variant") or None)
    recorded = info["preset"]
    for part in ("model", "method_cfg"):
        saved, now = _fields(recorded[part], ("type", "total_steps")), _fields(getattr(preset, part),
                                                                             ("type", "total_steps"))
        if saved != now:
            raise ValueError(f"the {part} recorded in {path}/run.json no longer matches the preset "
                             f"({saved} vs {now}); retrain the run")
    if backend is not None and backend.name != info["backend"]:
        raise ValueError(f"run {path} was trained with the {info['backend']} backend, not {backend.name}; "
                         f"train it again with --backend {backend.name}")
    bk = backend or get_backend(info["backend"], device=device)
    model = bk.make_model(preset.model, run_keys(bk, info["seed"])[0])
    state = bk.init_train_state(model, lr=preset.train.lr, ema_decay=preset.train.ema_decay)
    ckpt = os.path.join(path, CKPT)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    state = bk.load(state, ckpt)
    return bk, state.ema, preset, info
