"""Stage two's report files, written atomically into ``features/<stem>/``.

Reads nothing itself (``mistakes.png``, through :mod:`featcache.mistakes`, reads the feature
file, the best head and the images). Writes (each to a temporary name in the same folder,
then an fsynced rename, :mod:`featcache.atomic`, so an interrupted run leaves the previous
report intact):

- ``predictions.npz`` (test labels and every row's test predictions),
- ``results.csv``, ``report.md`` (table, McNemar pairs, plots),
- ``accuracy.png`` (accuracy by head with 95% intervals), ``confusion.png`` (best head),
  ``fit_time.png`` (test accuracy against fit time per row, log time axis),
  ``per_class.png`` (per-class test accuracy of every row, best row first: a heat map),
- ``results.json`` — LAST: it is the Makefile's target and marks a finished report.
- For the label-efficiency curve: ``curve.png``, ``curve.csv``, ``curve.md``, ``curve.json``.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .atomic import write_bytes, write_text
from .config import provenance_fields
from .stats import per_class_accuracy
from .mistakes import write_mistakes

CSV_FIELDS = ("name", "head", "test_accuracy", "ci95_low", "ci95_high", "macro_f1",
              "val_accuracy", "select_s", "fit_s", "predict_s_per_1000", "params", "saved")


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in p.items()) or "—"


# --------------------------------------------------------------------------- tables

def format_table(results: dict) -> str:
    """The comparison table as markdown (also what the CLI prints)."""
    lines = ["| head | test accuracy (95% CI) | macro-F1 | val acc | select s | fit s | "
             "predict s/1k | chosen |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results["rows"], key=lambda r: -r["test_accuracy"]):
        lo, hi = r["ci95"]
        star = " **best**" if r["name"] == results.get("best_row") else ""
        lines.append(
            f"| {r['name']}{star} | {100 * r['test_accuracy']:.2f}% "
            f"({100 * lo:.2f}–{100 * hi:.2f}) | {r['macro_f1']:.4f} | "
            f"{100 * r['val_accuracy']:.2f}% | {r['select_s']:.1f} | {r['fit_s']:.1f} | "
            f"{r['predict_s_per_1000']:.3f} | {_params(r['params'])} |")
    return "\n".join(lines)


def format_mcnemar(results: dict) -> str:
    pairs = results.get("mcnemar", [])
    if not pairs:
        return "Only one row: nothing to compare."
    sig = [p for p in pairs if p["significant"]]
    out = [f"Exact McNemar tests on the shared test set, Holm-adjusted over {len(pairs)} "
           f"pairs; significant at p<0.05: {len(sig)}.", "",
           "| A | B | only A right | only B right | p | p (Holm) | significant |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(pairs, key=lambda p: p["p"]):
        out.append(f"| {p['a']} | {p['b']} | {p['only_a']} | {p['only_b']} | {p['p']:.3g} | "
                   f"{p['p_holm']:.3g} | {('yes: ' + p['better'] + ' better') if p['significant'] else 'no'} |")
    return "\n".join(out)


def results_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results["rows"]:
        w.writerow({"name": r["name"], "head": r["head"], "test_accuracy": r["test_accuracy"],
                    "ci95_low": r["ci95"][0], "ci95_high": r["ci95"][1],
                    "macro_f1": r["macro_f1"], "val_accuracy": r["val_accuracy"],
                    "select_s": r["select_s"], "fit_s": r["fit_s"],
                    "predict_s_per_1000": r["predict_s_per_1000"],
                    "params": json.dumps(r["params"], sort_keys=True),
                    "saved": r.get("saved", "")})
    return buf.getvalue()


def report_markdown(results: dict) -> str:
    prov = results["provenance"]
    keys = provenance_fields()  # the cache key's settings, from the settings table
    rows = results["rows"]
    return "\n".join([
        f"# Heads on `{results['feature_file']}`", "",
        "Provenance: " + ", ".join(f"{k}={prov.get(k)}" for k in keys if k in prov), "",
        f"Protocol: {results['protocol']['selection']}; validation fraction "
        f"{results['protocol']['val_fraction']}, seed {results['protocol']['seed']}; "
        f"{rows[0]['n_fit']} fit + {rows[0]['n_val']} validation rows, "
        f"{rows[0]['n_test']} test rows. Intervals: Wilson 95%.", "",
        format_table(results), "",
        f"Best row: **{results['best_row']}** — {results['protocol']['best']}; it is "
        f"the one marked in the table, the CLI's summary and `featcache export`'s default. "
        f"Search: {results['protocol'].get('search', 'exhaustive')}, "
        f"{results['config'].get('workers')} worker(s). Wall time "
        f"{results['wall_s']:.1f} s.", "",
        "## Which differences are significant", "", format_mcnemar(results), "",
        "## Plots", "", "![accuracy by head](accuracy.png)", "",
        f"![confusion matrix of {results['best_row']}](confusion.png)", "",
        "Test accuracy against each row's training time (selection + final fit, log "
        "scale): what each point of accuracy costs.", "",
        "![accuracy vs training time](fit_time.png)", "",
        "Per-class test accuracy of every row (best row first):", "",
        "![per-class accuracy](per_class.png)", ""] + (
        ["The best row's most confident mistakes on the test split (true / predicted class, "
         "probability, row id):", "", "![most confident mistakes](mistakes.png)", ""]
        if "mistakes" in results.get("plots", {}) else []))


# --------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def plot_accuracy(results: dict, path: Path) -> None:
    plt = _plt()
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
    _save_fig(fig, path)
    plt.close(fig)


def plot_confusion(matrix, classes, title: str, path: Path) -> None:
    plt = _plt()
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
    _save_fig(fig, path)
    plt.close(fig)


def plot_fit_time(results: dict, path: Path) -> None:
    """One point per row: its training time (selection + final fit, s, log axis) against
    test accuracy with its interval (under ``--search fast`` there is no final fit: the
    selection is the training)."""
    plt = _plt()
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
    _save_fig(fig, path)
    plt.close(fig)


def plot_per_class(names, matrix, classes, path: Path) -> None:
    """Heat map: one line per row (``names``, best first), one column per class, the
    share of that class's test images the row gets right, printed in each cell."""
    plt = _plt()
    m = np.asarray(matrix, dtype=np.float64) * 100
    n_rows, n_cls = m.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * n_cls, 1.0 + 0.4 * n_rows))
    im = ax.imshow(m, cmap="viridis", vmin=max(0.0, float(m.min()) - 5), vmax=100,
                   aspect="auto")
    if n_cls <= 30 and n_rows <= 40:
        for i in range(n_rows):
            for j in range(n_cls):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 * 100 else "white")
    ax.set_xticks(range(n_cls), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), names, fontsize=8)
    ax.set_title("per-class test accuracy, %")
    fig.colorbar(im, ax=ax, fraction=0.03)
    _save_fig(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- writers

def write_report(results: dict, predictions: dict, y_test, report_dir, *,
                 probabilities: dict | None = None) -> dict:
    """Write every report file, ``results.json`` last; returns ``results`` with the
    ``plots`` and ``files`` entries filled in. ``probabilities`` (row -> test
    probabilities, from the comparison) spare ``mistakes.png`` a second prediction."""
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    best = next(r for r in results["rows"] if r["name"] == results["best_row"])
    plot_accuracy(results, d / "accuracy.png")
    plot_confusion(best["confusion"], results["classes"],
                   f"{best['name']}: {100 * best['test_accuracy']:.2f}% test accuracy",
                   d / "confusion.png")
    plot_fit_time(results, d / "fit_time.png")
    n_classes, y = len(results["classes"]), np.asarray(y_test)
    for r in results["rows"]:  # compare_heads fills it; a results dict from elsewhere may not
        if "per_class_accuracy" not in r:
            r["per_class_accuracy"] = per_class_accuracy(y, predictions[r["name"]],
                                                         n_classes).tolist()
    order = sorted(results["rows"], key=lambda r: (r["name"] != results["best_row"],
                                                   -r["test_accuracy"]))
    plot_per_class([r["name"] for r in order], [r["per_class_accuracy"] for r in order],
                   results["classes"], d / "per_class.png")
    results["plots"] = {"accuracy": "accuracy.png", "confusion": "confusion.png",
                        "fit_time": "fit_time.png", "per_class": "per_class.png"}
    results["files"] = ["results.csv", "report.md", "predictions.npz", "accuracy.png",
                        "confusion.png", "fit_time.png", "per_class.png", "results.json"]
    predicted = (predictions.get(results["best_row"]),
                 (probabilities or {}).get(results["best_row"]))
    if "feature_file" in results and write_mistakes(results, d, predicted=predicted):
        results["plots"]["mistakes"] = "mistakes.png"; results["files"].insert(-1, "mistakes.png")  # noqa: E702
    # the data files after the plots: a run interrupted while plotting keeps the old ones
    buf = io.BytesIO()
    np.savez_compressed(buf, y_test=np.asarray(y_test),
                        **{k.replace("+", "_"): v for k, v in predictions.items()})
    write_bytes(d / "predictions.npz", buf.getvalue())
    write_text(d / "results.csv", results_csv(results))
    write_text(d / "report.md", report_markdown(results))
    write_text(d / "results.json", json.dumps(results, indent=2, sort_keys=False))
    return results


def curve_table(results: dict) -> str:
    sizes = results["sizes"]
    heads = list(dict.fromkeys(p["head"] for p in results["points"]))
    acc = {(p["head"], p["per_class"]): p for p in results["points"]}
    lines = ["| head | " + " | ".join(f"{s} / class" for s in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    for h in heads:
        cells = [f"{100 * acc[(h, s)]['test_accuracy']:.2f}%" if (h, s) in acc else "—"
                 for s in sizes]
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(results: dict, path: Path) -> None:
    plt = _plt()
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
    _save_fig(fig, path)
    plt.close(fig)


def write_curve(results: dict, report_dir) -> dict:
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    plot_curve(results, d / "curve.png")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["head", "per_class", "n_train", "test_accuracy", "ci95_low", "ci95_high",
                "fit_s", "params"])
    for p in results["points"]:
        w.writerow([p["head"], p["per_class"], p["n_train"], p["test_accuracy"],
                    p["ci95"][0], p["ci95"][1], p["fit_s"], json.dumps(p["params"])])
    write_text(d / "curve.csv", buf.getvalue())
    write_text(d / "curve.md", f"# Label efficiency on `{results['feature_file']}`\n\n"
                 f"Test accuracy by labelled training images per class (selection on a "
                 f"validation split of the same labelled subset).\n\n{curve_table(results)}\n\n"
                 f"![curve](curve.png)\n")
    write_text(d / "curve.json", json.dumps(results, indent=2))
    return results
