"""What every chapter does around its content: set itself up and save what it measured.

``Chapter.setup`` resolves the scale, builds the backend twice (float32 to train, float64 for the
derivation checks), reads the chapter's preset, opens the run directory when ``out_dir`` is given
and starts the clock; ``Chapter.finish`` writes ``run.json`` and ``metrics.json``, commits the run
and returns the summary table.  ``table`` renders result rows as a Markdown table.

Import this module before numpy, torch or JAX in a notebook: it sets one-thread defaults for
BLAS, torch and XLA (values already in the environment win), steadier on a shared 2-core machine.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import time
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
from IPython.display import Markdown

from .backends import get_backend
from .presets import chapter_preset, resolve_scale
from .runs import RunDir, provenance


def table(rows: list[dict], cols: list[str] | None = None, fmt: str = "{:.3f}") -> str:
    """``rows`` as a Markdown table of the columns ``cols`` (default: the first row's keys); floats in ``fmt``."""
    cols = cols or list(rows[0])
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(fmt.format(r[c]) if isinstance(r[c], float) else str(r[c])
                                            for c in cols) + " |\n" for r in rows)


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
                      preset=chapter_preset(name, scale), run=RunDir(out_dir, overwrite=True) if out_dir else None,
                      start=time.perf_counter())
        print(f"backend={backend} scale={scale} device={bk.device}")
        return chapter

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
                                             "provenance": provenance(self.bk)})
            self.run.write_json("metrics.json", results)
            print("wrote", self.run.commit())
        print(f"chapter ran in {results['chapter_seconds']:.0f} s ({self.params['backend']}, {self.scale})")
        return Markdown(table(summary))
