"""Section 8: ``featcache predict`` on each runtime side by side — TensorFlow float32,
OpenVINO float32 and OpenVINO bf16 (where the CPU has it) — on the same image files.

Setup (untimed): stage one (the default runtime) on the first ``pr_train`` training and
``pr_images`` test images, ``logreg`` (C=0.01) fitted on the training features, exported
as one ``.keras`` model (backbone + head, float32); the test images written as PNG files
(real CIFAR-10 when found, else the synthetic set), the pipeline's own top-1 for them (the
head on their stage-one features); each runtime's model loaded once (OpenVINO converts
it into the conversion cache here, so no conversion falls inside a timed window).

Then, in ``rt_reps`` rounds with the runtimes' order flipped between rounds:
:func:`featcache.ship.predict.iter_predictions` over every file (decode, resize, batches of
``PREDICT_BATCH``, as the command runs), steady-state images/s from its progress reports
(the first batch excluded). From the first round: each runtime's top-1 agreement with
TensorFlow float32 (the exported model as saved), max |probability difference|, top-1
agreement with the pipeline, and accuracy. Last, ``python -m featcache predict -q MODEL
FILES… --runtime R --precision P`` in a child process, in ``rt_reps`` alternating rounds
too: median wall seconds including start-up (TensorFlow import, the model read from the
cache) and peak RSS.

Writes ``<work_dir>/s8_predict/`` (features, the model, the PNG files).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

from .env import Settings, open_subset

log = logging.getLogger(__name__)


def engines() -> list[tuple[str, str]]:
    """(runtime, precision) pairs this machine can run (as section 6, but float: predict
    runs an exported model, which is not quantized)."""
    from .runtimes import engines as stage_one_engines

    return [e for e in stage_one_engines() if e[1] != "int8"]


def label(runtime: str, precision: str) -> str:
    return f"{'TensorFlow' if runtime == 'tensorflow' else 'OpenVINO'} {precision}"


def _setup(s: Settings, work: Path) -> dict:
    """The exported model, the image files, their labels, the class names and the
    pipeline's own top-1 on them (the head on their stage-one features)."""
    import numpy as np
    from PIL import Image

    from featcache.cache.reader import load_features
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features
    from featcache.heads import get_head
    from featcache.ship.export import export_model

    ds = open_subset(s, {"train": s.pr_train, "test": s.pr_images})
    cfg = ExtractConfig(dataset=ds.name, data_dir=s.data_dir, backbone=s.backbone,
                        size=s.size, batch=s.batch, weights=s.weights, seed=s.seed,
                        flip=False, output=str(work / "features.h5"), download=False)
    fs = load_features(extract_features(cfg, dataset=ds).path)
    head = get_head("logreg", C=0.01).fit(fs["train"].features, fs["train"].labels)
    model = export_model(fs.path, head=head, output=work / "model.keras").path
    n = len(fs["test"])
    images, labels = next(ds.batches("test", 0, n, n))
    (work / "images").mkdir(exist_ok=True)
    files = []
    for i, im in enumerate(images):
        files.append(work / "images" / f"{i:04d}.png")
        Image.fromarray(im).save(files[-1])
    return {"model": model, "files": files, "labels": [int(y) for y in labels],
            "classes": list(fs.classes),
            "pipeline": np.asarray(head.classes_)[
                head.predict_proba(fs["test"].features).argmax(1)],
            "features": f"{fs.attrs.get('runtime', 'tensorflow')} "
                        f"{fs.attrs.get('precision', 'float32')}"}


def _rep(clf, files: list[Path]) -> dict:
    """One pass of iter_predictions over ``files``: steady-state images/s, the rows."""
    from featcache.ship.predict import iter_predictions

    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    rows = [r for batch in iter_predictions(
        clf, files, top_k=len(clf.class_names),
        progress=lambda p: stamps.append((time.perf_counter(), p.done))) for r in batch]
    total = time.perf_counter() - t0
    (ta, na), (tb, nb) = stamps[0] if len(stamps) > 1 else (t0, 0), stamps[-1]
    return {"images_per_s": (nb - na) / (tb - ta), "images": nb - na,
            "batches": len(stamps) - 1 if len(stamps) > 1 else 1, "seconds": tb - ta,
            "end_to_end_images_per_s": len(files) / total, "rows": rows}


def _probs(rows: list[dict], classes: list[str]):
    import numpy as np

    return np.array([[{t["class"]: t["probability"] for t in r["top"]}[c] for c in classes]
                     for r in rows])


