"""The report's charts: training curves, and quality against speed and size with the Pareto front.

    python -m python3_distillation report      # writes reports/*.png through these functions
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: dict[str, tuple[float, float]], higher_x_better: bool = True) -> set[str]:
    """Labels of the points no other point beats on both axes (lower y is better; x as told)."""
    front = set()
    for a, (xa, ya) in points.items():
        dominated = False
        for b, (xb, yb) in points.items():
            if b == a:
                continue
            x_ok = xb >= xa if higher_x_better else xb <= xa
            x_strict = xb > xa if higher_x_better else xb < xa
            if x_ok and yb <= ya and (x_strict or yb < ya):
                dominated = True
                break
        if not dominated:
            front.add(a)
    return front


def plot_training_curves(curves: dict[str, list[dict]], out: Path) -> None:
    """Train cross-entropy (the students' total loss mixes in the KL, so CE is what compares) and
    validation loss against step, one colour per run."""
    plt = _pyplot()
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = False
    for i, (label, rows) in enumerate(curves.items()):
        color = f"C{i % 10}"
        train = [(r["step"], r.get("ce", r.get("loss"))) for r in rows if r.get("ce", r.get("loss")) is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if train:
            ax_t.plot(*zip(*train), color=color, label=label)
            drawn = True
        if val:
            ax_v.plot(*zip(*val), "o-", color=color, label=label)
            drawn = True
    for ax, title in ((ax_t, "train cross-entropy (nats/token)"), (ax_v, "validation loss (nats/token)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if not drawn:
        fig.text(0.5, 0.5, "no training logs found", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_tradeoffs(models: dict[str, dict], out: Path) -> dict[str, list[str]]:
    """Perplexity against batch-1 tokens/s and against size on disk, one point per model, the Pareto
    front of each chart joined by a dashed line. Returns each chart's front (labels)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    fronts = {}
    charts = (("tok_s_b1", True, "greedy generation, batch 1 (tokens/s)", "speed"),
              ("size_mb", False, "size on disk (MB)", "size"))
    for ax, (key, higher_better, xlabel, name) in zip(axes, charts):
        pts = {label: (m[key], m["val_ppl"]) for label, m in models.items()}
        front = pareto_front(pts, higher_better)
        fronts[name] = sorted(front, key=lambda k: pts[k][0])
        for i, (label, (x, y)) in enumerate(pts.items()):
            ax.scatter(x, y, s=70 if label in front else 40, color=f"C{i % 10}",
                       edgecolors="black" if label in front else "none", zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        if len(front) > 1:
            ax.plot(*zip(*(pts[k] for k in fronts[name])), "--", color="grey", zorder=2, label="Pareto front")
            ax.legend()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"perplexity vs {name} ({'lower right' if higher_better else 'lower left'} is better)")
        ax.grid(alpha=0.3)
        ax.margins(0.2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fronts
