"""Preemption-safe runs: a run killed at any point (SIGKILL mid-run, after its last step, during its
evaluation) resumes to the weights and loss history of a run that never stopped, bit for bit on the
CPU; SIGTERM checkpoints and exits with a clear message; resuming with other settings, bad noise files
and failures before the first checkpoint stop cleanly and overwrite nothing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from onestep import BACKENDS, cli, get_backend
from onestep.presets import run_preset
from onestep.runs import CKPT, RunDir, read_run
from onestep.train import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# long enough that a kill at the first checkpoint (step 100 at smoke scale) lands mid-run
TRAIN = ["train", "--method", "fm", "--dataset", "8gaussians", "--scale", "smoke", "--steps", "3000",
         "--batch-size", "64"]


def args(backend: str, out, *extra) -> list[str]:
    return [*TRAIN, "--backend", backend, "--out", str(out), *extra]


def final_state(run_dir: str):
    """The backend and the train state in a run directory's checkpoint (committed or staged)."""
    info = read_run(run_dir)
    preset = run_preset(info["method"], info["dataset"], info["scale"], variant=info["variant"],
                        **info["train_overrides"])
    bk = get_backend(info["backend"])
    return bk, bk.load(init_state(bk, preset.model, preset.train, info["seed"]), os.path.join(run_dir, CKPT))


def assert_same_run(a: str, b: str) -> None:
    """Bitwise equal model, EMA and optimiser step, and the same loss history."""
    (bk, sa), (_, sb) = final_state(a), final_state(b)
    assert sa.step == sb.step
    for net in ("model", "ema"):
        pa, pb = bk.get_params(getattr(sa, net)), bk.get_params(getattr(sb, net))
        assert all(np.array_equal(pa[k], pb[k]) for k in pa), net
    assert sa.history == sb.history and len(sa.history) == sa.step // 50
    with open(os.path.join(a, "metrics.json")) as fa, open(os.path.join(b, "metrics.json")) as fb:
        ma, mb = json.load(fa), json.load(fb)
    assert ma["loss_history"] == mb["loss_history"] and ma["eval"] == mb["eval"]


@pytest.fixture(scope="module", params=BACKENDS)
def reference(request, tmp_path_factory):
    """``(backend, run directory)`` of an uninterrupted run."""
    out = tmp_path_factory.mktemp(f"reference-{request.param}") / "run"
    assert cli.main(args(request.param, out)) == 0
    return request.param, str(out)


