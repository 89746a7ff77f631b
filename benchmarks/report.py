"""Render one benchmark run (the dict :mod:`benchmarks.run` builds) as ``BENCHMARKS.md``
and a small PNG chart.

Reads nothing but its argument; writes the markdown file and the chart (matplotlib, Agg).
Every number in the report comes from the same run; the settings, machine, device and
load average are printed with them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def _f(x, nd=1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _pp(x) -> str:
    return ("n/a" if x is None or (isinstance(x, float) and math.isnan(x))
            else f"{100 * x:+.1f} points")


# ---------------------------------------------------------------------------- headline

def headline_rows(r: dict) -> list[tuple[str, str, str]]:
    """(what, measured, ratio) for the summary table, from whichever sections ran."""
    rows = []
    if "s1" in r:
        a = r["s1"]
        t, fc = a["tutorial"], a["featcache"]
        rows.append((f"Tutorial recipe vs featcache, {a['n_train']:,} train / {a['n_test']:,} "
                     f"test images at {t['size']} px, same head, {r['settings']['epochs']} "
                     f"epochs: wall time to a trained, tested head",
                     f"{_f(t['total_s'])} s vs {_f(fc['dense_total_s'])} s",
                     f"**{_f(a['speedup_dense'])}x** faster"))
        rows.append(("... and each further head experiment once the cache exists "
                     "(tutorial re-runs everything; featcache trains the head on the cache)",
                     f"{_f(t['total_s'])} s vs {_f(fc['dense_fit_s'] + fc['dense_predict_s'])} s",
                     f"**{_f(a['speedup_rerun'], 0)}x**"))
        rows.append(("Test accuracy, same head: tutorial through the backbone vs featcache "
                     "(should match: same features)",
                     f"{_pct(t['acc'])} vs {_pct(fc['dense_acc'])}", ""))
        own = next(g for g in a["grid"] if g["size"] == a["tutorial_own"]["size"]
                   and g["preprocess"] == "scale01")
        rows.append((f"Accuracy the tutorial leaves on the table: {fc['size']} px + "
                     f"`{fc['preprocess']}` preprocessing vs its own 32 px `/255` "
                     f"(dense head / logreg)",
                     f"{_pct(fc['dense_acc'])} vs {_pct(own['dense_acc'])} / "
                     f"{_pct(fc.get('logreg_acc'))} vs {_pct(own.get('logreg_acc'))}",
                     f"**{_pp(a['acc_gap_dense'])}** / {_pp(a['acc_gap_logreg'])}"))
    if "s2" in r:
        b = r["s2"]
        rows.append(("Stage one (read, resize, preprocess, forward, write) vs the bare "
                     "backbone on pre-made tensors, images/s (medians, goal >= 0.95)",
                     f"{_f(b['pipeline_images_per_s'])} vs {_f(b['bare_images_per_s'])}",
                     f"**{b['ratio']:.3f}** ({'meets' if b['ratio'] >= 0.95 else 'misses'} "
                     f"the goal)"))
        rows.append(("Backbone's achieved FLOP/s vs this machine's float32 matmul FLOP/s "
                     "(how close to the hardware limit)",
                     f"{_f(b['bare_gflops'])} vs {_f(b['matmul_gflops_median'])} GFLOP/s",
                     f"**{b['flops_ratio']:.3f}**"))
    if "s3" in r:
        for pair in r["s3"]["pairs"]:
            a_, b_ = pair["runs"]
            rows.append((f"Peak RSS of stage one at {pair['size']} px, {b_['n_images']:,} vs "
                         f"{a_['n_images']:,} images ({pair['images_ratio']:.0f}x the data; "
                         f"must be flat)",
                         f"{_f(b_['peak_rss_mib'], 0)} vs {_f(a_['peak_rss_mib'], 0)} MiB",
                         f"**{pair['rss_ratio']:.3f}** ({_flatness(pair)})"))
    if "s4" in r and "seconds" in r["s4"]:
        c = r["s4"]
        runs = c.get("runs", {})
        if "old" in runs:
            rows.append((f"Stage two: the default head comparison (`featcache heads`, "
                         f"{len(c['rows'])} rows, {runs['new']['workers']} workers, "
                         f"--search fast) vs the exhaustive protocol (`--workers 0 "
                         f"--search exhaustive`), same file, wall time incl. start-up",
                         f"{_f(c['seconds'])} s vs {_f(runs['old']['seconds'])} s; best "
                         f"`{c.get('best')}` {_pct(_acc(runs['new']))} vs "
                         f"`{runs['old']['best']}` {_pct(_acc(runs['old']))}",
                         f"**{_f(c['speedup'])}x** faster"))
        else:
            rows.append((f"Stage two: the full default head comparison (`featcache heads`: "
                         f"{len(c['rows'])} rows) on {c['n_train']:,} cached training rows",
                         f"{_f(c['seconds'])} s", f"best `{c.get('best')}`"))
        if "new_1worker" in runs:
            rows.append((f"Peak memory of stage two (PSS of the whole process tree), "
                         f"{runs['new']['workers']} workers vs 1 (must not grow with "
                         f"workers beyond a small constant)",
                         f"{_f(runs['new']['peak_pss_mib'], 0)} vs "
                         f"{_f(runs['new_1worker']['peak_pss_mib'], 0)} MiB",
                         f"**{c['memory_ratio']:.3f}**"))
    if "s6" in r:
        rows6 = r["s6"]["rows"]
        rows.append((f"Stage one by runtime, {r['s6']['flops']['size']} px with mirrors, "
                     f"images/s (pipeline; "
                     + ", ".join(x["label"] for x in rows6) + ")",
                     " vs ".join(_f(x["pipeline_images_per_s"]) for x in rows6),
                     " / ".join(f"**{x['vs_tensorflow']:.2f}x**" for x in rows6)
                     + " of TensorFlow's"))
        rows.append(("... each runtime's pipeline vs its own bare engine (goal >= 0.95)",
                     ", ".join(f"{x['label']} {x['ratio']:.3f}" for x in rows6), ""))
        by = {x["label"]: x for x in rows6}
        if "OpenVINO int8" in by:
            i8 = by["OpenVINO int8"]
            vnni = bool(r["s6"].get("int8_flags"))
            rows.append((f"... OpenVINO int8 vs float32 (goal >= {2.5 if vnni else 1.5}x on a "
                         f"CPU {'with' if vnni else 'without'} VNNI/AMX), features' cosine "
                         f"to float32 " + (f"{c['mean']:.4f}" if (c := i8["cosine_to_float32"])
                                           else "n/a"),
                         f"{_f(i8['pipeline_images_per_s'])} vs "
                         f"{_f(by['OpenVINO float32']['pipeline_images_per_s'])}",
                         f"**{i8['vs_openvino_float32']:.2f}x**"
                         + (f" ({i8['pipeline_images_per_s'] / bf:.2f}x bf16's)"
                            if (bf := by.get("OpenVINO bf16", {}).get("pipeline_images_per_s"))
                            else "")))
    if "s8" in r:
        from .predict import headline_rows as _h8

        rows += _h8(r["s8"])
    if "s9" in r:
        from .finetune_usual import headline_rows as _h9

        rows += _h9(r["s9"])
    if "s5" in r:
        d = r["s5"]
        rows.append(("Repeated stage one with nothing changed: `make features` / "
                     "`featcache features` vs the first run",
                     f"{_f(d.get('make_repeat_s'), 2)} s / {_f(d['cli_repeat_s'])} s vs "
                     f"{_f(d['cli_first_s'])} s", ""))
    return rows


def _flatness(pair: dict) -> str:
    """'flat' when peak RSS grew by at most 15% while the data grew several-fold."""
    return "flat" if pair["rss_ratio"] <= 1.15 else "GROWS with the data"


def headline_text(r: dict) -> str:
    lines = ["Headline (ratios measured side by side in this run):"]
    for what, measured, ratio in headline_rows(r):
        lines.append(f"- {what.replace('**', '')}: {measured}  {ratio.replace('**', '')}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------- markdown

def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def markdown(r: dict, chart_rel: str | None) -> str:
    s, m = r["settings"], r["machine"]
    dev = m["device"]
    L = ["# featcache benchmarks", ""]
    L.append(f"Generated by `make bench` "
             f"(`python -m benchmarks{' --quick' if s['mode'] == 'quick' else ''}`) "
             f"on {r['started']}; the run took {r['total_s'] / 60:.1f} min. Every ratio below "
             f"was measured side by side in this one run, so it holds on a noisy machine; "
             f"absolute seconds are this machine's.")
    L.append("")
    L.append(f"**Machine:** {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, "
             f"{m['os']}. **Device used:** "
             + ('CPU (no GPU visible to TensorFlow)' if dev['kind'] == 'CPU'
                else 'GPU: ' + dev['name'] + ' x' + str(dev['count']))
             + ". "
             f"Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}, "
             f"NumPy {m['numpy']}, scikit-learn {m['sklearn']}, h5py {m['h5py']}.")
    L.append("")
    load = r.get("load", {})
    L.append(f"**Load average** (1/5/15 min) at start {r['load_start']}, at the end "
             f"{r['load_end']}" + (" (per section below)." if load else "."))
    if s["mode"] == "quick":
        L += ["", "> **--quick smoke run**: tiny subsets at a small input size; it checks that "
              "everything runs. Its numbers are not the benchmark."]
    for note in s["notes"]:
        L += ["", f"> **Note:** {note}"]
    L += ["", "## Headline", ""]
    L += _table(["what", "measured", "ratio"], [list(x) for x in headline_rows(r)])
    if chart_rel:
        L += ["", f"![benchmark chart]({chart_rel})"]
    L += ["", "## Settings", ""]
    ds = "CIFAR-10 (real, " + s["data_dir"] + ")" if s["dataset"] == "cifar10" else \
        "synthetic (generated, 10 classes; real CIFAR-10 not found)"
    L += _table(["setting", "value"], [
        ["mode", s["mode"]], ["dataset", ds],
        ["backbone", f"{s['backbone']} "
                     f"({'ImageNet weights' if s['weights'] == 'imagenet' else 'RANDOM weights'}) "
                     f"— the default; ResNet50 (the tutorial's) has no weights on this machine"],
        ["input size", f"{s['size']} px (tutorial's own: {s['tutorial_size']} px)"],
        ["batch size", s["batch"]], ["seed", s["seed"]],
        ["head", f"Dense({s['hidden']}, relu) -> Dense(classes, softmax), Adam 1e-3, "
                 f"{s['epochs']} epochs, batch {s['batch']}"],
        ["section 1 subset", f"first {s['n_train']:,} train / {s['n_test']:,} test images"],
        ["section 2", f"{s['tp_reps']} A/B rounds of {s['tp_images']:,} images, first "
                      f"{s['tp_warmup']} batches excluded; matmul {s['matmul_n']}x{s['matmul_n']} "
                      f"float32, {s['matmul_reps']} per round"],
        ["section 3", ", ".join(f"{a} px / --limit {b or 'none'}" for a, b in s["rss_runs"])],
        ["section 4 file", r.get("s4", {}).get("file", "n/a")],
        ["section 6", f"{s.get('rt_reps', 'n/a')} alternating rounds of {s.get('rt_images', 0):,} "
                      f"images with mirrors per runtime (pipeline and bare engine)"],
        ["section 8", f"{s.get('pr_images', 0):,} image files, a head fitted on "
                      f"{s.get('pr_train', 0):,} training images, {s.get('rt_reps', 'n/a')} "
                      f"alternating rounds per runtime"],
        ["section 9", f"section 1's subset; {s.get('ft_head_epochs', 'n/a')} head + "
                      f"{s.get('ft_top_epochs', 'n/a')} top epochs, both ways"],
    ])
    from .finetune_mem import report_lines as _s7
    from .finetune_usual import report_lines as _s9
    from .predict import report_lines as _s8

    for key, fn in (("s1", _s1), ("s2", _s2), ("s3", _s3), ("s4", _s4), ("s5", _s5),
                    ("s6", _s6), ("s7", _s7), ("s8", _s8), ("s9", _s9)):
        if key in r:
            L += [""] + fn(r[key], r) + [""]
            if key in load:
                L.append(f"*Section time {r['timing'][key]:.0f} s; load average "
                         f"{load[key][0]} -> {load[key][1]}.*")
    L += ["", "## How to reproduce", "",
          "`make bench` (full, 10-20 min on 2 cores) or `make bench-quick` (about a minute). "
          "See [docs/benchmarks.md](docs/benchmarks.md) for what each number means and how "
          "it is measured; raw numbers of this run are in `bench-out/bench.json`.", ""]
    return "\n".join(L)


def _s1(a: dict, r: dict) -> list[str]:
    t, fc = a["tutorial"], a["featcache"]
    L = ["## 1. The tutorial's recipe vs featcache", "",
         f"Same {a['n_train']:,} training and {a['n_test']:,} test images ({a['dataset']}), "
         f"same input ({t['size']} px, `{t['preprocess']}` preprocessing, resized inside the "
         f"graph), same head, optimiser, {r['settings']['epochs']} epochs and seed. The tutorial "
         f"trains `backbone (frozen) + head` with `model.fit` on the images; featcache runs the "
         f"backbone once into the feature file, then fits the head on the cache.", ""]
    L += _table(["", "tutorial (through the backbone)", "featcache (cache, then head)"], [
        ["build / stage one (s)", _f(t["build_s"]), _f(fc["extract_s"])],
        ["head training (s)", _f(t["fit_s"]), _f(fc["dense_fit_s"], 2)],
        ["test predictions (s)", _f(t["predict_s"]), _f(fc["dense_predict_s"], 2)],
        ["**total (s)**", f"**{_f(t['total_s'])}**", f"**{_f(fc['dense_total_s'])}**"],
        ["test accuracy (dense head)", _pct(t["acc"]), _pct(fc["dense_acc"])],
        [f"logreg on the cache ({fc.get('logreg_name', 'logreg')}): fit / predict s, accuracy",
         "—", f"{_f(fc.get('logreg_fit_s'), 2)} / {_f(fc.get('logreg_predict_s'), 2)}, "
              f"{_pct(fc.get('logreg_acc'))}"],
    ])
    L += ["", f"Ratio of totals: **{_f(a['speedup_dense'])}x**. A further head experiment "
          f"(another head, another learning rate) costs the tutorial its full total again and "
          f"featcache only the head: **{_f(a['speedup_rerun'], 0)}x**.", "",
          "The tutorial's own input vs the correct one, all through featcache (same subset, "
          "same head):", ""]
    rows = []
    for g in sorted(a["grid"], key=lambda g: (g["size"], g["preprocess"] != "scale01")):
        tag = (" (the tutorial's)"
               if g["size"] == a["tutorial_own"]["size"] and g["preprocess"] == "scale01" else "")
        rows.append([f"{g['size']} px", f"`{g['preprocess']}`{tag}", _f(g["extract_s"]),
                     _pct(g["dense_acc"]), _pct(g.get("logreg_acc"))])
    L += _table(["input", "preprocessing", "stage one (s)", "dense head acc", "logreg acc"], rows)
    L += ["", f"Gap (correct minus the tutorial's): dense head **{_pp(a['acc_gap_dense'])}**, "
          f"logreg **{_pp(a['acc_gap_logreg'])}**."]
    return L


def _s2(b: dict, r: dict) -> list[str]:
    fl = b["flops"]
    L = ["## 2. Stage one vs the bare backbone, and vs the hardware", "",
         f"{len(b['featcache'])} interleaved rounds (A B / B A): **A** = `extract_features` end "
         f"to end on {b['images_per_rep']:,} uint8 32 px images (read, resize, preprocess, "
         f"forward, write HDF5), timed over its steady state; **B** = the same backbone on a "
         f"pre-made preprocessed {fl['size']} px float32 batch, same batch size, same number "
         f"of batches. Then a {b['matmul_n']}x{b['matmul_n']} float32 matmul.", ""]
    rows = []
    for i, (p, q) in enumerate(zip(b["featcache"], b["bare"])):
        rows.append([i + 1, _f(p["images_per_s"]), _f(q["images_per_s"]),
                     f"{p['images_per_s'] / q['images_per_s']:.3f}",
                     _f(p["end_to_end_images_per_s"])])
    rows.append(["**median**", f"**{_f(b['pipeline_images_per_s'])}**",
                 f"**{_f(b['bare_images_per_s'])}**", f"**{b['ratio']:.3f}**", ""])
    L += _table(["round", "pipeline img/s", "bare img/s", "ratio",
                 "pipeline end to end incl. model build (img/s)"], rows)
    L += ["", f"FLOPs per image ({fl['backbone']} at {fl['size']} px, 2 x multiply-adds of "
          f"the conv/dense layers): **{fl['flops'] / 1e9:.3f} GFLOP**.", ""]
    L += _table(["", "GFLOP/s", "fraction of matmul"], [
        ["float32 matmul (median / best of "
         f"{len(b['matmul_gflops'])})",
         f"{_f(b['matmul_gflops_median'])} / {_f(b['matmul_gflops_max'])}", "1"],
        ["bare backbone", _f(b["bare_gflops"]), f"{b['flops_ratio']:.3f}"],
        ["stage one pipeline", _f(b["pipeline_gflops"]), f"{b['pipeline_flops_ratio']:.3f}"],
    ])
    return L


def _s3(c: dict, r: dict) -> list[str]:
    L = ["## 3. Memory: peak RSS of stage one at two dataset sizes", "",
         "Each run is `python -m featcache features …` in its own process; peak RSS is that "
         "child's `ru_maxrss` (kernel accounting via `os.wait4`).", ""]
    rows = []
    for pair in c["pairs"]:
        for run in pair["runs"]:
            rows.append([f"{pair['size']} px", f"{run['n_images']:,}",
                         f"--limit {run['limit'] or 'none'}", _f(run["seconds"]),
                         _f(run.get("images_per_s")), _f(run["peak_rss_mib"], 0)])
        rows.append(["", "", "**ratio (larger / smaller)**", "", "",
                     f"**{pair['rss_ratio']:.3f}** for {pair['images_ratio']:.0f}x the images"])
    L += _table(["input", "images", "run", "wall s (incl. start-up)", "img/s", "peak RSS MiB"],
                rows)
    return L


def _acc(run: dict) -> float | None:
    return next((h["acc"] for h in run["rows"] if h["name"] == run["best"]), None)


def _s4(c: dict, r: dict) -> list[str]:
    L = ["## 4. Stage two on the cache", ""]
    if "seconds" not in c:
        return L + [f"Not run: {c.get('missing')}."]
    runs = c.get("runs", {"new": {"rows": c["rows"], "seconds": c["seconds"]}})
    L += [f"`featcache heads {c['file']}` — every default head, its grid scored on a "
          f"stratified validation split of the training rows, refit on all training rows, "
          f"{c['n_test']:,} test rows scored once, `+flip` rows when the file has mirrored "
          f"features — in its own process tree, each run below on the same file one after "
          f"the other (wall time includes start-up and the report):", ""]
    L += _table(["run", "arguments", "workers", "wall s", "peak PSS MiB (tree)",
                 "peak RSS MiB (tree, shared pages counted per process)", "best row"],
                [[k, " ".join(v.get("args", [])) or "(defaults)", v.get("workers", ""),
                  f"**{_f(v['seconds'])}**", _f(v.get("peak_pss_mib"), 0),
                  _f(v.get("peak_rss_mib"), 0), f"`{v.get('best')}` {_pct(_acc(v))}"]
                 for k, v in runs.items()])
    if "speedup" in c:
        L += ["", f"Default vs the exhaustive protocol: **{_f(c['speedup'])}x** faster."]
    if "memory_ratio" in c:
        L += [f"Peak memory, {runs['new']['workers']} workers / 1 worker: "
              f"**{c['memory_ratio']:.3f}**; same choices and test accuracies with 1 and "
              f"{runs['new']['workers']} workers: {'yes' if c.get('identical_choices') else 'NO'}."]
    L += [""]
    old = {h["name"]: h for h in runs.get("old", {}).get("rows", [])}
    header = ["row", "chosen params", "select s", "refit s", "predict s", "test accuracy"]
    if old:
        header += ["old: select / refit / predict s", "old: test accuracy"]
    body = []
    for h in c["rows"]:
        line = [f"`{h['name']}`", ", ".join(f"{k}={v}" for k, v in h["params"].items()),
                _f(h["select_s"]), _f(h["fit_s"], 2) + ("" if h.get("refit", True)
                                                       else " (no refit)"),
                _f(h["predict_s"], 3), _pct(h["acc"])]
        if old:
            o = old.get(h["name"], {})
            line += [f"{_f(o.get('select_s'))} / {_f(o.get('fit_s'), 2)} / "
                     f"{_f(o.get('predict_s'), 3)}", _pct(o.get("acc"))]
        body.append(line)
    L += _table(header, body)
    return L


def _s5(d: dict, r: dict) -> list[str]:
    L = ["## 5. Cache hit: a repeated run with nothing changed", ""]
    rows = [["`featcache features` (first run, does the work)", _f(d["cli_first_s"])],
            ["`featcache features` again (checks the configuration hash: dataset fingerprint, "
             "weights hash; then nothing)", _f(d["cli_repeat_s"])]]
    if "make_repeat_s" in d:
        rows.append(["`make features` again (the file target exists: make does nothing)",
                     _f(d["make_repeat_s"], 2)])
    L += _table(["command", "wall s"], rows)
    if "make_note" in d:
        L += ["", f"`make features`: {d['make_note']}"]
    L += ["", f"Command: `{d['cli_cmd']}`"]
    return L


def _s6(d: dict, r: dict) -> list[str]:
    fl = d["flops"]
    L = ["## 6. Stage one runtimes", "",
         f"Each runtime in {len(d['rows'][0]['featcache'])} alternating rounds on the same "
         f"{d['images_per_rep']:,} images: the **pipeline** (`extract_features --flip` through "
         f"that runtime, steady state; conversion done once before the rounds and cached) and "
         f"its **bare engine** (the backbone alone in the same engine on a pre-made, "
         f"preprocessed {fl['size']} px batch and its mirror). FLOP/s count "
         f"{2 * fl['flops'] / 1e9:.3f} GFLOP per image (the image and its mirror) against the "
         f"median {d['matmul_n']}x{d['matmul_n']} float32 matmul of the same rounds "
         f"({_f(d['matmul_gflops_median'])} GFLOP/s).", ""]
    roofs = d.get("roofs_gops_median", {})
    if roofs:
        L += [f"Roofs, the same {d['matmul_n']}x{d['matmul_n']} matmul compiled by OpenVINO in "
              f"the same rounds: " + ", ".join(f"{p} {_f(v)} GOP/s" for p, v in roofs.items())
              + (f" (int8 instructions here: {', '.join(d['int8_flags'])})"
                 if d.get("int8_flags") else " (no VNNI/AMX here: int8 runs on AVX2 "
                 "multiplies)") + ". Cosine: each image's features (and its mirror's) against "
              "OpenVINO float32's, mean / min.", ""]

    def _cos(x):
        c = x.get("cosine_to_float32")
        return f"{c['mean']:.4f} / {c['min']:.3f}" if c else "n/a"

    def _opt(v, fmt):
        return fmt.format(v) if v is not None else "n/a"
    L += _table(["runtime", "pipeline img/s", "vs TensorFlow float32", "vs OpenVINO float32",
                 "bare engine img/s", "pipeline / bare", "pipeline GOP/s",
                 "fraction of float32 matmul", "fraction of its precision's roof",
                 "cosine to float32", "rounds (pipeline img/s)"],
                [[x["label"], f"**{_f(x['pipeline_images_per_s'])}**",
                  f"**{x['vs_tensorflow']:.2f}x**",
                  f"**{_opt(x.get('vs_openvino_float32'), '{:.2f}x')}**",
                  _f(x["bare_images_per_s"]), f"{x['ratio']:.3f}", _f(x["pipeline_gflops"]),
                  f"{x['pipeline_flops_ratio']:.3f}", _opt(x.get("roof_ratio"), "{:.3f}"),
                  _cos(x), ", ".join(_f(p["images_per_s"]) for p in x["featcache"])]
                 for x in d["rows"]])
    for why in d.get("skipped", []):
        L += ["", f"Not run: {why}."]
    L += ["", "Setup before the rounds (first run: model build, and for OpenVINO the "
          "conversion into the cache), s: "
          + ", ".join(f"{k} {_f(v)}" for k, v in d["setup_s"].items()) + "."]
    return L


# ---------------------------------------------------------------------------- chart

def draw_chart(r: dict, path: Path) -> None:
    """Up to six small panels, one per measured quantity; ~50 KB PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.6))
    ax = axes.ravel()
    for a in ax:
        a.tick_params(labelsize=8)
    if "s1" in r:
        a, t, fc = r["s1"], r["s1"]["tutorial"], r["s1"]["featcache"]
        ax[0].barh(["tutorial", "featcache"], [t["build_s"], fc["extract_s"]], color="#999",
                   label="build / stage one")
        ax[0].barh(["tutorial", "featcache"], [t["fit_s"] + t["predict_s"],
                                               fc["dense_fit_s"] + fc["dense_predict_s"]],
                   left=[t["build_s"], fc["extract_s"]], color="#3b7dd8", label="head fit + test")
        ax[0].set_xlabel("seconds", fontsize=8)
        ax[0].set_title(f"1. same head, {a['n_train']} imgs: {a['speedup_dense']:.1f}x", fontsize=9)
        ax[0].legend(fontsize=7)
        grid = sorted(a["grid"], key=lambda g: (g["size"], g["preprocess"] != "scale01"))
        labels = [f"{g['size']}px\n{g['preprocess']}" for g in grid]
        xs = range(len(grid))
        ax[1].bar([x - 0.2 for x in xs], [g["dense_acc"] for g in grid], 0.4, label="dense")
        ax[1].bar([x + 0.2 for x in xs], [g.get("logreg_acc", 0) for g in grid], 0.4,
                  label="logreg")
        ax[1].set_xticks(list(xs), labels, fontsize=7)
        ax[1].set_ylim(0, 1)
        ax[1].set_title("1. test accuracy by input", fontsize=9)
        ax[1].legend(fontsize=7)
    if "s2" in r:
        b = r["s2"]
        n = len(b["featcache"])
        ax[2].plot(range(1, n + 1), [p["images_per_s"] for p in b["featcache"]], "o-",
                   label="stage one")
        ax[2].plot(range(1, n + 1), [q["images_per_s"] for q in b["bare"]], "s--",
                   label="bare backbone")
        ax[2].set_ylim(0, None)
        ax[2].set_xlabel("round", fontsize=8)
        ax[2].set_ylabel("images/s", fontsize=8)
        ax[2].set_title(f"2. pipeline / bare = {b['ratio']:.3f}", fontsize=9)
        ax[2].legend(fontsize=7)
        ax[3].bar(["matmul", "bare", "featcache"],
                  [b["matmul_gflops_median"], b["bare_gflops"], b["pipeline_gflops"]],
                  color=["#777", "#3b7dd8", "#e08a2c"])
        ax[3].set_ylabel("GFLOP/s", fontsize=8)
        ax[3].set_title(f"2. backbone / matmul = {b['flops_ratio']:.3f}", fontsize=9)
    if "s3" in r:
        labels, vals = [], []
        for pair in r["s3"]["pairs"]:
            for run in pair["runs"]:
                labels.append(f"{pair['size']}px\n{run['n_images']}")
                vals.append(run["peak_rss_mib"])
        ax[4].bar(labels, vals, color="#5a9e5a")
        ax[4].set_ylabel("peak RSS MiB", fontsize=8)
        ax[4].tick_params(axis="x", labelsize=7)
        ax[4].set_title("3. stage one peak RSS (px / images)", fontsize=9)
    if "s4" in r and r["s4"].get("rows"):
        hs = r["s4"]["rows"]
        names = [h["name"] for h in hs]
        sel = [h["select_s"] for h in hs]
        fit = [h["fit_s"] for h in hs]
        ax[5].barh(names, sel, label="selection")
        ax[5].barh(names, fit, left=sel, label="refit")
        ax[5].barh(names, [h["predict_s"] for h in hs],
                   left=[a + b for a, b in zip(sel, fit)], label="predict")
        ax[5].invert_yaxis()
        ax[5].tick_params(axis="y", labelsize=7)
        ax[5].set_xlabel("seconds", fontsize=8)
        ax[5].set_title(f"4. heads on {r['s4']['n_train']} rows: {r['s4']['seconds']:.0f} s",
                        fontsize=9)
        ax[5].legend(fontsize=7)
    for a in ax:
        if not a.has_data():
            a.set_axis_off()
    dev = r["machine"]["device"]
    fig.suptitle(f"featcache benchmarks ({r['settings']['mode']}), {r['started']}, "
                 f"{dev['kind']}: {dev['name']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def write(r: dict, *, out: Path, chart: Path | None = None) -> None:
    """Write the markdown report to ``out`` and the chart (linked relative to ``out``)."""
    rel = None
    if chart is not None:
        draw_chart(r, Path(chart))
        try:
            rel = str(Path(chart).resolve().relative_to(Path(out).resolve().parent))
        except ValueError:
            rel = str(Path(chart).resolve())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(relative_paths(markdown(r, rel)))


def relative_paths(text: str, cwd: Path | None = None) -> str:
    """``text`` with the absolute paths of this checkout and of the folder beside it written
    relative to the checkout (``features/x.h5``, ``../shared/data``): the published page
    gives commands a reader can run from their own clone, not this machine's paths."""
    here = (cwd or Path.cwd()).resolve()
    for prefix, short in ((here, ""), (here.parent, "../")):
        if str(prefix) != "/":
            text = text.replace(str(prefix) + "/", short)
    return text
