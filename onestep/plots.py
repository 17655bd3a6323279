"""Figures the chapters share: sample scatters, image grids, and the scrubbable
velocity-field animation (matplotlib → jshtml, so it works in the static book)."""
from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import animation

# to_jshtml() links Font Awesome from a CDN for its buttons; the book must load offline
# (its theme already ships Font Awesome), so the link is dropped.
_REMOTE_ICONS = re.compile(r'<link rel="stylesheet"\s+href="https://[^"]*font-awesome[^"]*">')

LIMITS = (-5.5, 5.5)


def scatter(ax, x, title=None, color="C0", s=1.5, limits=LIMITS):
    """A 2-D sample as a small-dot scatter with equal axes."""
    ax.scatter(x[:, 0], x[:, 1], s=s, color=color, alpha=0.6, linewidths=0)
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def image_grid(images, nrow: int):
    """Tile ``(n, 1, h, w)`` or ``(n, h, w)`` images in [−1, 1] into one array in [0, 1]."""
    x = np.asarray(images)
    x = x.reshape(len(x), *x.shape[-2:])
    n, h, w = x.shape
    ncol = int(np.ceil(n / nrow))
    grid = np.ones((nrow * (h + 1) + 1, ncol * (w + 1) + 1))
    for i, img in enumerate(x):
        r, c = divmod(i, ncol)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = (img + 1) / 2
    return np.clip(grid, 0, 1)


def animation_html(anim) -> str:
    """An animation as self-contained HTML with a scrubbing slider (no remote assets)."""
    return _REMOTE_ICONS.sub("", anim.to_jshtml())


def field_animation(mixtures, labels, times, n_particles: int = 200, seed: int = 0, grid: int = 15,
                    limits=LIMITS):
    """Scrub through t = 1 → 0: the direction of the exact marginal velocity of each mixture,
    particles riding the exact PF-ODE, the "ghost" where one Euler step from t = 1 lands,
    and below, the posterior weights of the components for one tracked particle.

    ``mixtures`` are ``analytic.GaussianMixture`` objects; returns a matplotlib animation.
    """
    rng = np.random.default_rng(seed)
    z1 = rng.standard_normal((n_particles, 2))
    tracked = 0
    g = np.linspace(*limits, grid)
    gx, gy = np.meshgrid(g, g)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    paths = [m.trajectory(z1, times) for m in mixtures]
    ghosts = [z1 - m.velocity(z1, 1.0) for m in mixtures]  # one Euler step of size 1

    fig, axes = plt.subplots(2, len(mixtures), figsize=(3.2 * len(mixtures), 5.2),
                             gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    artists = []
    for j, (m, label) in enumerate(zip(mixtures, labels)):
        ax, bx = axes[0, j], axes[1, j]
        ax.scatter(m.means[:, 0], m.means[:, 1], marker="x", color="k", s=30, zorder=3)
        ax.scatter(ghosts[j][tracked, 0], ghosts[j][tracked, 1], color="red", s=40, alpha=0.6, zorder=4,
                   label="one Euler step")
        quiv = ax.quiver(pts[:, 0], pts[:, 1], *np.zeros((2, len(pts))), color="#d98e04", angles="xy",
                         scale_units="xy", scale=1.6, width=0.005, pivot="mid")
        dots = ax.scatter(z1[:, 0], z1[:, 1], s=4, color="C0", alpha=0.7)
        star = ax.scatter(z1[tracked, 0], z1[tracked, 1], s=50, marker="*", color="C3", zorder=5)
        ax.set_xlim(*limits)
        ax.set_ylim(*limits)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=9)
        bars = bx.bar(np.arange(len(m.weights)), m.weights, color="#d98e04")
        bx.set_ylim(0, 1)
        bx.set_xticks(np.arange(len(m.weights)))
        bx.set_xlabel("component", fontsize=8)
        bx.set_ylabel("weight of ★", fontsize=8)
        artists.append((quiv, dots, star, bars))
    axes[0, 0].legend(loc="lower left", fontsize=7)
    title = fig.suptitle("")
    fig.tight_layout()

    def draw(i):
        t = times[i]
        for j, m in enumerate(mixtures):
            quiv, dots, star, bars = artists[j]
            v = m.velocity(pts, t)
            # Sampling moves against v (from t = 1 to 0): draw the direction of travel, −v,
            # as unit arrows (the speed varies too much across the plane to show lengths).
            d = -v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            quiv.set_UVC(d[:, 0], d[:, 1])
            dots.set_offsets(paths[j][i])
            star.set_offsets(paths[j][i][tracked:tracked + 1])
            for bar, w in zip(bars, m.responsibilities(paths[j][i][tracked:tracked + 1], t)[0]):
                bar.set_height(w)
        title.set_text(f"t = {t:.2f}")
        return []

    draw(0)
    plt.close(fig)
    return animation.FuncAnimation(fig, draw, frames=len(times), interval=120)
