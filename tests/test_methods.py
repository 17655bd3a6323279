"""The method contract and the library's shape: every registered method provides the ``Method``
protocol with its signatures; the shared flow-map primitives are one object under their several
names; imports run one way, with no cycles and no imports hidden inside functions."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
from parity import backend64

from onestep import BACKENDS, analytic
from onestep.backends.architectures import MLPConfig
from onestep.methods import METHODS, Method, describe, flowmap, get_method, make_loss, method_of

PACKAGE = Path(__file__).resolve().parent.parent / "onestep"


# -- the contract --------------------------------------------------------------------------------
def _protocol_signature(name: str) -> list[str]:
    return list(inspect.signature(getattr(Method, name)).parameters)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_provides_the_protocol(name):
    method = get_method(name)
    assert isinstance(method, Method)
    assert method.VARIANTS and all(isinstance(v, str) for v in method.VARIANTS)
    cfg = method.Config()  # the defaults are a valid config (the paper's values)
    assert method.n_cond(cfg) in (1, 2)
    assert method_of(cfg) is method
    assert isinstance(method.needs_teacher(cfg), bool)
    for fn in ("needs_teacher", "n_cond", "draw", "loss_from_draws"):
        assert list(inspect.signature(getattr(method, fn)).parameters) == _protocol_signature(fn), fn
    # a sampler may take options of its own (an ODE solver, CTM's γ) after the protocol's arguments
    sample = list(inspect.signature(method.sample).parameters)
    assert sample[:len(_protocol_signature("sample"))] == _protocol_signature("sample")


def test_make_loss_names_the_method_and_refuses_foreign_configs():
    cm = get_method("cm")
    assert describe(cm.Config(variant="cd")) == "method 'cm' (variant 'cd')"
    with pytest.raises(TypeError, match="MLPConfig is not the Config of a method"):
        make_loss(None, MLPConfig(data_dim=2), 10)


# -- shared flow-map primitives ------------------------------------------------------------------
def test_jump_and_average_velocity_are_inverse_on_the_exact_map():
    gmm = analytic.eight_gaussians()
    rng = np.random.default_rng(0)
    z, t = rng.normal(size=(40, 2)), rng.uniform(0.3, 1.0, 40)
    r = t * rng.uniform(size=40)
    u = gmm.average_velocity(z, r, t)
    assert np.allclose(flowmap.jump(z, u, t, r), gmm.flow_map(z, t, r), rtol=0, atol=1e-10)
    assert np.allclose(flowmap.average_velocity(z, gmm.flow_map(z, t, r), t, r), u, rtol=0, atol=1e-10)
    assert np.array_equal(flowmap.jump(z, u, t, t), z)  # the boundary f(z, t, t) = z


def test_ctm_forms_are_the_same_jump():
    """CTM's clean prediction g and its EDM jump G give back our flow map, and g is the jump to 0."""
    rng = np.random.default_rng(1)
    z, u = rng.normal(size=(30, 2)), rng.normal(size=(30, 2))
    t = rng.uniform(0.05, 0.95, 30)
    g = flowmap.ctm_g(z, t, u)
    assert np.allclose(g, flowmap.jump(z, u, t, 0.0), rtol=0, atol=1e-14)
    assert np.allclose(flowmap.average_velocity_from_g(z, t, g), u, rtol=0, atol=1e-12)
    # with g fixed, G interpolates in σ: at r = 0 it lands on g, at r = t it is the identity
    assert np.allclose(flowmap.ctm_jump(z, t, 0 * t, g), g, rtol=0, atol=1e-12)
    assert np.allclose(flowmap.ctm_jump(z, t, t, g), z, rtol=0, atol=1e-12)


def _exact_u(bk, model, rate, z, r, t, y):
    """The exact average velocity of ``dz/dt = rate·z``, whose map is ``z_r = e^{rate·(r − t)}·z``."""
    gap = flowmap.per_row(bk, t - r, z)[:, None]
    return z * (1 - bk.xp.exp(-rate * gap)) / gap


