"""Write every chapter at smoke scale, once per backend, as ``{out}/{chapter}-{backend}.ipynb`` for nbval.

Usage: ``python tests/prepare_notebooks.py [out]`` (default ``.nbrun``), then
``pytest --nbval-lax --nbval-current-env .nbrun``.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from onestep import BACKENDS
from onestep.notebooks import chapter_name, chapters, to_notebook


def main(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    for source in chapters():
        for backend in BACKENDS:
            path = out / f"{chapter_name(source)}-{backend}.ipynb"
            to_notebook(source, {"backend": backend, "scale": "smoke"}, path)
            print(path)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".nbrun"))
