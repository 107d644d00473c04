"""The study's figures (matplotlib, Agg): the layer sweep (paper Figure 3), DFF's layer weights and the gate.

The figures take numbers already aggregated over seeds by `report.py` (which calls `write_plots`); this module
imports nothing of the project's. Each figure is written to a temporary file and renamed, so an interrupted report
never leaves a half-written PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    os.replace(tmp, path)
    return path


LINES = (  # run, line style, colour, legend label (None: drawn without a legend entry)
    ("fusion_mean", "--", "tab:red", "uniform mean of layers"),
    ("dff", "-.", "tab:green", "DFF (learned alpha)"),
    ("fusion_last", ":", "tab:gray", None),
    ("id", ":", "black", "ID only"),
)


def layers_plot(path: Path, layers: list[int], sweep: dict, lines: dict) -> Path:
    """HR@10 and NDCG@10 per stored layer (mean ± std over seeds) with the mean-of-layers and DFF lines (Figure 3).

    Args:
      layers: the swept stored layers (x axis).
      sweep: {metric: (means, stds)}, one value per layer.
      lines: {run: {metric: mean over seeds}} for the horizontal reference lines (runs of `LINES` that finished).
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("HR@10", "NDCG@10"), strict=True):
        m, s = sweep[metric]
        ax.errorbar(layers, m, yerr=s, marker="o", capsize=3, label="single layer (fusion)")
        for run, style, color, label in LINES:
            if run in lines and label:
                ax.axhline(lines[run][metric], linestyle=style, color=color, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("stored layer (0 = embedding output)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Layer sweep: test metrics per hidden-state layer (mean ± std over seeds)")
    path = _save(fig, path)
    plt.close(fig)
    return path


def alpha_plot(path: Path, weights: np.ndarray) -> Path:
    """Bar chart of DFF's learned layer weights alpha (Eq. 5), mean ± std over seeds, with the uniform level."""
    plt = _plt()
    m = weights.mean(0)
    s = weights.std(0, ddof=1) if len(weights) > 1 else np.zeros_like(m)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(np.arange(len(m)), m, yerr=s, capsize=2, color="tab:green")
    ax.axhline(1 / len(m), linestyle="--", color="tab:red", label="uniform")
    ax.set_xlabel("stored layer")
    ax.set_ylabel("alpha")
    ax.set_title(f"DFF learned layer weights ({len(weights)} seeds)")
    ax.legend(fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


def gate_plot(path: Path, found: dict, runs: list[str]) -> Path | None:
    """Per-item gate histograms (analysis.gate_histogram, 20 bins on [0, 1]) averaged over seeds, one line per run."""
    edges = np.linspace(0, 1, 21)
    centers = (edges[:-1] + edges[1:]) / 2
    series = {}
    for run in runs:
        hists = [
            r["analysis"]["gate_histogram"]
            for r in found.get(run, {}).values()
            if "gate_histogram" in r.get("analysis", {})
        ]
        if hists:
            h = np.mean(np.asarray(hists, np.float64), axis=0)
            series[run] = (centers, h / max(h.sum(), 1))
    labels = ("gate g per item (1 = only ID, 0 = only content)", "fraction of items")
    return _lines_plot(path, series, *labels, "Gate distribution over items (mean over seeds)")


def gate_trajectory_plot(path: Path, found: dict, runs: list[str]) -> Path | None:
    """The mean fusion gate g (the ID embedding's share) after each epoch, mean over seeds, one line per run."""
    series = {}
    for run in runs:
        curves = [
            [h["gate_mean"] for h in r.get("valid_history", []) if "gate_mean" in h]
            for r in found.get(run, {}).values()
        ]
        curves = [c for c in curves if c]
        if curves:
            length = min(len(c) for c in curves)  # early stopping ends seeds at different epochs
            series[run] = (np.arange(1, length + 1), np.mean([c[:length] for c in curves], axis=0))
    labels = ("epoch", "mean gate g (1 = only ID)")
    return _lines_plot(path, series, *labels, "Fusion gate during training (mean over items and seeds)")


def _lines_plot(path: Path, series: dict, xlabel: str, ylabel: str, title: str) -> Path | None:
    """One line per run of {run: (x, y)}; None (and no file) when there is nothing to draw."""
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for run, (x, y) in series.items():
        ax.plot(x, y, marker=".", label=run)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


def write_plots(
    plot_dir: Path, found: dict, layers: list[int], sweep: dict, lines: dict, weights: np.ndarray | None
) -> list[Path]:
    """layers.png (when layers were swept), alpha.png (when DFF finished), gate.png and gate_epochs.png (when a fusion
    run finished)."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    out = []
    if layers:
        out.append(layers_plot(plot_dir / "layers.png", layers, sweep, lines))
    if weights is not None:
        out.append(alpha_plot(plot_dir / "alpha.png", weights))
    gate_runs = [r for r in ("dff", "fusion_mean", "fusion_last", "caption") if r in found]
    g = gate_plot(plot_dir / "gate.png", found, gate_runs)
    if g is not None:
        out.append(g)
    g = gate_trajectory_plot(plot_dir / "gate_epochs.png", found, gate_runs)
    if g is not None:
        out.append(g)
    return out
