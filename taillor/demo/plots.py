"""Figures of the demo: accuracy matrices and retention curves per method (``demo.png``)."""

from __future__ import annotations

from .settings import LABELS

__all__ = ["plot_demo"]


def plot_demo(agg: dict, task_names: list[str], path: str, title: str) -> str:
    """Write ``path``: the mean accuracy matrix of each method (with ACC and plasticity) over the curves of R@1,
    cosine to base and ACC after each task. ``agg`` is :func:`taillor.demo.summary.aggregate`'s output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(agg)
    n = len(methods)
    T = len(task_names)
    fig = plt.figure(figsize=(3.0 * max(n, 3), 6.6))
    gs = fig.add_gridspec(2, max(n, 3) * 2, height_ratios=[1, 1.05])
    for k, name in enumerate(methods):
        ax = fig.add_subplot(gs[0, 2 * k: 2 * k + 2])
        R = np.array([[np.nan if v is None else v for v in row] for row in agg[name]["R_mean"]])
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i in range(T):
            for j in range(i + 1):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if R[i, j] < 0.6 else "black")
        ax.set_xticks(range(T), task_names, fontsize=7)
        ax.set_yticks(range(T), [f"after {t}" for t in task_names], fontsize=7)
        ax.set_title(f"{LABELS.get(name, name)}\nACC {agg[name]['acc'][0]:.3f}  plasticity "
                     f"{agg[name]['plasticity'][0]:+.3f}", fontsize=8)
        if k == 0:
            ax.set_ylabel("trained through")
        ax.set_xlabel("evaluated on", fontsize=7)
    cols = max(n, 3) * 2
    w = cols // 3
    stages = ["base"] + [f"after {t}" for t in task_names]
    panels = [("retrieval_r1", "docstring→code R@1 (pre-trained skill)", stages, 0),
              ("cosine_to_base", "cosine similarity to base embeddings", stages, 0),
              ("acc_per_step", "average accuracy over tasks so far", stages[1:], None)]
    for p, (key, label, xt, _) in enumerate(panels):
        ax = fig.add_subplot(gs[1, p * w: (p + 1) * w if p < 2 else cols])
        for name in methods:
            vals = agg[name][key]
            m = np.array([v[0] for v in vals])
            s = np.array([v[1] for v in vals])
            x = np.arange(len(m))
            ax.plot(x, m, "-o", ms=3, label=LABELS.get(name, name))
            ax.fill_between(x, m - s, m + s, alpha=0.15)
        ax.set_xticks(range(len(xt)), xt, fontsize=7, rotation=15)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if p == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
