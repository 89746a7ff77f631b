"""Stage two's report files, written into the folder it is given: the comparison's staging
folder, swapped in whole for ``features/<stem>/`` (:mod:`featcache.compare.comparison`).

Reads nothing itself (``mistakes.png``, through :mod:`featcache.compare.mistakes`, reads the feature
file, the best head and the images; :func:`carry_over` links what the new report keeps of the
old folder). Writes (each to a temporary name in the same folder, then an fsynced rename,
:mod:`featcache._util.atomic`):

- ``predictions.npz`` (test labels and every row's test predictions),
- ``results.csv``, ``report.md`` (table, McNemar pairs, plots),
- ``accuracy.png`` (accuracy by head with 95% intervals), ``confusion.png`` (best head),
  ``fit_time.png`` (test accuracy against fit time per row, log time axis),
  ``per_class.png`` (per-class test accuracy of every row, best row first: a heat map),
- ``results.json`` — LAST: it is the Makefile's target and marks a finished report.
- For the label-efficiency curve: ``curve.png``, ``curve.csv``, ``curve.md``, ``curve.json``.

The plots are drawn by :mod:`featcache.compare.plots`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from featcache._util.atomic import carry, is_temporary, write_bytes, write_text
from featcache.compare import plots
from featcache.compare.mistakes import write_mistakes
from featcache.compare.stats import json_floats, per_class_accuracy
from featcache.config import provenance_fields

#: what ``featcache heads`` writes into a report folder (``heads/`` too), in the order of
#: ``results["files"]``; every other entry there (the curve's files, exported models, a
#: user's notes) is carried into the new report by :func:`carry_over`
REPORT_FILES = ("results.csv", "report.md", "predictions.npz", "accuracy.png", "confusion.png",
                "fit_time.png", "per_class.png", "mistakes.png", "results.json")
HEADS_DIR = "heads"

CSV_FIELDS = ("name", "head", "test_accuracy", "ci95_low", "ci95_high", "macro_f1",
              "val_accuracy", "val_std", "select_s", "fit_s", "predict_s_per_1000", "params",
              "saved")


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
            f"{_val(r)} | {r['select_s']:.1f} | {r['fit_s']:.1f} | "
            f"{r['predict_s_per_1000']:.3f} | {_params(r['params'])} |")
    return "\n".join(lines)


def _val(r: dict) -> str:
    """Validation accuracy; under k-fold with its spread over folds (± one std)."""
    sd = r.get("val_std")
    return f"{100 * r['val_accuracy']:.2f}%" + (f" ± {100 * sd:.2f}" if sd else "")


def format_notes(results: dict) -> str:
    """One line per row whose grid extended itself past its edge (empty: none did)."""
    return "\n".join(f"- {r['name']}: {r['search_note']}" for r in results["rows"]
                     if r.get("search_note"))


def format_budgets(results: dict) -> str:
    """One line per row fitted under a time budget (:func:`budget_note`); empty: none."""
    return "\n".join(f"- {r['name']}: {budget_note(r['budget'])}" for r in results["rows"]
                     if r.get("budget"))


def budget_note(b: dict) -> str:
    """What a row's time budget bought (``featcache finetune --budget``), as one line."""
    from featcache.config import format_duration

    parts = [f"time budget {format_duration(b['budget_s'])} per fit"]
    if b.get("epochs_planned") is not None:
        parts.append(f"{int(b['epochs_planned'])} phase-2 epochs planned "
                     f"({int(b['steps_per_epoch'])} steps each) at "
                     f"{b['rows_per_s']:.0f} training rows/s measured on the first steps")
    elif b.get("note"):
        parts.append(b["note"])
    if b.get("epochs_run") is not None:
        parts.append(f"{int(b['epochs_run'])} run, fit {b['fit_s']:.0f} s")
    return "; ".join(parts)


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
                   f"{p['p_holm']:.3g} | "
                   f"{('yes: ' + p['better'] + ' better') if p['significant'] else 'no'} |")
    return "\n".join(out)


def _split_counts(results: dict) -> str:
    r = results["rows"][0]
    plan = results["protocol"].get("plan", {})
    if plan.get("kind") == "kfold":
        return (f"{r['n_val']} validation predictions over "
                f"{plan['folds'] * plan['repeats']} folds of about {r['n_fit']} fit rows "
                f"({plan['reason']})")
    return f"{r['n_fit']} fit + {r['n_val']} validation rows"