def interrupt(backend: str, out, sig: signal.Signals, timeout: float = 300) -> tuple[int, str]:
    """Start a training run in a subprocess, send it ``sig`` as soon as its first checkpoint exists
    (mid-run), and return its exit status and stderr."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "ONESTEP_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "onestep", *args(backend, out)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(str(out) + ".partial", CKPT)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_sigkill_mid_run_then_resume_is_bitwise(reference, tmp_path):
    backend, ref = reference
    out = tmp_path / "run"
    interrupt(backend, out, signal.SIGKILL)
    assert not out.exists()  # killed before it finished
    _, killed = final_state(str(out) + ".partial")
    assert 0 < killed.step < 3000 and killed.history  # mid-run, with its loss history
    assert cli.main(args(backend, out, "--resume")) == 0
    assert_same_run(ref, str(out))
    assert not os.path.exists(str(out) + ".partial")


def test_sigterm_writes_a_checkpoint_and_exits_with_a_message(reference, tmp_path):
    backend, ref = reference
    out = tmp_path / "run"
    status, err = interrupt(backend, out, signal.SIGTERM)
    assert status == cli.INTERRUPTED, err
    _, stopped = final_state(str(out) + ".partial")
    assert f"interrupted: stopped by SIGTERM after step {stopped.step} of 3000" in err and "--resume" in err
    assert cli.main(args(backend, out, "--resume")) == 0
    assert_same_run(ref, str(out))


@pytest.mark.parametrize("keep_metrics", [False, True])
def test_resume_after_the_last_step_or_during_evaluation(reference, tmp_path, keep_metrics):
    """A run killed after its final checkpoint (during evaluation, or just before committing) resumes
    without training, keeping its loss history (this used to end in an IndexError)."""
    backend, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref, str(out) + ".partial")
    if not keep_metrics:
        os.remove(str(out) + ".partial/metrics.json")
    assert cli.main(args(backend, out, "--resume")) == 0
    assert_same_run(ref, str(out))


def contents(folder: str) -> dict:
    out = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.mark.parametrize("change, named", [(["--seed", "1"], "seed=0"), (["--method", "cm", "--variant", "sct"],
                                                                         "method='fm'")])
def test_resume_with_other_settings_is_refused(reference, tmp_path, capsys, change, named):
    backend, ref = reference
    staged = str(tmp_path / "run") + ".partial"
    shutil.copytree(ref, staged)
    before = contents(staged)
    assert cli.main([*args(backend, tmp_path / "run", "--resume"), *change]) == 2
    assert named in capsys.readouterr().err
    assert contents(staged) == before


def test_resume_on_another_world_size_is_refused(reference, tmp_path, capsys):
    backend, ref = reference
    staged = str(tmp_path / "run") + ".partial"
    shutil.copytree(ref, staged)
    with open(os.path.join(staged, "run.json")) as f:
        record = json.load(f)
    with open(os.path.join(staged, "run.json"), "w") as f:
        json.dump({**record, "world_size": 2}, f)
    assert cli.main(args(backend, tmp_path / "run", "--resume")) == 2
    assert "world_size=2" in capsys.readouterr().err


def test_bad_noise_files_are_refused(reference, tmp_path, capsys):
    _, ref = reference
    cases = {"nan.npy": (np.full((4, 2), np.nan), "8 NaN or infinite values"),
             "int.npy": (np.ones((4, 2), dtype=np.int64), "not a float array"),
             "object.npy": (np.array([{"a": 1}], dtype=object), "is not a .npy array of floats")}
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array, allow_pickle=True)
        out = tmp_path / f"{name}.samples.npy"
        assert cli.main(["sample", "--run", ref, "--noise", str(tmp_path / name), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err, name
        assert not out.exists()


def test_a_missing_cifar10_folder_stops_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ONESTEP_CIFAR10", raising=False)
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "fm", "--dataset", "cifar10", "--out", str(out)]) == 2
    assert "CIFAR-10 needs a local copy" in capsys.readouterr().err
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_a_failed_run_keeps_its_partial_folder_only_with_a_checkpoint(tmp_path):
    for checkpoint in (False, True):
        out = tmp_path / f"run-{checkpoint}"
        with pytest.raises(RuntimeError, match="failed"), RunDir(str(out)) as run:
            if checkpoint:
                open(run.file(CKPT), "wb").close()
            raise RuntimeError("failed")
        assert os.path.exists(str(out) + ".partial") == checkpoint


def test_batch_resume_starts_at_the_first_unfinished_chapter(tmp_path, monkeypatch):
    executed = []
    monkeypatch.setattr("onestep.notebooks.execute", lambda source, params, out, cwd=None: executed.append(
        os.path.basename(params["out_dir"])))
    (tmp_path / "flow_matching-torch-smoke").mkdir()
    (tmp_path / "consistency_models-torch-smoke.partial").mkdir()
    batch = ["batch", "--scale", "smoke", "--chapters", "flow_matching,consistency_models", "--out", str(tmp_path)]
    assert cli.main(batch) == 2  # a finished chapter is neither replaced nor skipped without being asked
    assert cli.main([*batch, "--resume"]) == 0
    assert executed == ["consistency_models-torch-smoke"]
    assert (tmp_path / "consistency_models-torch-smoke.partial").exists()  # kept: the chapter resumes from it
