"""The run layer: train a preset, sample its model, and keep runs on disk.

``fit`` trains a ``presets.RunPreset``; ``sample_run`` samples a run's model in its data set's
shape; ``load_run`` and ``load_teacher`` read committed runs back.  Run directories hold
parameters, provenance and metrics, written so a failure never destroys earlier results: a run
writes into ``<dir>.partial`` and only a successful ``commit()`` moves it to ``<dir>`` (replacing an
earlier run only when overwriting was asked for).  An interrupted run leaves its ``.partial``
folder, whose checkpoint ``resume`` continues; a run that fails before writing any checkpoint
removes it.  With several data-parallel processes only process 0 touches the run directory.
"""
from __future__ import annotations

import dataclasses
import filecmp
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from typing import Self

import numpy as np

from .backends import get_backend
from .backends.architectures import model_shape
from .data import dataset_info, load
from .evaluation import evaluate
from .files import atomic_write
from .methods import get_method, make_loss
from .presets import run_preset
from .teachers import autoguided_teacher, network_teacher, oracle_teacher
from .train import as_model_input, init_state, train

_PACKAGES = ("numpy", "scipy", "torch", "jax", "jaxlib", "equinox", "optax", "pot", "papermill")


def to_jsonable(obj):
    """Dataclasses, tuples, numpy scalars and arrays as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        kind = f"{type(obj).__module__.rsplit('.', 1)[-1]}.{type(obj).__qualname__}"  # e.g. cm.Config
        return {"type": kind, **{f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
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
    """A run's output folder, staged in ``<path>.partial`` until ``commit()``.

    Used as a context manager, a failure inside the block removes the staging folder unless it holds
    a checkpoint to resume from.  ``main=False`` (data-parallel processes other than 0) computes the
    same paths and writes nothing.
    """

    def __init__(self, path: str, overwrite: bool = False, resume: bool = False, main: bool = True):
        self.path = os.path.abspath(path)
        self.staging = self.path + ".partial"
        self.main = main
        if os.path.exists(self.path) and not (overwrite or resume):
            raise FileExistsError(f"run directory {self.path} already exists; "
                                  "pass --overwrite to replace it or --resume to continue it")
        if not main:
            return
        if not resume and os.path.exists(self.staging):
            shutil.rmtree(self.staging)
        if resume and not os.path.exists(self.staging) and os.path.exists(self.path):
            shutil.copytree(self.path, self.staging)
        os.makedirs(self.staging, exist_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and self.main and os.path.isdir(self.staging) and not self.has_checkpoint():
            shutil.rmtree(self.staging)

    def has_checkpoint(self) -> bool:
        """Whether the staged run holds a checkpoint (of the CLI's run, or of any run of a chapter)."""
        return os.path.isfile(self.file(CKPT)) or bool(os.listdir(self.file(CHECKPOINTS))
                                                        if os.path.isdir(self.file(CHECKPOINTS)) else False)

    def file(self, name: str) -> str:
        """Path of ``name`` inside the (staged) run."""
        return os.path.join(self.staging, name)

    def write_json(self, name: str, obj) -> None:
        if self.main:
            write_json(self.file(name), obj)

    def check_resume(self, record: dict) -> None:
        """Refuse to resume a staged run recorded with other settings (``IDENTITY`` fields of run.json)."""
        path = self.file("run.json")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            saved = json.load(f)
        for key in IDENTITY:
            if key in record and to_jsonable(saved.get(key)) != to_jsonable(record[key]):
                raise ValueError(f"cannot resume {self.path}: it was trained with {key}={saved.get(key)!r}, this "
                                 f"command asks for {key}={record[key]!r}; resume with the same settings, or start "
                                 f"a new run (another --out, or --overwrite)")

    def commit(self) -> str:
        """Publish the staged run at ``path``; the earlier run there is removed only now."""
        if not self.main:
            return self.path
        old = self.path + ".old"
        if os.path.exists(self.path):
            os.replace(self.path, old)
        os.replace(self.staging, self.path)
        if os.path.exists(old):
            shutil.rmtree(old)
        return self.path


# What a resumed run must share with the run it continues (the rest of run.json may change, e.g. provenance).
IDENTITY = ("method", "variant", "dataset", "scale", "backend", "seed", "conditional", "teacher",
            "train_overrides", "world_size")


def read_run(path: str) -> dict:
    """The ``run.json`` of a committed run directory, with a clear error when absent."""
    f = os.path.join(path, "run.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path} is not a run directory (no run.json); "
                                "create one with `python -m onestep train ... --out DIR`")
    with open(f) as fh:
        return json.load(fh)


CKPT = "checkpoint"
CHECKPOINTS = "checkpoints"  # a chapter's folder of checkpoints, one per training run


def training_data(preset, seed: int):
    """The training set of a ``RunPreset`` (raises at once for a missing data folder)."""
    return load(preset.dataset, n=preset.n_train, seed=seed, split="train")


def fit(bk, preset, seed: int = 0, ckpt_path: str | None = None, resume: bool = False,
        progress: bool | None = None, data=None, teacher=None, evaluate: bool = True, timing: list | None = None):
    """Build the data, model and loss of a ``RunPreset`` and train it.

    ``teacher`` is a velocity field ``(z, t, y) -> v`` for distillation methods (see
    ``onestep.teachers``).  With ``evaluate`` and ``preset.train.eval_every`` set, the EMA model is
    scored every ``eval_every`` steps (``state.evals``); ``timing`` see ``train.train``.  Returns
    ``(state, history, data)``; ``data`` is the training set used.
    """
    if data is None:
        data = training_data(preset, seed)
    data = as_model_input(data, preset.model)
    loss_fn = make_loss(bk, preset.method_cfg, preset.train.steps, teacher)
    state = init_state(bk, preset.model, preset.train, seed)

    def score(state):
        samples, labels = sample_run(bk, state.ema, preset, n=preset.periodic_eval_n, seed=seed,
                                     steps=preset.eval_steps)
        return evaluate_samples(preset.dataset, samples, labels, bk.topology.is_main)

    state, history = train(bk, loss_fn, state, data, preset.train, seed, ckpt_path=ckpt_path, resume=resume,
                           progress=progress, evaluate=score if evaluate else None, timing=timing)
    return state, history, data


def throughput(timing: list, batch_size: int, bk) -> dict:
    """Steps and images per second between the first and the last logged step (so the compilation and
    warm-up before the first log are left out), and the peak accelerator memory of this process."""
    out = {"peak_memory_gb": None if bk.peak_memory() is None else bk.peak_memory() / 2**30}
    if len(timing) >= 2:
        (s0, t0), (s1, t1) = timing[0], timing[-1]
        out["steps_per_second"] = (s1 - s0) / (t1 - t0)
        out["images_per_second"] = out["steps_per_second"] * batch_size
    return out


def evaluate_samples(dataset: str, samples, labels, main: bool = True) -> dict:
    """The standard metrics (``evaluation.evaluate``), computed on process 0 only (``{}`` elsewhere)."""
    return evaluate(dataset, samples, labels) if main else {}


def sample_run(bk, model, preset, n: int, seed: int, steps: int, solver: str | None = None, noise=None,
               label=None):
    """``(samples, labels)`` (numpy) of the model of a ``RunPreset``, shaped like its data set.

    The noise is given (shape ``(n, *model input)``) or drawn from ``seed``, which also keys any
    renoising of the sampler (cm multistep, ctm γ > 0); a class-conditional model is asked for
    ``label``, or for labels cycling 0..K-1 (sample i gets i mod K).  ``solver`` is for ODE samplers (fm).
    """
    shape = dataset_info(preset.dataset).shape
    in_shape = model_shape(preset.model)
    k_noise, k_sample = bk.split(bk.key(seed), 2)
    if noise is None:
        noise = bk.normal(k_noise, (n, *in_shape))
    else:
        noise = np.asarray(noise)
        if noise.ndim != 1 + len(in_shape) or noise.shape[1:] != in_shape:
            raise ValueError(f"noise has shape {noise.shape}; this run needs (n, {', '.join(map(str, in_shape))})")
        if noise.dtype.kind != "f" or not np.all(np.isfinite(noise)):
            bad = "is not a float array" if noise.dtype.kind != "f" else \
                f"has {int(np.size(noise) - np.isfinite(noise).sum())} NaN or infinite values"
            raise ValueError(f"noise {bad} (dtype {noise.dtype}); sampling needs finite floats")
        noise = bk.from_numpy(noise)
    labels = None
    n_classes = preset.model.n_classes
    if n_classes:
        labels = (np.full(len(noise), label) if label is not None else np.arange(len(noise)) % n_classes)
        if labels.max() >= n_classes:
            raise ValueError(f"label {int(labels.max())} out of range; accepted: 0..{n_classes - 1}")
    elif label is not None:
        raise ValueError("a label was given but the model is not class-conditional")
    method = get_method(preset.method)
    options = {}
    if solver is not None:
        if "solver" not in inspect.signature(method.sample).parameters:
            raise ValueError(f"method {preset.method!r} samples by jumps, not with an ODE solver; drop the "
                             f"solver ({solver!r}); solvers apply to fm only")
        options["solver"] = solver
    # data-parallel workers each sample a block of the rows (the noise and labels of the whole set
    # are drawn first, so the samples do not depend on the number of workers for a deterministic sampler)
    y = None if labels is None else bk.scatter_rows(bk.from_numpy(labels))
    out = method.sample(bk, preset.method_cfg, model, bk.scatter_rows(noise), steps, bk.local_key(k_sample), y=y,
                        **options)
    return bk.gather_rows(out, len(noise)).reshape((len(noise), *shape)), labels


def _fields(cfg) -> dict:
    return {k: v for k, v in to_jsonable(cfg).items() if k != "type"}


def load_run(path: str, device: str = "auto", backend=None):
    """``(backend, ema_model, preset, run_info)`` of a committed run directory.

    With ``backend`` given (a Backend object), the run must have been trained with it; this
    is how a student loads its teacher into its own framework.
    """
    info = read_run(path)
    preset = run_preset(info["method"], info["dataset"], info["scale"], conditional=info["conditional"],
                        variant=info.get("variant") or None, autoguided=bool(info.get("weak_teacher")),
                        **info.get("train_overrides", {}))
    recorded = info["preset"]
    for part in ("model", "method_cfg", "train"):
        saved, now = _fields(recorded[part]), _fields(getattr(preset, part))
        if saved != now:
            raise ValueError(f"the {part} recorded in {path}/run.json no longer matches the preset "
                             f"({saved} vs {now}); retrain the run")
    if backend is not None and backend.name != info["backend"]:
        raise ValueError(f"run {path} was trained with the {info['backend']} backend, not {backend.name}; "
                         f"train it again with --backend {backend.name}")
    bk = backend or get_backend(info["backend"], device=device)
    ckpt = os.path.join(path, CKPT)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    state = bk.load(init_state(bk, preset.model, preset.train, info["seed"]), ckpt)
    return bk, state.ema, preset, info


def _teacher_run(bk, spec: str, preset, device: str, role: str):
    """The FM model of the run directory ``spec``, checked against the student's data set, labels and backend."""
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"{role} run directory {spec} does not exist; train one with "
                                f"python -m onestep train --method fm --dataset {preset.dataset} --out {spec}")
    _, model, teacher_preset, info = load_run(spec, device, backend=bk)
    if info["method"] != "fm":
        raise ValueError(f"the {role} must be a flow-matching (fm) run; {spec} is a {info['method']!r} run")
    if info["dataset"] != preset.dataset or bool(teacher_preset.model.n_classes) != bool(preset.model.n_classes):
        raise ValueError(f"{role} {spec} was trained on {info['dataset']!r} (conditional={info['conditional']}); "
                         f"the student needs {preset.dataset!r} (conditional={bool(preset.model.n_classes)})")
    return network_teacher(bk, model)


