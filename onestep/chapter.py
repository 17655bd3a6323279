"""What every chapter does around its content: set itself up and save what it measured.

``Chapter.setup`` resolves the scale, builds the backend twice (float32 to train, float64 for the
derivation checks), reads the chapter's preset, opens the run directory when ``out_dir`` is given
and starts the clock; ``Chapter.fit`` trains one of the chapter's runs, checkpointing it in the run
directory (so a chapter stopped half-way, e.g. by a preempted batch job, continues each run where it
stopped: an unfinished ``<out_dir>.partial`` is resumed, not wiped); ``Chapter.finish`` writes
``run.json`` and ``metrics.json``, commits the run and returns the summary table; ``Chapter.study`` trains
a chapter's study or reads its committed book-scale run.  ``table`` renders result rows as a Markdown table.

Import this module before numpy, torch or JAX in a notebook: it sets one-thread defaults for
BLAS, torch and XLA (values already in the environment win), steadier on a shared 2-core machine.
"""
from __future__ import annotations

import hashlib
import json
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
from IPython.display import Markdown

from .backends import get_backend
from .evaluation import RESULTS, committed_study, study_command
from .presets import chapter_preset, resolve_scale
from .runs import CHECKPOINTS, RunDir, fit, provenance, to_jsonable


def table(rows: list[dict], cols: list[str] | None = None, fmt: str = "{:.3f}") -> str:
    """``rows`` as a Markdown table of the columns ``cols`` (default: the first row's keys); floats in ``fmt``.
    A "mean ± spread" cell is kept on one line (no-break spaces), so narrow columns do not split it."""
    cols = cols or list(rows[0])
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"

    def cell(value):
        return fmt.format(value) if isinstance(value, float) else str(value).replace(" ± ", "\u00a0±\u00a0")

    return head + "".join("| " + " | ".join(cell(r[c]) for c in cols) + " |\n" for r in rows)


@dataclass
class Chapter:
    """A running chapter: its parameters, backends, preset, run directory and start time."""

    name: str
    params: dict  # the papermill parameters: backend, scale, seed, device
    bk: Any  # float32, for training
    bk64: Any  # float64, for derivation checks
    preset: Any
    run: RunDir | None
    start: float

    @classmethod
    def setup(cls, name: str, backend: str, scale: str, seed: int = 0, out_dir: str | None = None,
              device: str = "auto") -> Chapter:
        scale = resolve_scale(scale)
        bk = get_backend(backend, device=device)
        plt.rcParams.update({"figure.dpi": 90, "animation.embed_limit": 64})
        chapter = cls(name=name, params={"backend": backend, "scale": scale, "seed": seed, "device": device},
                      bk=bk, bk64=get_backend(backend, device=device, precision="float64"),
                      preset=chapter_preset(name, scale), run=cls._run_dir(out_dir, bk), start=time.perf_counter())
        print(f"backend={backend} scale={scale} device={bk.device}")
        return chapter

    @staticmethod
    def _run_dir(out_dir: str | None, bk) -> RunDir | None:
        """The chapter's run directory; a ``.partial`` one left by an interrupted execution is continued."""
        if not out_dir:
            return None
        unfinished = os.path.isdir(os.path.abspath(out_dir) + ".partial")
        return RunDir(out_dir, overwrite=True, resume=unfinished, main=bk.topology.is_main)

    def fit(self, name: str, preset, teacher=None, seed: int | None = None):
        """``runs.fit`` of the chapter's run ``name``: ``(state, history, data)``.  With a run directory the
        run is checkpointed there (under its name and a digest of its preset, so a changed preset never
        resumes an old checkpoint) and continued from an earlier checkpoint."""
        seed = self.params["seed"] if seed is None else seed
        ckpt = None
        if self.run:
            digest = hashlib.sha1(json.dumps(to_jsonable(preset), sort_keys=True).encode()).hexdigest()[:12]
            ckpt = self.run.file(os.path.join(CHECKPOINTS, f"{name}-seed{seed}-{digest}"))
        return fit(self.bk, preset, seed=seed, ckpt_path=ckpt, resume=True, teacher=teacher)

    def study(self, run: Callable[[], Any], choice: str | None, timings: dict) -> tuple[Any, dict]:
        """The chapter's study: trained here by ``run()`` when ``choice`` (the notebook's ``study``
        parameter, else the preset's) is "run" or no committed book-scale study exists (its time goes to
        ``timings["study"]``), else read from the committed run (``evaluation.committed_study``), saying
        where from and which command remakes it.  Returns ``(study, saved)``: ``saved`` is what
        ``metrics.json`` keeps of it, ``{"study": study}`` or ``{"study_read_from": path}``."""
        choice = choice or self.preset.study
        path = committed_study(self.name, self.params["backend"])
        if choice == "results" and path is None:
            print("no committed study run found: training the study here")
            choice = "run"
        if choice == "run":
            start = time.perf_counter()
            result = run()
            timings["study"] = time.perf_counter() - start
            print(f"study trained here in {timings['study']:.0f} s")
            return result, {"study": result}
        committed, where = json.loads(path.read_text()), str(path.relative_to(RESULTS.parent))
        print(f"study read from {where} ({committed['backend']} backend, trained in "
              f"{committed['train_seconds']['study']:.0f} s on the machine that made it); remake it with:\n"
              + study_command(self.name, committed["backend"]))
        return committed["study"], {"study_read_from": where}

    @property
    def scale(self) -> str:
        return self.params["scale"]

    def seconds(self) -> float:
        """Wall time since ``setup``."""
        return time.perf_counter() - self.start

    def finish(self, results: dict, summary: list[dict]) -> Markdown:
        """Save ``results`` (with the parameters and the chapter's wall time) as ``metrics.json`` beside
        ``run.json`` (parameters, preset, provenance) when the chapter has a run directory; return
        ``summary`` as a table."""
        results = {**self.params, **results, "chapter_seconds": self.seconds()}
        if self.run:
            self.run.write_json("run.json", {"chapter": self.name, "params": self.params, "preset": self.preset,
                                             **self.bk.topology.record(), "provenance": provenance(self.bk)})
            self.run.write_json("metrics.json", results)
            print("wrote", self.run.commit())
        print(f"chapter ran in {results['chapter_seconds']:.0f} s ({self.params['backend']}, {self.scale})")
        return Markdown(table(summary))
