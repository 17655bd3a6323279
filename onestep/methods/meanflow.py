"""MeanFlow (Geng et al. 2025), written once for both backends.

The network predicts the *average velocity* of the PF-ODE over ``[r, t]``,

    u_θ(z, r, t) ≈ (z − Φ_{t→r}(z))/(t − r),    z_r = z − (t − r)·u_θ(z, r, t)  (``flowmap.jump``),

so one step from noise is ``x0 = x1 − u_θ(x1, 0, 1)`` and any grid of jumps samples in more steps.
Differentiating ``(t − r)·u(z_t, r, t) = ∫_r^t v(z_τ, τ) dτ`` in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) − (t − r)·du/dt,    du/dt = ∂_z u·v + ∂_t u,

and the loss regresses ``u_θ`` onto ``sg(ṽ − (t − r)·du_θ/dt)``: du_θ/dt is ONE ``bk.jvp`` with
tangent ``(ṽ, 0, 1)`` on ``(z, r, t)``, whose primal output is the prediction.  ``ṽ`` is the
conditional velocity ``x1 − x0`` (the target is affine in it, so its conditional mean is the
target built from the marginal field, as in flow matching), or with labels its guided form
(below).  Each row's squared error is summed over dimensions and weighted adaptively by
``1/sg((‖Δ‖² + ε)^p)``.

Times: t and r are two logit-normal draws, sorted (t the larger); the first
``⌊n·border_fraction⌋`` rows of a batch get ``r = t``, where the target is ṽ and the row is a
flow-matching row.  Guidance trained in (class labels): on labelled rows with ``t`` in the
guidance interval that keep their label,

    ṽ = ω·v + (1 − ω − κ)·u_θ(z, t, t | ∅) + κ·u_θ(z, t, t | c),

with the online network under stop-gradient; rows whose label is dropped keep ṽ = v.  At its
fixed point the conditional field is ``v_∅ + (ω/(1 − κ))·(v_c − v_∅)``: guided at scale
``ω/(1 − κ)``, and sampled with one network call per jump and no guidance at inference.

Mapping from the official code (JAX ``Gsunshine/meanflow``, PyTorch ``Gsunshine/py-meanflow``),
which shares our orientation (data at t = 0, ``v = e − x``, jump ``z − (t − r)·u``): the net's
``(t, h = t − r)`` is our ``embedding = "t_gap"``; ``P_mean, P_std`` are ``time_mean, time_std``;
the JAX ``data_proportion`` (fraction of rows with r = t, 0.75) is our ``border_fraction``, while
the PyTorch ``--ratio`` is the fraction with r ≠ t (0.75, so 25% have r = t): the two keys mean
opposite things; ``norm_p, norm_eps`` are ``norm_p, norm_eps``; ``omega, kappa``, ``t_start, t_end``
and ``class_dropout_prob`` are ``omega, kappa``, ``guidance_interval`` and ``label_dropout``.

Departures: the network sees the two times through the book's sinusoidal embedding with the
times unscaled (as the official DiT; ``network_times`` divides by the embedding's ×1000) and
concatenated, not through two separate embedding MLPs that are summed; label dropout is a
Bernoulli mask per row (the JAX code drops the first rows, which are also its r = t rows, so its
unconditional field is trained almost only at r = t); the guided velocity has no clip of
``t − r`` (a no-op for 0 ≤ r ≤ t ≤ 1).

The pieces α-Flow shares (times, network call, guided velocity, JVP target, adaptive weight,
sampler) live in ``twotime``; its ``path`` setting trains on another interpolation than the
straight line (Chapter 7's cosine path: ṽ is then ``dz_t/dt`` of that path, and the identity is
unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import twotime

VARIANTS = ("meanflow",)


@dataclass(frozen=True)
class Config(twotime.TwoTimeConfig):
    """Hyper-parameters of the MeanFlow objective (``twotime.TwoTimeConfig``); defaults are the official
    ImageNet (JAX) config.  Deviations per scale live in ``presets``."""


average_velocity = twotime.average_velocity  # u_θ(z, r, t): the network as a flow map's average velocity


def needs_teacher(cfg: Config) -> bool:
    return False


def n_cond(cfg: Config) -> int:
    """How many scalars the network sees: two times, (t, t − r) or (r, t) (``embedding``)."""
    return 2


# -- training --------------------------------------------------------------------------------
def draw(bk, cfg: Config, key, batch: dict, step, total_steps: int) -> dict:
    """The random part of one loss evaluation (``twotime.draw``): noise ``x1``, times ``r ≤ t`` (n,)
    with ``r = t`` on the first ``border_rows`` rows, and the label-dropout mask."""
    return twotime.draw(bk, cfg, key, batch)


def prediction_and_target(bk, cfg: Config, model, batch: dict, draws: dict):
    """``(u, u_tgt)``: the prediction ``u_θ(z_t, r, t)`` (with its gradient) and the target
    ``sg(ṽ − (t − r)·du_θ/dt)``, both from one JVP with tangent ``(ṽ, 0, 1)`` on ``(z, r, t)``."""
    z, v, y = twotime.inputs(bk, cfg, model, batch, draws)
    return twotime.jvp_target(bk, cfg, model, z, draws["r"], draws["t"], v, y)


def loss_from_draws(bk, cfg: Config, model, target, batch: dict, draws: dict, teacher=None):
    """Mean over rows of ``w·‖u_θ − u_tgt‖²`` (summed over dimensions), ``w`` the adaptive weight.
    ``aux``: the unweighted squared error on the rows with r = t (``border_sq``) and r < t (``jump_sq``)."""
    u, u_tgt = prediction_and_target(bk, cfg, model, batch, draws)
    sq = twotime.row_squared_error(bk, u, u_tgt)
    loss = bk.xp.mean(twotime.adaptive_weight(bk, cfg, sq) * sq)
    return loss, twotime.row_groups(bk, cfg, sq, loss)


# -- sampling --------------------------------------------------------------------------------
def sample(bk, cfg: Config, model, x1, steps: int, key, y=None, times=None, trajectory: bool = False):
    """Jumps ``z ↦ z − (t − r)·u_θ(z, r, t)`` along ``times`` (``twotime.sample``; default the uniform
    grid), with no guidance at inference; one step is ``x1 − u_θ(x1, 0, 1)``.  Deterministic, so
    ``key`` is unused."""
    return twotime.sample(bk, cfg, model, x1, steps, y, times, trajectory)

