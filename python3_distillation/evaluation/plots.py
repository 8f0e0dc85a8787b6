"""Charts of the report and the experiments: training curves, quality against speed and size with the
Pareto front, and bar panels.

    python -m python3_distillation report      # writes reports/*.png through these functions
"""

from __future__ import annotations

from pathlib import Path

from python3_distillation.fsio import atomic_file


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    with atomic_file(out, "a chart") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)


def pareto_front(points: dict[str, tuple[float, float]], higher_x_better: bool = True) -> set[str]:
    """Labels of the points no other point beats on both axes (lower y is better; x as told)."""
    sign = 1 if higher_x_better else -1

    def beats(b: tuple[float, float], a: tuple[float, float]) -> bool:  # as good on both axes, better on one
        return sign * b[0] >= sign * a[0] and b[1] <= a[1] and (sign * b[0] > sign * a[0] or b[1] < a[1])

    return {a for a, pa in points.items() if not any(beats(pb, pa) for b, pb in points.items() if b != a)}


def plot_training_curves(curves: dict[str, list[dict]], out: Path) -> None:
    """Train cross-entropy (students' total loss mixes in the KL; CE compares) and validation loss by step."""
    fig, (ax_t, ax_v) = _pyplot().subplots(1, 2, figsize=(11, 4.2))
    for i, (label, rows) in enumerate(curves.items()):
        color = f"C{i % 10}"
        train = [(r["step"], r.get("ce", r.get("loss"))) for r in rows if r.get("ce", r.get("loss")) is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        for ax, points, style in ((ax_t, train, "-"), (ax_v, val, "o-")):
            if points:
                ax.plot(*zip(*points), style, color=color, label=label)
    for ax, title in ((ax_t, "train cross-entropy (nats/token)"), (ax_v, "validation loss (nats/token)")):
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if not (ax_t.lines or ax_v.lines):
        fig.text(0.5, 0.5, "no training logs found", ha="center", va="center")
    _save(fig, out)


def plot_tradeoffs(models: dict[str, dict], out: Path) -> dict[str, list[str]]:
    """Perplexity against batch-1 tokens/s and against size on disk, Pareto fronts dashed; returns each front."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(12, 4.8))
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
        ax.set(xlabel=xlabel, ylabel="validation perplexity",
               title=f"perplexity vs {name} ({'lower right' if higher_better else 'lower left'} is better)")
        ax.grid(alpha=0.3)
        ax.margins(0.2)
    _save(fig, out)
    return fronts


def bar_panels(panels: list[tuple[str, str, dict[str, float]]], title: str, out: Path, log: bool = False) -> None:
    """One chart, one panel per ``(panel title, y label, {bar label: value})``, each on its own axis."""
    plt = _pyplot()
    width = max(len(values) for _, _, values in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + len(panels) * (1.0 + 0.9 * width), 4.6), squeeze=False)
    for ax, (name, ylabel, values) in zip(axes[0], panels):
        labels, ys = list(values), list(values.values())
        bars = ax.bar(range(len(labels)), ys, color=[f"C{i % 10}" for i in range(len(labels))])
        ax.bar_label(bars, labels=[f"{y:.3g}" if y < 10 else f"{y:,.1f}" for y in ys], fontsize=8, padding=2)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    _save(fig, out)
