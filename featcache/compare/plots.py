"""Stage two's plots: accuracy with intervals, the best row's confusion matrix, accuracy
against fit time, per-class accuracy, the label-efficiency curve (matplotlib, Agg backend).

Reads nothing; writes each PNG it is given a path for, atomically
(:func:`featcache._util.atomic.write_bytes`). :mod:`featcache.compare.report` decides which
plots a report has; :mod:`featcache.compare.mistakes` draws its image grid with
:func:`pyplot` and :func:`save_fig`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from featcache._util.atomic import write_bytes


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def plot_accuracy(results: dict, path: Path) -> None:
    plt = pyplot()
    rows = sorted(results["rows"], key=lambda r: r["test_accuracy"])
    acc = np.array([r["test_accuracy"] for r in rows]) * 100
    lo = np.maximum(acc - np.array([r["ci95"][0] for r in rows]) * 100, 0)  # rounding at
    hi = np.maximum(np.array([r["ci95"][1] for r in rows]) * 100 - acc, 0)  # 0% / 100%
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ax.barh([r["name"] for r in rows], acc, xerr=[lo, hi], color="#4878a8", capsize=3)
    for i, a in enumerate(acc):
        ax.text(a + hi[i] + 0.3, i, f"{a:.2f}%", va="center", fontsize=8)
    left = max(0.0, float(acc.min()) - 10)
    ax.set_xlim(left, min(100.0, float(acc.max()) + 5))
    ax.set_xlabel("test accuracy, % (95% Wilson interval)")
    ax.set_title(f"{results['provenance'].get('backbone', '')} "
                 f"{results['provenance'].get('image_size', '')} px features")
    save_fig(fig, path)
    plt.close(fig)


def plot_confusion(matrix, classes, title: str, path: Path) -> None:
    plt = pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1 + 0.55 * n, 1 + 0.5 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_fig(fig, path)
    plt.close(fig)


def plot_fit_time(results: dict, path: Path) -> None:
    """One point per row: its training time (selection + final fit, s, log axis) against
    test accuracy with its interval (under ``--search fast`` there is no final fit: the
    selection is the training)."""
    plt = pyplot()
    rows = results["rows"]
    t = np.maximum([float(r["select_s"]) + float(r["fit_s"]) for r in rows], 1e-3)  # log > 0
    acc = np.array([r["test_accuracy"] for r in rows]) * 100
    err = np.maximum(np.array([[a - 100 * r["ci95"][0], 100 * r["ci95"][1] - a]
                               for a, r in zip(acc, rows)]).T, 0)   # rounding at 100%
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar(t, acc, yerr=err, fmt="o", color="#4878a8", capsize=3)
    for x, y, r in zip(t, acc, rows):
        best = r["name"] == results.get("best_row")
        ax.annotate(r["name"] + (" (best)" if best else ""), (x, y), fontsize=8,
                    xytext=(4, 4), textcoords="offset points",
                    fontweight="bold" if best else "normal")
    ax.set_xscale("log")
    ax.set_xlabel("training time, s (selection + final fit, log scale)")
    ax.set_ylabel("test accuracy, % (95% Wilson interval)")
    ax.set_title("accuracy vs fit time")
    ax.grid(alpha=0.3, which="both")
    save_fig(fig, path)
    plt.close(fig)


def plot_per_class(names, matrix, classes, path: Path) -> None:
    """Heat map: one line per row (``names``, best first), one column per class, the
    share of that class's test images the row gets right, printed in each cell."""
    plt = pyplot()
    m = np.array([[np.nan if v is None else v for v in r] for r in matrix],
                 dtype=np.float64) * 100           # None: a class without test rows
    n_rows, n_cls = m.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * n_cls, 1.0 + 0.4 * n_rows))
    low = float(np.nanmin(m)) if np.isfinite(m).any() else 0.0
    im = ax.imshow(m, cmap="viridis", vmin=max(0.0, low - 5), vmax=100, aspect="auto")
    if n_cls <= 30 and n_rows <= 40:
        for i in range(n_rows):
            for j in range(n_cls):
                ax.text(j, i, "n/a" if np.isnan(m[i, j]) else f"{m[i, j]:.0f}", ha="center",
                        va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 * 100 else "white")
    ax.set_xticks(range(n_cls), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), names, fontsize=8)
    ax.set_title("per-class test accuracy, %")
    fig.colorbar(im, ax=ax, fraction=0.03)
    save_fig(fig, path)
    plt.close(fig)


def plot_curve(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    heads = list(dict.fromkeys(p["head"] for p in results["points"]))
    for h in heads:
        pts = sorted((p for p in results["points"] if p["head"] == h),
                     key=lambda p: p["n_train"])
        x = [p["n_train"] / results["n_classes"] for p in pts]
        y = [100 * p["test_accuracy"] for p in pts]
        err = np.maximum([[100 * (p["test_accuracy"] - p["ci95"][0]) for p in pts],
                          [100 * (p["ci95"][1] - p["test_accuracy"]) for p in pts]], 0)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=2, label=h)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images per class (log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("label efficiency: " + ", ".join(f"{s}/class" for s in results["sizes"]))
    ax.grid(alpha=0.3)
    ax.legend()
    save_fig(fig, path)
    plt.close(fig)
