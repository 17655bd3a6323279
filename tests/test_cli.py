"""The command line: bad input names the bad value and the accepted ones; a run directory
is never overwritten by accident; train -> sample -> evaluate works end to end."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, env=None):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "onestep", *args], cwd=ROOT, capture_output=True,
                          text=True, env=full_env, timeout=600, check=False)


@pytest.mark.parametrize("args, expected", [
    (["train", "--method", "nope", "--dataset", "8gaussians", "--out", "x"], r"invalid choice: 'nope'.*'fm'"),
    (["train", "--method", "fm", "--backend", "tf", "--dataset", "8gaussians", "--out", "x"],
     r"invalid choice: 'tf'.*'torch', 'jax'"),
    (["train", "--method", "fm", "--scale", "huge", "--dataset", "8gaussians", "--out", "x"],
     r"invalid choice: 'huge'.*'smoke', 'book', 'full'"),
    (["train", "--method", "fm", "--dataset", "9gaussians", "--out", "x"], r"invalid choice: '9gaussians'.*'8gaussians'"),
    (["train", "--method", "fm", "--dataset", "8gaussians", "--steps", "0", "--out", "x"],
     r"--steps: expected a positive integer, got 0"),
    (["train", "--method", "fm", "--dataset", "8gaussians", "--batch-size", "-4", "--out", "x"],
     r"--batch-size: expected a positive integer, got -4"),
    (["sample", "--run", "x", "--steps", "two", "--out", "y.npy"], r"--steps: expected a positive integer, got 'two'"),
])
def test_bad_arguments_name_the_value(args, expected):
    r = cli(*args)
    assert r.returncode == 2
    import re
    assert re.search(expected, r.stderr), r.stderr


def test_missing_cifar_folder(tmp_path):
    r = cli("train", "--method", "fm", "--dataset", "cifar10", "--out", str(tmp_path / "c"),
            env={"ONESTEP_CIFAR10": str(tmp_path / "nowhere")})
    assert r.returncode == 2
    assert "nowhere" in r.stderr and "ONESTEP_CIFAR10" in r.stderr
    assert not (tmp_path / "c").exists()


def test_unconditional_dataset_cannot_be_conditional(tmp_path):
    r = cli("train", "--method", "fm", "--dataset", "moons", "--conditional", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "'moons' has no labels" in r.stderr


def test_sample_from_a_folder_that_is_not_a_run(tmp_path):
    r = cli("sample", "--run", str(tmp_path), "--out", str(tmp_path / "s.npy"))
    assert r.returncode == 2 and "not a run directory" in r.stderr


def test_batch_passes_chapter_parameters(tmp_path, monkeypatch):
    from onestep import cli as cli_module

    executed = []
    monkeypatch.setattr("onestep.notebooks.execute", lambda source, params, out, cwd=None: executed.append(params))
    assert cli_module.main(["batch", "--scale", "smoke", "--chapters", "align_your_flow", "--out", str(tmp_path),
                            "--param", "study=true", "--param", "note=plain words"]) == 0
    assert executed[0]["study"] is True and executed[0]["note"] == "plain words"
    assert executed[0]["scale"] == "smoke"


@pytest.mark.parametrize("param, expected", [("study", r"expected KEY=VALUE.*'study'"),
                                             ("scale=book", r"scale is set by batch's own --scale option")])
def test_batch_refuses_bad_parameters(param, expected, tmp_path):
    r = cli("batch", "--chapters", "flow_matching", "--out", str(tmp_path), "--param", param)
    assert r.returncode != 0 and re.search(expected, r.stderr), r.stderr


def test_batch_unknown_chapter(tmp_path):
    r = cli("batch", "--chapters", "flow_matching,warp_drive", "--out", str(tmp_path))
    assert r.returncode == 2 and "warp_drive" in r.stderr and "flow_matching" in r.stderr


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_train_sample_evaluate(backend, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--method", "fm", "--backend", backend, "--dataset", "8gaussians", "--scale", "smoke",
            "--steps", "40", "--out", str(out))
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == backend and run["provenance"]["packages"]["numpy"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 40 and np.isfinite(m["final_loss"]) and m["eval"]["w2"] > 0
    assert not (tmp_path / "run.partial").exists()

    # never overwritten by accident, and a failed overwrite leaves the old run intact
    before = (out / "metrics.json").read_text()
    r = cli("train", "--method", "fm", "--backend", backend, "--dataset", "8gaussians", "--steps", "40",
            "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    r = cli("train", "--method", "fm", "--backend", backend, "--dataset", "8gaussians", "--steps", "40",
            "--batch-size", "10000000", "--out", str(out), "--overwrite")
    assert r.returncode != 0
    assert (out / "metrics.json").read_text() == before

    noise = np.random.default_rng(0).normal(size=(7, 2))
    np.save(tmp_path / "noise.npy", noise)
    r = cli("sample", "--run", str(out), "--steps", "4", "--noise", str(tmp_path / "noise.npy"),
            "--out", str(tmp_path / "s.npy"))
    assert r.returncode == 0, r.stderr
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (7, 2) and np.all(np.isfinite(s)) and not np.allclose(s, noise)

    np.save(tmp_path / "bad.npy", np.zeros((3, 5)))
    r = cli("sample", "--run", str(out), "--noise", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "b.npy"))
    assert r.returncode == 2 and "(3, 5)" in r.stderr and "(n, 2)" in r.stderr
    r = cli("sample", "--run", str(out), "--label", "3", "--out", str(tmp_path / "b.npy"))
    assert r.returncode == 2 and "not class-conditional" in r.stderr

    r = cli("evaluate", "--run", str(out), "--steps", "4", "--n", "300")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["w2"] > 0


def test_corrupt_checkpoint_is_reported(tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--method", "fm", "--dataset", "8gaussians", "--steps", "5", "--out", str(out)).returncode == 0
    (out / "checkpoint").write_bytes(b"garbage")
    r = cli("sample", "--run", str(out), "--out", str(tmp_path / "s.npy"))
    assert r.returncode == 2 and "not a torch onestep checkpoint" in r.stderr


def test_distillation_teachers(tmp_path):
    """CD needs a teacher: none, a missing folder and a non-FM run are refused with a way out;
    the exact field and a trained FM run both work, and the student samples and evaluates."""
    common = ("train", "--method", "cm", "--variant", "cd", "--dataset", "8gaussians", "--steps", "30")
    r = cli(*common, "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "needs a teacher" in r.stderr and "--teacher exact" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    r = cli(*common, "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "--method fm" in r.stderr
    r = cli("train", "--method", "cm", "--variant", "sct", "--dataset", "8gaussians", "--steps", "5",
            "--teacher", "exact", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "trains without a teacher" in r.stderr

    assert cli(*common, "--teacher", "exact", "--out", str(tmp_path / "cd")).returncode == 0
    run = json.loads((tmp_path / "cd" / "run.json").read_text())
    assert run["variant"] == "cd" and run["teacher"] == "exact"
    r = cli(*common, "--teacher", str(tmp_path / "cd"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "must be a flow-matching (fm) run" in r.stderr

    assert cli("train", "--method", "fm", "--dataset", "8gaussians", "--steps", "30",
               "--out", str(tmp_path / "fm")).returncode == 0
    r = cli(*common, "--teacher", str(tmp_path / "fm"), "--out", str(tmp_path / "cd_fm"))
    assert r.returncode == 0, r.stderr
    r = cli("sample", "--run", str(tmp_path / "cd_fm"), "--steps", "2", "--n", "5", "--out", str(tmp_path / "s.npy"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "s.npy").shape == (5, 2)
    r = cli("sample", "--run", str(tmp_path / "cd_fm"), "--solver", "heun", "--out", str(tmp_path / "s.npy"))
    assert r.returncode == 2 and "samples by jumps" in r.stderr
    r = cli("evaluate", "--run", str(tmp_path / "cd_fm"), "--n", "200")
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == 1


def test_unknown_variant(tmp_path):
    r = cli("train", "--method", "cm", "--variant", "ctx", "--dataset", "8gaussians", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown variant 'ctx'" in r.stderr and "ict, ct, cd, sct, scd" in r.stderr


def test_ayf_variants_teachers_and_autoguidance(tmp_path):
    """AYF trains all three objectives from the exact field and an FM run; autoguidance needs a distinct weak
    FM run of the same data set and backend, and only AYF takes one."""
    fm_args = ("train", "--method", "fm", "--dataset", "8gaussians")
    assert cli(*fm_args, "--steps", "30", "--out", str(tmp_path / "fm")).returncode == 0
    assert cli(*fm_args, "--steps", "10", "--out", str(tmp_path / "weak")).returncode == 0
    ayf_args = ("train", "--method", "ayf", "--dataset", "8gaussians", "--steps", "20")
    for variant in ("emd", "lmd", "emd+lmd"):
        r = cli(*ayf_args, "--variant", variant, "--teacher", "exact", "--out", str(tmp_path / variant))
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / variant / "run.json").read_text())["variant"] == variant
    r = cli(*ayf_args, "--teacher", str(tmp_path / "fm"), "--out", str(tmp_path / "emd_fm"))
    assert r.returncode == 0, r.stderr

    guided = (*ayf_args, "--teacher", str(tmp_path / "fm"))
    r = cli(*guided, "--weak-teacher", str(tmp_path / "weak"), "--out", str(tmp_path / "guided"))
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "guided" / "run.json").read_text())
    assert run["weak_teacher"] == str(tmp_path / "weak") and run["preset"]["model"]["n_cond"] == 3
    r = cli("sample", "--run", str(tmp_path / "guided"), "--steps", "2", "--n", "5", "--out", str(tmp_path / "s.npy"))
    assert r.returncode == 0, r.stderr

    r = cli(*guided, "--weak-teacher", str(tmp_path / "fm"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "is the teacher" in r.stderr and "weaker checkpoint" in r.stderr
    r = cli(*guided, "--weak-teacher", str(tmp_path / "emd"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "weak teacher must be a flow-matching (fm) run" in r.stderr
    r = cli(*guided, "--weak-teacher", str(tmp_path / "weak"), "--backend", "jax", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "trained with the torch backend" in r.stderr
    r = cli("train", "--method", "cm", "--variant", "cd", "--dataset", "8gaussians", "--teacher", "exact",
            "--weak-teacher", str(tmp_path / "weak"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "method 'cm' has no autoguidance" in r.stderr
    r = cli("train", "--method", "ayf", "--dataset", "moons", "--teacher", str(tmp_path / "fm"),
            "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "trained on '8gaussians'" in r.stderr and "'moons'" in r.stderr
    assert not (tmp_path / "x").exists()