@pytest.mark.parametrize("name", BACKENDS)
def test_sample_jumps_chains_the_jumps_of_a_field(name):
    """With an exact average velocity as the "network", jumps on any grid compose to the exact map."""
    bk = backend64(name)
    z = np.random.default_rng(2).normal(size=(20, 2))
    for times in (flowmap.uniform_times(1), flowmap.uniform_times(3), (1.0, 0.9, 0.35, 0.0)):
        out = bk.to_numpy(flowmap.sample_jumps(bk, _exact_u, None, 0.7, bk.from_numpy(z), times))
        assert np.allclose(out, np.exp(-0.7) * z, rtol=0, atol=1e-13)
    path = flowmap.sample_jumps(bk, _exact_u, None, 0.7, bk.from_numpy(z), (1.0, 0.5, 0.0), trajectory=True)
    assert path.shape == (3, 20, 2) and np.allclose(path[1], np.exp(-0.35) * z, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match=r"0 ≤ r ≤ t ≤ 1, got t = 0.2, r = 0.5"):
        flowmap.sample_jumps(bk, _exact_u, None, 0.7, bk.from_numpy(z), (0.2, 0.5))


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "2"])
def test_bad_step_counts(steps):
    with pytest.raises(ValueError, match=f"positive integer, got {steps!r}"):
        flowmap.uniform_times(steps)


@pytest.mark.parametrize("name", BACKENDS)
def test_label_dropout_replaces_labels_with_the_null_class(name):
    bk = backend64(name)
    model = bk.make_model(MLPConfig(data_dim=2, n_classes=5), bk.key(0))
    batch = {"x": bk.from_numpy(np.zeros((4000, 2))), "y": bk.from_numpy(np.arange(4000) % 5)}
    drop = flowmap.label_dropout(bk, bk.key(1), batch, 0.25)["drop"]
    y = bk.to_numpy(flowmap.condition_labels(bk, model, batch["y"], drop))
    assert abs(np.mean(y == 5) - 0.25) < 0.03
    kept = y != 5
    assert np.array_equal(y[kept], (np.arange(4000) % 5)[kept])
    assert flowmap.label_dropout(bk, bk.key(1), {"x": batch["x"], "y": None}, 0.25) == {}


# -- the shape of the library --------------------------------------------------------------------
LAYERS = [  # lowest first: a module may import from its own layer or a lower one
    {"conventions", "paths", "times", "analytic", "data", "metrics", "evaluation", "plots", "ode", "files"},
    {"backends", "__init__"},
    {"methods", "teachers"},
    {"train"},
    {"presets", "runs"},
    {"cli", "notebooks", "chapter", "__main__"},
]
FUNCTION_IMPORTS_ALLOWED = {"onestep.cli", "onestep.backends"}  # fast --help; the framework chosen at run time


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """``(imported onestep module, inside a function?)`` for every import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("onestep"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found = (PACKAGE.parent / target.replace(".", "/")).with_suffix(".py").exists() or \
                    (PACKAGE.parent / target.replace(".", "/")).is_dir()
                yield (target if found else base), id(node) in in_function
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("onestep"):
                    yield alias.name, id(node) in in_function


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


GRAPH = {_module_name(p): list(_imports(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in GRAPH:
        _layer(module)


def test_imports_run_one_way():
    upward = [(m, t) for m, imports in GRAPH.items() for t, _ in imports if _layer(t) > _layer(m)]
    assert not upward, upward


def test_methods_do_not_import_each_other():
    for module, imports in GRAPH.items():
        if module.startswith("onestep.methods.") and module != "onestep.methods.flowmap":
            others = [t for t, _ in imports if t.startswith("onestep.methods") and t != "onestep.methods.flowmap"]
            assert not others, (module, others)


def test_no_imports_inside_functions():
    hidden = [(m, t) for m, imports in GRAPH.items() if m not in FUNCTION_IMPORTS_ALLOWED
              for t, inside in imports if inside]
    assert not hidden, hidden


def test_no_import_cycles():
    edges = {m: {t for t, _ in imports if t in GRAPH and t != m} for m, imports in GRAPH.items()}
    # a package's __init__ re-exporting its submodules is not a cycle of the code's logic
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, nxt])}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [])
