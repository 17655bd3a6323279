"""The GitHub workflows, which cannot run here: valid against the GitHub workflow schema (check-jsonschema's
vendored SchemaStore copy; actionlint has no wheel on the package index these machines use, and its sdist
downloads a binary while building), and the book workflow builds the book at book scale and publishes
``_build/html`` to GitHub Pages."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, ".github", "workflows")


def lint(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           path], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("name", sorted(os.listdir(WORKFLOWS)))
def test_workflow_is_valid(name):
    result = lint(os.path.join(WORKFLOWS, name))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_linter_rejects_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  build:\n    steps:\n      - run: make book\n")  # no runs-on
    assert lint(str(broken)).returncode != 0


def test_book_workflow_builds_at_book_scale_and_publishes_the_html():
    with open(os.path.join(WORKFLOWS, "book.yml")) as f:
        flow = yaml.safe_load(f)
    build, deploy = flow["jobs"]["build"], flow["jobs"]["deploy"]
    assert build["env"]["ONESTEP_SCALE"] == "book"
    assert any(step.get("run") == "make book" for step in build["steps"])
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert deploy["needs"] == "build" and deploy["steps"][0]["uses"].startswith("actions/deploy-pages")
    assert flow["permissions"]["pages"] == "write" and flow["permissions"]["id-token"] == "write"
    with open(os.path.join(ROOT, "_config.yml")) as f:
        config = yaml.safe_load(f)
    assert config["repository"]["url"].startswith("https://github.com/")
    assert config["launch_buttons"]["colab_url"] and config["launch_buttons"]["binderhub_url"]
