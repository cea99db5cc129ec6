"""Plots of the adaptive-decay study: per task, each metric against length (mean ± 95 % t-interval over
seeds, one line per variant); for language modelling also the loss by position at the longest window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STYLE = {"mlp": ("C0", "o", "-"), "linear": ("C1", "s", "-"), "none": ("C2", "^", "-"),
         "mlp-h8": ("C3", "v", "--"), "mlp-h256": ("C4", "D", "--"), "mlp-softmax": ("C5", "x", "--")}


def _line(ax: Any, xs: list[float], stats: list[dict], variant: str, scale: float) -> None:
    color, marker, ls = STYLE.get(variant, ("k", ".", ":"))
    shift = 2 ** (0.04 * (list(STYLE).index(variant) - 2.5)) if variant in STYLE else 1.0
    xs = [x * shift for x in xs]  # side by side on the log axis, so that the intervals do not hide each other
    ys = [scale * s["mean"] for s in stats]
    err = [scale * (s["ci95"] or 0.0) for s in stats]
    ax.errorbar(xs, ys, yerr=err, label=variant, color=color, marker=marker, linestyle=ls, capsize=3)


def plot_task(task: str, summary: dict, path: Path, title: str) -> None:
    """Raises ImportError without matplotlib (the driver then writes the results without plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = summary["metrics"]
    panels = list(metrics) + (["position_loss"] if summary.get("position_loss") else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        if metric == "position_loss":
            for v, pl in summary["position_loss"].items():
                edges = pl["edges"]
                mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
                _line(ax, mids, pl["bins"], v, 1.0)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("position (bin centre)")
            ax.set_ylabel("held-out loss, nats/char")
            ax.set_title("loss by position, longest window", fontsize=9)
        else:
            pct = metric != "nats_per_char"
            for v, rows in metrics[metric].items():
                lens = sorted(rows, key=int)
                _line(ax, [int(T) for T in lens], [rows[T] for T in lens], v, 100.0 if pct else 1.0)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length" if task != "lm" else "window length")
            ax.set_ylabel(metric + (" (%)" if pct else ""))
            ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
