"""The study behind ``--cv-below`` (docs/stage-two.md, "Selection on small data"): on
small seeded subsets of a feature file's training rows, how often each validation plan
picks the row that is really best, and what a wrong pick costs.

For every size (labelled rows per class) and seed: a stratified subset of the training
rows is the user's data; 1,000 *other* training rows per class (disjoint from the
subset, seeded) stand in for the test split, which this study never reads. Every default
row (each head, and its ``+flip`` row when the file has mirrors) runs twice on the subset,
once with the single split (``--cv-below 0``) and once with repeated stratified k-fold,
exactly as ``featcache heads`` runs it (:func:`featcache.compare.protocol.run_row`), and
is scored on the held-out rows. Per plan it reports the chosen row, whether it is the
held-out best, the regret (held-out accuracy of the best row minus the chosen one's) and
the seconds selection took.

Reads one feature file; writes JSON lines to stdout (one per size, seed and plan, then a
summary per size and plan); logs go to stderr. Uses both cores (run it alone).

    python -m benchmarks.studies.selection features/cifar10_mobilenet_v2_224_ov_bf16_flip.h5 \\
        --sizes 50,500 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

HELD_OUT_PER_CLASS = 1000


def subsets(y: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the subset's rows, the held-out rows): disjoint, stratified, seeded."""
    rng = np.random.default_rng(seed)
    sub, held = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        sub.append(rows[:per_class])
        held.append(rows[per_class:per_class + HELD_OUT_PER_CLASS])
    return np.sort(np.concatenate(sub)), np.sort(np.concatenate(held))


def run_plan(fs, rows, held, plan, seed: int, names, n_classes: int) -> dict:
    from featcache.compare.protocol import SplitData, flip_rows, run_row
    from featcache.compare.selection import best_index
    from featcache.heads import HEADS

    tr = fs["train"]
    Xf = tr.features_flip
    data = SplitData(tr.features[rows], tr.labels[rows], None if Xf is None else Xf[rows],
                     tr.features[held], tr.labels[held], None if Xf is None else Xf[held],
                     0.1, seed, plan=plan)
    extra = flip_rows("auto", Xf is not None)
    out, costs = [], []
    t0 = time.perf_counter()
    for name in names:
        for train_flip, tta in HEADS[name].flip_rows(extra):
            row, *_ = run_row(name, data, train_flip=train_flip, tta=tta, seed=seed,
                              n_classes=n_classes, search="fast")
            out.append(row)
            costs.append(HEADS[name].cost * (2 if train_flip else 1))
    b = best_index(out, costs)
    held_acc = {r["name"]: r["test_accuracy"] for r in out}
    top = max(held_acc.values())
    return {"plan": plan.kind, "chosen": out[b]["name"],
            "chosen_held_out": held_acc[out[b]["name"]],
            "held_out_best": [n for n, a in held_acc.items() if a == top],
            "is_best": held_acc[out[b]["name"]] == top, "regret": top - held_acc[out[b]["name"]],
            "val": {r["name"]: r["val_accuracy"] for r in out}, "held_out": held_acc,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("feature_file")
    ap.add_argument("--sizes", default="50,500", help="labelled rows per class")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--heads", default=None, help="comma-separated (default: the defaults)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    from featcache.cache.reader import load_features
    from featcache.compare.selection import Plan, plan_for
    from featcache.config import HeadsConfig
    from featcache.heads import default_heads, resolve_heads

    names = resolve_heads(args.heads.split(",")) if args.heads else default_heads()
    fs = load_features(args.feature_file, flip=True)
    y = fs["train"].labels
    cfg = HeadsConfig(args.feature_file)
    for size in [int(s) for s in args.sizes.split(",")]:
        summary = {}
        for seed in range(args.seeds):
            rows, held = subsets(y, size, seed)
            kfold = plan_for(y[rows], val_fraction=cfg.val_fraction, cv_below=10 ** 9,
                             cv_folds=cfg.cv_folds, cv_repeats=cfg.cv_repeats)
            for plan in (Plan("holdout", cfg.val_fraction), kfold):
                r = run_plan(fs, rows, held, plan, seed, names, len(fs.classes))
                r.update(per_class=size, seed=seed, n_val=None)
                print(json.dumps(r), flush=True)
                s = summary.setdefault(plan.kind, [])
                s.append(r)
        for kind, rs in summary.items():
            print(json.dumps({"summary": True, "per_class": size, "plan": kind,
                              "seeds": len(rs),
                              "is_best": sum(r["is_best"] for r in rs),
                              "mean_regret": float(np.mean([r["regret"] for r in rs])),
                              "max_regret": float(np.max([r["regret"] for r in rs])),
                              "mean_seconds": float(np.mean([r["seconds"] for r in rs]))}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
