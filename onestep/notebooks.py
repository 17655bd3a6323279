"""Chapter sources to runnable notebooks: the one place that lists, parameterises and executes chapters.

A chapter is a Jupytext MyST Markdown notebook listed in ``_toc.yml``, e.g. ``book/01_flow_matching.md``,
named without its number (``flow_matching``). Parameters are injected the papermill way: a cell tagged
``injected-parameters`` right after the chapter's cell tagged ``parameters``.
"""
from __future__ import annotations

import re
from pathlib import Path

import jupytext
import papermill
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _toc_entries(node):
    """The ``root`` and ``file`` entries of a Jupyter Book table of contents, in reading order."""
    for key in ("root", "file"):
        if key in node:
            yield node[key]
    for key in ("parts", "chapters", "sections"):
        for child in node.get(key, ()):
            yield from _toc_entries(child)


def _source(entry: str, root: Path) -> Path:
    path = root / f"{entry}.md"
    if not path.exists():
        raise FileNotFoundError(f"_toc.yml lists {entry!r} but {path} does not exist")
    return path


def _is_notebook(path: Path) -> bool:
    nb = jupytext.read(path)
    return "kernelspec" in nb.metadata and any(cell.cell_type == "code" for cell in nb.cells)


def chapters(root: Path = ROOT) -> list[Path]:
    """The executable chapters of the book, in table-of-contents order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    sources = (_source(entry, root) for entry in _toc_entries(toc))
    return [path for path in sources if _is_notebook(path)]


def chapter_name(path: str | Path) -> str:
    """``book/01_flow_matching.md`` -> ``flow_matching``."""
    return re.sub(r"^\d+[_-]", "", Path(path).stem)


def _prepare(source: str | Path, parameters: dict, out_path: str | Path, **kwargs) -> None:
    nb = jupytext.read(source)
    if not any("parameters" in cell.metadata.get("tags", ()) for cell in nb.cells):
        raise ValueError(f"{source} has no cell tagged 'parameters'")
    out_path = Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(nb, str(out_path), parameters=parameters, kernel_name="python3", **kwargs)


def to_notebook(source: str | Path, parameters: dict, out_path: str | Path) -> Path:
    """Write ``source`` as an unexecuted ``.ipynb`` with ``parameters`` injected; return ``out_path``."""
    _prepare(source, parameters, out_path, prepare_only=True)
    return Path(out_path)


def execute(source: str | Path, parameters: dict, out_path: str | Path, cwd: str | Path | None = None,
            log_output: bool = False) -> Path:
    """Run ``source`` with ``parameters`` injected and save the executed notebook to ``out_path``.

    The kernel starts in ``cwd`` (default: the chapter's folder, as in the book build). A failing cell
    raises ``papermill.PapermillExecutionError``; the notebook saved so far shows where.
    ``log_output`` streams the cells' output and a progress bar to the terminal.
    """
    cwd = Path(cwd) if cwd is not None else Path(source).resolve().parent
    _prepare(source, parameters, out_path, cwd=str(cwd), log_output=log_output, progress_bar=log_output)
    return Path(out_path)