def load_teacher(bk, spec: str | None, preset, device: str = "auto", weak: str | None = None):
    """The teacher named by ``spec``: None (no teacher), ``"exact"``, or the directory of a trained
    ``fm`` run on the same data set and labels as ``preset``, trained with backend ``bk``.  ``weak`` names a
    weaker fm run of the same kind for autoguidance (``teachers.autoguided_teacher``; an autoguided preset
    needs one, any other refuses it)."""
    guided = getattr(preset.method_cfg, "guidance", None) is not None
    if weak is not None and not guided:
        raise ValueError(f"a weak teacher ({weak}) is for autoguided distillation (--method ayf with "
                         f"--weak-teacher); this {preset.method!r} preset is not autoguided")
    if guided and weak is None:
        raise ValueError("an autoguided preset distils v_weak + λ·(v − v_weak) and needs a weak teacher: pass "
                         "--weak-teacher RUN_DIR, a flow-matching run weaker than the teacher (fewer steps)")
    if spec is None:
        if weak is not None:
            raise ValueError(f"a weak teacher ({weak}) needs a teacher to guide; pass --teacher too")
        return None
    strong = oracle_teacher(bk, preset.dataset) if spec == "exact" else _teacher_run(bk, spec, preset, device,
                                                                                   "teacher")
    if weak is None:
        return strong
    if spec != "exact" and (os.path.realpath(spec) == os.path.realpath(weak) or filecmp.cmp(
            os.path.join(spec, CKPT), os.path.join(weak, CKPT), shallow=False)):
        raise ValueError(f"the weak teacher {weak} is the teacher {spec} itself (same weights); autoguidance "
                         "needs a weaker checkpoint of it (fewer training steps or a smaller network)")
    return autoguided_teacher(strong, _teacher_run(bk, weak, preset, device, "weak teacher"))