def run(s: Settings) -> dict:
    """Section 8: each runtime's predict throughput, agreement with TensorFlow, CLI time."""
    import numpy as np

    from featcache.ship import engines as predict_engines
    from featcache.ship.predict import PREDICT_BATCH, load_classifier

    from .processes import run_child

    work = Path(s.work_dir) / "s8_predict"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    made = _setup(s, work)
    model, files, labels, classes = made["model"], made["files"], made["labels"], \
        made["classes"]
    setup_s = time.perf_counter() - t0
    todo = engines()
    clfs, load_s = {}, {}
    for rt, prec in todo:
        t1 = time.perf_counter()
        clfs[(rt, prec)] = load_classifier(model, runtime=rt, precision=prec)
        load_s[label(rt, prec)] = time.perf_counter() - t1
    reps = {e: [] for e in todo}
    for r in range(s.rt_reps):
        for e in (todo if r % 2 == 0 else todo[::-1]):
            reps[e].append(_rep(clfs[e], files))
        log.info("round %d: %s", r, ", ".join(f"{label(*e)} {reps[e][-1]['images_per_s']:.1f}"
                                               for e in todo))
    children = {e: [] for e in todo}
    for r in range(s.rt_reps):   # the command itself, in alternating rounds too
        for e in (todo if r % 2 == 0 else todo[::-1]):
            cmd = [sys.executable, "-m", "featcache", "predict", "-q", str(model),
                   *map(str, files), "--runtime", e[0], "--precision", e[1]]
            child = run_child(cmd)
            if child["rc"] != 0:
                raise RuntimeError(f"`featcache predict --runtime {e[0]} --precision {e[1]}` "
                                   f"exited {child['rc']}:\n{child['output']}")
            children[e].append(child)
    want = _probs(reps[todo[0]][0]["rows"], classes)
    y = np.asarray(labels)
    rows, base = [], None
    for e in todo:
        got = _probs(reps[e][0]["rows"], classes)
        rate = statistics.median(x["images_per_s"] for x in reps[e])
        base = base or rate
        cli_s = statistics.median(c["seconds"] for c in children[e])
        rows.append({"runtime": e[0], "precision": e[1], "label": label(*e),
                     "images_per_s": rate, "vs_tensorflow": rate / base,
                     "rounds": [{k: v for k, v in x.items() if k != "rows"} for x in reps[e]],
                     "agreement": float((got.argmax(1) == want.argmax(1)).mean()),
                     "pipeline_agreement": float((got.argmax(1) == made["pipeline"]).mean()),
                     "max_abs_diff": float(np.abs(got - want).max()),
                     "accuracy": float((got.argmax(1) == y).mean()),
                     "cli_s": cli_s, "cli_rounds_s": [c["seconds"] for c in children[e]],
                     "cli_images_per_s": len(files) / cli_s,
                     "cli_peak_rss_mib": max(c["peak_rss_mib"] for c in children[e])})
    auto_rt = predict_engines.choose_runtime("auto")
    auto = label(auto_rt, predict_engines.choose_precision("auto", auto_rt))
    return {"rows": rows, "images": len(files), "train": s.pr_train, "size": s.size,
            "features": made["features"],
            "pipeline_accuracy": float((made["pipeline"] == y).mean()),
            "batch": PREDICT_BATCH, "dataset": s.dataset, "auto": auto, "setup_s": setup_s,
            "load_s": load_s,
            "skipped": [] if len(todo) == 3 else [
                "OpenVINO bf16: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16)"]}


def headline_rows(d: dict) -> list[tuple[str, str, str]]:
    """Section 8's rows of the headline table."""
    rows = d["rows"]
    return [(f"`featcache predict` by runtime, {d['images']:,} image files at {d['size']} px, "
             f"images/s (steady state; " + ", ".join(x["label"] for x in rows)
             + f"; `auto` here: {d['auto']})",
             " vs ".join(f"{x['images_per_s']:,.1f}" for x in rows),
             " / ".join(f"**{x['vs_tensorflow']:.2f}x**" for x in rows) + " of TensorFlow's"),
            ("... top-1 agreement with TensorFlow float32 (the exported model as saved), "
             "max |probability difference|",
             ", ".join(f"{x['label']} {100 * x['agreement']:.1f}% ({x['max_abs_diff']:.1e})"
                       for x in rows[1:]), "")]


def report_lines(d: dict, r: dict) -> list[str]:
    """Section 8 of BENCHMARKS.md."""
    data = "real CIFAR-10 test images" if d["dataset"] == "cifar10" else "synthetic images"
    L = ["## 8. `featcache predict` by runtime", "",
         f"One exported `.keras` model ({r['settings']['backbone']} at {d['size']} px + "
         f"`logreg`, C=0.01, fitted on the stage-one features of {d['train']:,} training "
         f"images), the first {d['images']:,} {data} as PNG files; the pipeline's own "
         f"answer for them is the head on their stage-one features ({d['features']}; "
         f"{100 * d['pipeline_accuracy']:.1f}% accurate). Each runtime in "
         f"{len(d['rows'][0]['rounds'])} alternating rounds of `iter_predictions` over every "
         f"file (decode, resize, batches of {d['batch']}: what the command runs), steady "
         f"state; agreement and accuracy from the first round; then the command itself in "
         f"a child process, as many alternating rounds, start-up included (median). "
         f"`--runtime auto --precision auto` is {d['auto']} on this machine.", ""]
    rows = [[x["label"], f"**{x['images_per_s']:,.1f}**", f"**{x['vs_tensorflow']:.2f}x**",
             ", ".join(f"{p['images_per_s']:,.1f}" for p in x["rounds"]),
             f"{100 * x['agreement']:.1f}%", f"{x['max_abs_diff']:.1e}",
             f"{100 * x['pipeline_agreement']:.1f}%",
             f"{100 * x['accuracy']:.1f}%",
             f"{x['cli_s']:,.1f} ({', '.join(f'{c:,.1f}' for c in x['cli_rounds_s'])})",
             f"{x['cli_peak_rss_mib']:,.0f}"] for x in d["rows"]]
    L += ["| runtime | img/s | vs TensorFlow float32 | rounds (img/s) | top-1 = TensorFlow's "
          "| max abs prob diff | top-1 = the pipeline's | accuracy "
          "| `featcache predict` wall s (rounds) | its peak RSS MiB |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    L += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    for why in d.get("skipped", []):
        L += ["", f"Not run: {why}."]
    if r["settings"]["weights"] == "none":
        L += ["", "Random weights: the features are near zero and every probability near "
              "uniform, so top-1 agreement between runtimes (ties broken by rounding) means "
              "nothing here; the probability differences still hold."]
    L += ["", f"Setup (stage one, fit, export, PNG files) {d['setup_s']:,.1f} s; loading each "
          f"runtime's model (OpenVINO: the conversion, into the cache) "
          + ", ".join(f"{k} {v:,.1f} s" for k, v in d["load_s"].items()) + "."]
    return L