def results_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results["rows"]:
        w.writerow({"name": r["name"], "head": r["head"], "test_accuracy": r["test_accuracy"],
                    "ci95_low": r["ci95"][0], "ci95_high": r["ci95"][1],
                    "macro_f1": r["macro_f1"], "val_accuracy": r["val_accuracy"],
                    "val_std": r.get("val_std", ""), "select_s": r["select_s"], "fit_s": r["fit_s"],
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
        f"{_split_counts(results)}, {rows[0]['n_test']} test rows. Intervals: Wilson 95%.",
        "", format_table(results), "",
        *(["Grid search notes:", "", format_notes(results), ""] if format_notes(results)
          else []),
        *(["Time budget:", "", format_budgets(results), ""] if format_budgets(results)
          else []),
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


# --------------------------------------------------------------------------- writers

def write_report(results: dict, predictions: dict, y_test, report_dir, *,
                 probabilities: dict | None = None) -> dict:
    """Write every report file, ``results.json`` last; returns ``results`` with the
    ``plots`` and ``files`` entries filled in. ``probabilities`` (row -> test
    probabilities, from the comparison) spare ``mistakes.png`` a second prediction."""
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    best = next(r for r in results["rows"] if r["name"] == results["best_row"])
    plots.plot_accuracy(results, d / "accuracy.png")
    plots.plot_confusion(best["confusion"], results["classes"],
                   f"{best['name']}: {100 * best['test_accuracy']:.2f}% test accuracy",
                   d / "confusion.png")
    plots.plot_fit_time(results, d / "fit_time.png")
    n_classes, y = len(results["classes"]), np.asarray(y_test)
    for r in results["rows"]:  # compare_heads fills it; a results dict from elsewhere may not
        if "per_class_accuracy" not in r:
            r["per_class_accuracy"] = json_floats(
                per_class_accuracy(y, predictions[r["name"]], n_classes))
    order = sorted(results["rows"], key=lambda r: (r["name"] != results["best_row"],
                                                   -r["test_accuracy"]))
    plots.plot_per_class([r["name"] for r in order], [r["per_class_accuracy"] for r in order],
                   results["classes"], d / "per_class.png")
    results["plots"] = {"accuracy": "accuracy.png", "confusion": "confusion.png",
                        "fit_time": "fit_time.png", "per_class": "per_class.png"}
    predicted = (predictions.get(results["best_row"]),
                 (probabilities or {}).get(results["best_row"]))
    if "feature_file" in results and write_mistakes(results, d, predicted=predicted):
        results["plots"]["mistakes"] = "mistakes.png"
    results["files"] = [f for f in REPORT_FILES
                        if f != "mistakes.png" or "mistakes" in results["plots"]]
    # the data files after the plots: a run interrupted while plotting keeps the old ones
    buf = io.BytesIO()
    np.savez_compressed(buf, y_test=np.asarray(y_test),
                        **{k.replace("+", "_"): v for k, v in predictions.items()})
    write_bytes(d / "predictions.npz", buf.getvalue())
    write_text(d / "results.csv", results_csv(results))
    write_text(d / "report.md", report_markdown(results))
    write_text(d / "results.json", json.dumps(results, indent=2, sort_keys=False))
    return results


def carry_over(old_dir, new_dir) -> list[str]:
    """Link into ``new_dir`` (a report being built) every entry of the report folder
    ``old_dir`` that ``featcache heads`` does not write (:data:`REPORT_FILES`,
    ``heads/``): the curve's files, exported models, anything a user or make put there
    (make's hidden stamps, ``.make-heads-settings``); temporaries a killed writer left
    (:func:`featcache._util.atomic.is_temporary`) stay behind. Returns the names carried."""
    old_dir, new_dir = Path(old_dir), Path(new_dir)
    if not old_dir.is_dir():
        return []
    owned = {*REPORT_FILES, HEADS_DIR}
    carried = []
    for entry in sorted(old_dir.iterdir()):
        name = entry.name
        if is_temporary(name) or name in owned or os.path.lexists(new_dir / name):
            continue
        carry(entry, new_dir / name)
        carried.append(name)
    return carried


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


def write_curve(results: dict, report_dir) -> dict:
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    plots.plot_curve(results, d / "curve.png")
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
