"""Reference scores and seed summaries: what a perfect sampler scores (with its spread), the mode
spread of mixture samples, and the mean ± spread over training seeds read from committed runs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from onestep import metrics
from onestep.analytic import eight_gaussians
from onestep.evaluation import (
    committed_book_run,
    committed_seeds,
    committed_study,
    evaluate,
    mode_spread,
    noise_redraw_score,
    over_seeds,
    perfect_over_seeds,
    perfect_sampler_score,
    reference,
    sampling_over_seeds,
    seed_command,
    seed_run_dir,
    study_command,
)


def test_perfect_sampler_is_scored_like_a_model_and_is_no_lower_bound():
    n = 304
    perfect = perfect_sampler_score("8gaussians", n, seed=0, draws=4)
    assert set(perfect) == set(evaluate("8gaussians", reference("8gaussians", n, 1)))  # the same metrics
    w2 = perfect["w2"]
    assert len(w2["values"]) == 4 and w2["std"] > 0 and len(set(w2["values"])) == 4  # independent draws
    assert w2["mean"] == pytest.approx(np.mean(w2["values"])) and w2["std"] == pytest.approx(np.std(w2["values"], ddof=1))
    # the draws are fresh data scored against the same reference a model of this seed is scored against
    ref = reference("8gaussians", n, 0)
    own = perfect_sampler_score("8gaussians", n, seed=0, draws=2, score=lambda x, y: {"w2": metrics.w2(x, ref)})
    assert own["w2"]["values"] == pytest.approx(w2["values"][:2], rel=1e-12)
    # not a floor: exact modes filled evenly (n/8 points each, radial quantiles on a golden-angle
    # spiral) instead of at random score below a perfect sampler's mean
    gmm = eight_gaussians()
    m = n // 8
    radius = np.sqrt(-2 * np.log(1 - (np.arange(m) + 0.5) / m))
    angle = np.arange(m) * np.pi * (3 - np.sqrt(5))
    even = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    stratified = np.concatenate([mu + std * even for mu, std in zip(gmm.means, gmm.stds)])
    assert metrics.w2(stratified, reference("8gaussians", len(stratified), 0)) < w2["mean"]
    with pytest.raises(ValueError, match=r"draws must be an integer ≥ 2.*got 1"):
        perfect_sampler_score("8gaussians", n, draws=1)


def test_perfect_sampler_on_images_uses_training_images_against_the_test_reference():
    perfect = perfect_sampler_score("digits", 200, seed=0, draws=2)
    assert set(perfect) == {"fd", "class_accuracy"} and perfect["fd"]["mean"] > 0
    assert perfect["fd"]["values"][0] != perfect["fd"]["values"][1]


def test_mode_spread_measures_sharpness():
    gmm = eight_gaussians()
    exact = gmm.sample(20_000, 0)
    assert mode_spread(exact, gmm) == pytest.approx(1.0, abs=0.02)
    rng = np.random.default_rng(1)
    k = rng.integers(0, 8, 20_000)
    def drawn(scale):  # modes drawn tighter or blurrier than the data's
        return gmm.means[k] + scale * gmm.stds[k, None] * rng.normal(size=(20_000, 2))

    assert mode_spread(drawn(0.5), gmm) == pytest.approx(0.5, rel=0.03)
    assert 1.6 < mode_spread(drawn(2.0), gmm) < 2.0  # wide modes: a few points count towards a neighbour
    assert mode_spread(np.zeros((10, 2)), gmm) > 5  # everything at the centre, between the modes


def test_over_seeds_and_committed_runs(tmp_path):
    per_seed = {0: {"w2": 1.0, "x": 3.0}, 1: {"w2": 2.0, "x": 3.0}, 2: {"w2": 3.0, "x": 3.0}}
    stats = over_seeds(per_seed, ["w2"])
    assert stats["w2"]["mean"] == 2.0 and stats["w2"]["std"] == 1.0 and stats["w2"]["text"] == "2.000 ± 1.000"
    assert stats["w2"]["values"] == {0: 1.0, 1: 2.0, 2: 3.0}
    assert over_seeds({5: {"w2": 0.25}}, ["w2"])["w2"]["text"] == "0.250"  # one seed: no spread to show
    for seed in (0, 2):
        path = seed_run_dir("flow_matching", "torch", "book", seed, root=tmp_path)
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps({"seed": seed}))
    found = committed_seeds("flow_matching", "torch", "book", (0, 1, 2), root=tmp_path)
    assert found == {0: {"seed": 0}, 2: {"seed": 2}}
    command = seed_command("flow_matching", "torch", "book", (0, 1, 2))
    assert "--seed $s" in command and "--out results/seeds/seed$s" in command and command.startswith("for s in 0 1 2")
    assert seed_run_dir("flow_matching", "torch", "book", 1).parts[-3:] == ("seeds", "seed1", "flow_matching-torch-book")


def test_perfect_sampler_and_sampling_tables_over_seeds():
    # a perfect sampler over seeds: the spread of its per-seed means, not of the draws within one seed
    perfect = {0: {"w2": {"mean": 0.2, "std": 0.01}, "fd": {"mean": 9.0, "std": 1.0}},
               1: {"w2": {"mean": 0.3, "std": 0.05}, "fd": {"mean": 9.0, "std": 1.0}}}
    stats = perfect_over_seeds(perfect, ["w2"])
    assert set(stats) == {"w2"} and stats["w2"]["mean"] == pytest.approx(0.25)
    assert stats["w2"]["std"] == pytest.approx(np.std([0.2, 0.3], ddof=1)) and stats["w2"]["values"] == {0: 0.2, 1: 0.3}
    # image tables: row k of every seed is the same sampler setting
    tables = {s: [{"steps": 1, "fd": 5.0 + s, "class_accuracy": 0.9}, {"steps": 4, "fd": 3.0, "class_accuracy": 0.9 + s / 100}]
              for s in (0, 1, 2)}
    rows = sampling_over_seeds(tables)
    assert [r["steps"] for r in rows] == [1, 4]
    assert rows[0]["fd"] == "6.000 ± 1.000" and rows[1]["fd"] == "3.000 ± 0.000"
    assert rows[1]["stats"]["class_accuracy"]["values"] == {0: 0.9, 1: 0.91, 2: 0.92}
    with pytest.raises(ValueError, match=r"seed 1's table has steps \[1\]; every seed needs the same \[1, 4\]"):
        sampling_over_seeds({0: tables[0], 1: tables[1][:1]})


def test_noise_redraw_score_moves_only_with_the_noise():
    seen = []

    def sample(z):  # a fixed "model": a shift of its noise
        seen.append(z)
        return z + 1.0

    score = noise_redraw_score(sample, lambda x: {"mean": float(x.mean()), "one": 1.0}, (500, 2), draws=3, seed=4)
    assert [z.shape for z in seen] == [(500, 2)] * 3 and len({float(z[0, 0]) for z in seen}) == 3  # fresh draws
    assert score["mean"]["values"] == pytest.approx([float(z.mean()) + 1.0 for z in seen], rel=1e-12)
    assert score["mean"]["std"] == pytest.approx(np.std(score["mean"]["values"], ddof=1))
    # of the size of the mean of 1000 standard normals, not zero: the noise alone moves a score
    assert 0.005 < score["mean"]["std"] < 0.1
    assert score["one"] == {"mean": 1.0, "std": 0.0, "values": [1.0, 1.0, 1.0]}  # no noise, no spread
    again = noise_redraw_score(sample, lambda x: {"mean": float(x.mean())}, (500, 2), draws=3, seed=4)
    other = noise_redraw_score(sample, lambda x: {"mean": float(x.mean())}, (500, 2), draws=3, seed=5)
    assert again["mean"]["values"] == score["mean"]["values"] and other["mean"]["values"] != score["mean"]["values"]
    with pytest.raises(ValueError, match=r"draws must be an integer ≥ 2.*got 1"):
        noise_redraw_score(sample, lambda x: {}, (5, 2), draws=1)


def test_committed_study_prefers_this_backend_and_needs_a_study(tmp_path):
    def commit(backend, content):
        path = tmp_path / "studies" / f"meanflow-{backend}-book"
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps(content))
        return path / "metrics.json"

    assert committed_study("meanflow", "torch", root=tmp_path) is None
    jax_file = commit("jax", {"study": []})
    assert committed_study("meanflow", "torch", root=tmp_path) == jax_file  # the other backend's, for want of one
    torch_file = commit("torch", {"study_read_from": "elsewhere"})  # a run that read the study, not one that made it
    assert committed_study("meanflow", "torch", root=tmp_path) == jax_file
    torch_file.write_text(json.dumps({"study": []}))
    assert committed_study("meanflow", "torch", root=tmp_path) == torch_file
    assert study_command("meanflow", "jax") == ("python -m onestep batch --chapters meanflow --backend jax --scale book "
                                                "--param study=run --out results/studies")


@pytest.mark.parametrize("chapter", ["flow_matching", "consistency_models", "consistency_trajectory_models",
                                     "shortcut_models"])
def test_committed_seed_runs_keep_their_numbers_and_the_noise_redraw_spread(chapter):
    """Chapters 1–4 compare methods over the committed per-seed runs; each run's metrics.json keeps its own
    numbers and how much its scores move when only the sampler's noise is drawn again."""
    for backend in ("torch", "jax"):
        runs = committed_seeds(chapter, backend, "book", (0, 1, 2))
        assert sorted(runs) == [0, 1, 2], f"{chapter}-{backend}: committed seeds {sorted(runs)}"
        for seed, run in runs.items():
            assert run["seed"] == seed and run["scale"] == "book" and run["backend"] == backend
            redraws = run.get("8gaussians", run)["noise_redraws"]
            assert redraws, f"{chapter}-{backend} seed {seed}: no noise redraws"
            for setting, scores in redraws.items():
                w2 = scores["w2"]
                assert len(w2["values"]) >= 2 and w2["std"] > 0, (chapter, backend, seed, setting)


def test_committed_book_run_is_seed_zero_of_this_backend_else_the_other(tmp_path):
    root = tmp_path / "results"
    assert committed_book_run("flow_matching", "jax", root=root) == {}
    for backend in ("torch", "jax"):
        path = seed_run_dir("flow_matching", backend, "book", 0, root=root)
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps({"backend": backend}))
    seed1 = seed_run_dir("flow_matching", "jax", "book", 1, root=root)
    seed1.mkdir(parents=True)
    (seed1 / "metrics.json").write_text(json.dumps({"backend": "jax", "seed": 1}))
    found = committed_book_run("flow_matching", "jax", root=root)
    assert found == {"backend": "jax", "file": seed_run_dir("flow_matching", "jax", "book", 0, root=root)
                     .relative_to(tmp_path) / "metrics.json"}
    (seed_run_dir("flow_matching", "jax", "book", 0, root=root) / "metrics.json").unlink()
    assert committed_book_run("flow_matching", "jax", root=root)["backend"] == "torch"  # the other backend's
