"""Data parallelism on the CPU: two workers (torch: two gloo processes under torchrun; JAX: two host
devices) train to the same weights as one worker on the same global batch, through the library and
through the CLI; bad layouts stop with a clear error."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from data_parallel_worker import CASES, train_cases
from parity import TOL

from onestep import BACKENDS, get_backend
from onestep.backends.distributed import Topology, check_batch, local_rows
from onestep.cli import main
from onestep.runs import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "data_parallel_worker.py")
FLOAT32_TOL = 1e-5  # two float32 reductions of the same rows in another order, three Adam steps


def two_workers(backend: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` on two data-parallel workers: ``torchrun`` with two processes, or one JAX
    process with two host devices (in a subprocess, so this session keeps one device)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "ONESTEP_PROGRESS": "0"}
    if backend == "torch":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    else:  # the device count must come first: XLA stops reading flags at a bare word
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 " + env.get("XLA_FLAGS", "")
        cmd = [sys.executable, *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def max_difference(a, b, prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_workers_train_to_the_weights_of_one(backend, tmp_path):
    """K steps with global batch B on 2 workers = K steps with batch B on 1 worker: float64 to 1e-10,
    float32 to FLOAT32_TOL, for FM (with labels), sCT (a JVP objective), Shortcut and CTM."""
    out = str(tmp_path / "two.npz")
    two_workers(backend, [WORKER, backend, out])
    with open(out + ".json") as f:
        assert json.load(f)["world_size"] == 2
    two = dict(np.load(out))
    for precision in ("float64", "float32"):
        one = {f"{precision}/{k}": v for k, v in train_cases(get_backend(backend, precision=precision)).items()}
        for case in CASES:
            prefix = f"{precision}/{case}/"
            diff = max_difference(one, two, prefix)
            print(f"{backend} {precision} {case}: max |w(2 workers) - w(1 worker)| = {diff:.3g}")
            assert diff <= (TOL if precision == "float64" else FLOAT32_TOL), (backend, precision, case, diff)
            fresh = max_difference(one, {k: 0 * v for k, v in one.items()}, prefix)
            assert fresh > 0  # the weights are not all zero: the comparison compares something


def test_jax_on_two_hosts_trains_to_the_weights_of_one(tmp_path):
    """Two JAX processes joined by ``jax.distributed`` (gloo collectives on CPU, one device each), as two
    hosts would be: the multi-host path (global arrays, cross-process gathers) gives the same weights."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "ONESTEP_PROGRESS": "0",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    out = str(tmp_path / "hosts.npz")
    procs = [subprocess.Popen([sys.executable, WORKER, "jax", out if i == 0 else out + f".{i}"],
                              env={**env, "JAX_PROCESS_ID": str(i)}, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    with open(out + ".json") as f:
        assert json.load(f) | {"devices": None} == {"world_size": 2, "processes": 2, "devices": None}
    two = dict(np.load(out))
    one = {f"float64/{k}": v for k, v in train_cases(get_backend("jax", precision="float64")).items()}
    for case in CASES:
        diff = max_difference(one, two, f"float64/{case}/")
        print(f"jax, 2 processes, float64 {case}: max |w(2) - w(1)| = {diff:.3g}")
        assert diff <= TOL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli_weights(run: str, backend: str) -> dict:
    bk, ema, _, _ = load_run(run)
    assert bk.name == backend
    return bk.get_params(ema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_trains_data_parallel(backend, tmp_path):
    """``python -m onestep train`` on two workers records its world size and devices and reaches the
    weights of the one-worker run (float32)."""
    args = ["--method", "fm", "--dataset", "8gaussians", "--scale", "smoke", "--steps", "20", "--batch-size", "64",
            "--backend", backend]
    two_workers(backend, ["-m", "onestep", "train", *args, "--out", str(tmp_path / "two")])
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    with open(tmp_path / "two" / "run.json") as f:
        record = json.load(f)
    assert record["world_size"] == 2 and len(record["devices"]) == 2
    assert not os.path.exists(tmp_path / "two.partial")
    one, two = cli_weights(str(tmp_path / "one"), backend), cli_weights(str(tmp_path / "two"), backend)
    diff = max(float(np.max(np.abs(one[k] - two[k]))) for k in one)
    print(f"{backend} CLI float32: max |w(2 workers) - w(1 worker)| = {diff:.3g}")
    assert diff <= FLOAT32_TOL


def test_batches_must_split_evenly_over_the_workers():
    check_batch(8, 2)
    with pytest.raises(ValueError, match="batch size 7 does not split evenly over 2 .* multiple of 2"):
        check_batch(7, 2)
    with pytest.raises(ValueError, match="batch size 2 is smaller than the number of data-parallel workers 4"):
        check_batch(2, 4)


def test_local_rows_deal_rows_out_strided_and_refuse_other_shapes():
    x, shared = np.arange(12).reshape(6, 2), np.asarray(3.0)
    tree = {"batch": {"x": x, "y": None}, "draws": {"warmup": shared}}
    mine = local_rows(tree, 6, 1, 3, None)
    assert np.array_equal(mine["batch"]["x"], x[[1, 4]]) and mine["draws"]["warmup"] is shared
    assert local_rows(tree, 6, 0, 1, None)["batch"]["x"] is x
    with pytest.raises(ValueError, match=r"shape \(5,\) is neither per-row .* 6"):
        local_rows({"levels": np.zeros(5)}, 6, 0, 2, None)


def test_topology_records_the_layout():
    assert Topology().record() == {"world_size": 1, "processes": 1, "devices": []}
    assert Topology(world_size=2, rank=1, processes=2).is_main is False


def test_jax_refuses_more_devices_than_it_has():
    with pytest.raises(ValueError, match="devices must be 'all' or an integer in 1..1 .* got 3"):
        get_backend("jax", devices=3)
