"""The benchmark (``make bench``): its ``--quick`` version runs end to end and writes the
tables, ratios and chart (the numbers themselves are not checked: no timed assertions);
and the pieces a wrong number would come from — the FLOP counter and the per-child peak
RSS — are right."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level package beside `featcache`


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``python -m benchmarks --quick`` run (synthetic data, random weights: what CI
    without ../shared sees) into a temporary folder."""
    tmp = tmp_path_factory.mktemp("bench")
    out, chart, work = tmp / "BENCH.md", tmp / "chart.png", tmp / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--dataset", "synthetic",
         "--weights", "none", "--out", str(out), "--chart", str(chart), "--work-dir", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"proc": proc, "md": out.read_text(), "chart": chart,
            "json": json.loads((work / "bench.json").read_text()), "work": work}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_bench_writes_every_section_table_and_ratio(quick_run):
    md, r = quick_run["md"], quick_run["json"]
    for heading in ("## Headline", "## Settings", "## 1. ", "## 2. ", "## 3. ", "## 4. ",
                    "## 5. ", "## 6. ", "## 8. ", "## 9. "):
        assert heading in md, heading
    # settings, device and the loud fallback notes are printed with the numbers
    assert "**Device used:** CPU (no GPU" in md or "**Device used:** GPU: " in md
    assert "random weights" in md and "--quick smoke run" in md
    assert "device used:" in quick_run["proc"].stdout
    assert r["settings"]["mode"] == "quick" and r["settings"]["seed"] == 0

    s1 = r["s1"]
    assert s1["n_train"] == r["settings"]["n_train"] and s1["n_test"] == r["settings"]["n_test"]
    assert _positive(s1["speedup_dense"]) and _positive(s1["speedup_rerun"])
    assert {(g["size"], g["preprocess"]) for g in s1["grid"]} == \
        {(32, "scale01"), (32, "tf"), (64, "scale01"), (64, "tf")}
    for g in s1["grid"]:
        assert 0.0 <= g["dense_acc"] <= 1.0 and 0.0 <= g["logreg_acc"] <= 1.0

    s2 = r["s2"]
    assert _positive(s2["ratio"]) and _positive(s2["flops_ratio"])
    assert len(s2["featcache"]) == len(s2["bare"]) == r["settings"]["tp_reps"]
    # the bare backbone is timed on exactly as many batches as the pipeline's window
    for p, b in zip(s2["featcache"], s2["bare"]):
        assert p["batches"] == b["batches"] > 0

    pairs = r["s3"]["pairs"]
    assert pairs and all(_positive(p["rss_ratio"]) for p in pairs)
    for p in pairs:
        small, big = p["runs"]
        assert big["n_images"] > small["n_images"] and small["peak_rss_mib"] > 100

    s4 = r["s4"]
    assert _positive(s4["seconds"]) and s4["rows"]
    assert {h["head"] for h in s4["rows"]} >= {"logreg", "dense"}
    assert all(h["fit_s"] >= 0 and 0 <= h["acc"] <= 1 for h in s4["rows"])
    # stage two side by side: the default vs the exhaustive protocol, and the memory
    # of the whole process tree with one worker and with the default count
    assert set(s4["runs"]) == {"new", "new_1worker", "old"}
    assert s4["runs"]["old"]["workers"] == 0 and s4["runs"]["new_1worker"]["workers"] == 1
    assert _positive(s4["speedup"]) and _positive(s4["memory_ratio"])
    assert all(_positive(run["peak_pss_mib"]) for run in s4["runs"].values())
    assert s4["identical_choices"] is True
    assert f"**{s4['speedup']:.1f}x** faster" in md

    s5 = r["s5"]
    assert _positive(s5["cli_repeat_s"]) and _positive(s5["cli_first_s"])
    assert "make_repeat_s" in s5 or "make_note" in s5

    s6 = r["s6"]
    labels = [x["label"] for x in s6["rows"]]
    assert labels[:2] == ["TensorFlow float32", "OpenVINO float32"]
    floats = [x for x in labels if not x.endswith("int8")]
    assert floats[2:] in ([], ["OpenVINO bf16"]) and labels[len(floats):] in (
        [], ["OpenVINO int8"])
    # bf16 and int8 are said to be left out, not hidden
    assert len(s6["skipped"]) == 4 - len(labels)
    assert set(s6["roofs_gops_median"]) == {x.split()[1] for x in labels}
    for x in s6["rows"]:
        c = x["cosine_to_float32"]    # None: random weights gave all-zero features
        assert c is None or -1 <= c["min"] <= c["mean"] <= 1 + 1e-6
        if x["label"] == "OpenVINO float32":
            assert c is None or c["min"] > 1 - 1e-6
            assert x["vs_openvino_float32"] == 1.0
        assert _positive(x["roof_gops"]) and _positive(x["roof_ratio"])
        assert f"**{x['vs_openvino_float32']:.2f}x**" in md
        assert _positive(x["pipeline_images_per_s"]) and _positive(x["bare_images_per_s"])
        assert _positive(x["ratio"]) and _positive(x["pipeline_flops_ratio"])
        assert len(x["featcache"]) == len(x["bare"]) == r["settings"]["rt_reps"]
        for p, b in zip(x["featcache"], x["bare"]):
            assert p["batches"] == b["batches"] > 0
        assert f"{x['ratio']:.3f}" in md
    assert s6["rows"][0]["vs_tensorflow"] == 1.0

    # section 8: featcache predict on each runtime, on the same image files
    s8 = r["s8"]
    assert [x["label"] for x in s8["rows"]] == floats      # section 6's float runtimes
    assert s8["images"] == r["settings"]["pr_images"] and s8["auto"] in labels
    for x in s8["rows"]:
        assert _positive(x["images_per_s"]) and _positive(x["cli_s"])
        assert len(x["rounds"]) == r["settings"]["rt_reps"]
        assert 0 <= x["agreement"] <= 1 and 0 <= x["accuracy"] <= 1
        assert 0 <= x["pipeline_agreement"] <= 1
        assert f"**{x['vs_tensorflow']:.2f}x**" in md
    tf_row, ov_row = s8["rows"][:2]
    assert tf_row["agreement"] == 1.0 and tf_row["max_abs_diff"] == 0.0
    assert ov_row["precision"] == "float32" and ov_row["max_abs_diff"] < 1e-4

    # section 9: fine-tuning the usual way vs from the cache (checked in detail below)
    s9 = r["s9"]
    assert f"**{s9['ratio_top_epoch']:,.1f}x** / **{s9['ratio_total']:,.1f}x**" in md

    # the ratios in the headline table are the ones in the JSON
    assert f"**{s2['ratio']:.3f}**" in md and f"**{pairs[0]['rss_ratio']:.3f}**" in md


@pytest.mark.slow
def test_quick_bench_chart_is_a_small_png(quick_run):
    data = quick_run["chart"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(data) < 250_000
    assert "![benchmark chart](chart.png)" in quick_run["md"]


@pytest.fixture(scope="module")
def section9(quick_run):
    """Section 9 of the quick run (synthetic data, random weights), and its settings."""
    r = quick_run["json"]
    return r["settings"], r["s9"]


@pytest.mark.slow
def test_section9_times_both_ways_on_the_same_training(section9):
    s, d = section9
    assert (d["n_train"], d["n_test"], d["cut"]) == (s["n_train"], s["n_test"], "block_13")
    u, c = d["usual"], d["cache"]
    # the same top (every block above the cut) and the same number of epochs of each phase
    assert u["trainable_blocks"] == c["trainable_blocks"] == d["trainable_blocks"] == 4
    assert u["trainable_values"] == c["trainable_values"] > 0
    for side in (u, c):
        assert len(side["head_epochs_s"]) == s["ft_head_epochs"] == d["head_epochs"]
        assert len(side["top_epochs_s"]) == s["ft_top_epochs"] == d["top_epochs"]
        assert all(_positive(x) for x in side["head_epochs_s"] + side["top_epochs_s"])
        parts = (side["stage_one_s"] + side["setup_s"] + sum(side["head_epochs_s"])
                 + sum(side["top_epochs_s"]) + side["predict_s"])
        assert side["total_s"] == pytest.approx(parts, rel=1e-9)
        assert side["top_epoch_s"] == pytest.approx(
            sum(side["top_epochs_s"][1:]) / (len(side["top_epochs_s"]) - 1))
        assert _positive(side["setup_s"]) and _positive(side["predict_s"])
        assert 0.0 <= side["acc"] <= 1.0
    assert u["stage_one_s"] == 0.0 and _positive(c["stage_one_s"])
    assert Path(c["file"]).is_file() and _positive(c["file_mb"])
    # the ratios are the measured numbers' (usual / cache)
    assert d["ratio_top_epoch"] == pytest.approx(u["top_epoch_s"] / c["top_epoch_s"])
    assert d["ratio_total"] == pytest.approx(u["total_s"] / c["total_s"])


@pytest.mark.slow
def test_section9_is_in_the_report_and_its_headline(section9):
    from benchmarks import report
    from benchmarks.run import QUICK_SECTIONS, SECTIONS

    s, d = section9
    assert 9 in SECTIONS and "9" in QUICK_SECTIONS.split(",")
    r = {"settings": s, "machine": {"device": {"kind": "CPU", "name": "x", "count": 1},
                                              "cpu": "x", "cores": 1, "memory_gib": 1,
                                              "os": "x", "python": "3", "tensorflow": "2",
                                              "keras": "3", "numpy": "1", "sklearn": "1",
                                              "h5py": "3"},
         "started": "now", "total_s": 1.0, "load_start": [], "load_end": [], "s9": d}
    md = report.markdown(r, None)
    assert "## 9. Fine-tuning: the usual way vs from the cache" in md
    ratios = f"**{d['ratio_top_epoch']:,.1f}x** / **{d['ratio_total']:,.1f}x**"
    assert ratios in md and ratios.replace("**", "") in report.headline_text(r)
    assert f"**{d['usual']['total_s']:,.1f}**" in md and f"**{d['cache']['total_s']:,.1f}**" in md


def test_flop_count_matches_the_published_mobilenet_v2_figure():
    from benchmarks.throughput import count_flops

    # MobileNetV2 1.0 at 224 px: 300 M multiply-adds (Sandler et al. 2018, Table 4;
    # 299.5 M without the 1.3 M of the classifier this headless model lacks)
    full = count_flops("mobilenet_v2", 224)
    assert full["macs"] == pytest.approx(300e6, rel=0.01)
    assert full["flops"] == 2 * full["macs"]
    # cost scales with the number of output pixels: 4x at twice the size (448 = 14 x 32,
    # so every stride-2 stage halves exactly, as at 224)
    double = count_flops("mobilenet_v2", 448)
    assert double["macs"] / full["macs"] == pytest.approx(4.0, rel=0.01)


CHILD = "import numpy as np; a = np.ones(({mb} * 2**20 // 8,)); a += 1"


def test_run_child_reads_each_childs_own_peak_rss():
    """Per-child accounting: a small child after a big one must not report the big one's
    peak (which RUSAGE_CHILDREN would), nor the peak of the big parent it was started
    from (which Linux carries across fork + exec)."""
    import numpy as np

    from benchmarks.processes import run_child

    ballast = np.ones(600 * 2**20 // 8)  # make this process big, like the bench with TF
    big = run_child([sys.executable, "-c", CHILD.format(mb=400)])
    small = run_child([sys.executable, "-c", CHILD.format(mb=20)])
    assert big["rc"] == small["rc"] == 0
    assert big["peak_rss_mib"] > 400
    assert small["peak_rss_mib"] < 300
    failing = run_child([sys.executable, "-c", "raise SystemExit(3)"])
    assert failing["rc"] == 3
    del ballast


def test_rss_pairs_and_image_counts():
    from benchmarks.env import Settings
    from benchmarks.processes import expected_images, rss_pairs

    s = Settings.full(dataset="cifar10")
    assert rss_pairs(s) == [(224, 500, 2500), (32, 2500, None)]
    assert expected_images(s, 500) == 1000 and expected_images(s, None) == 60000
    assert expected_images(Settings.quick(dataset="synthetic"), 20) == 40


@pytest.mark.real
def test_resolve_finds_real_data_and_weights(real_data_dir, keras_home, tmp_path):
    from benchmarks.env import Settings, resolve

    s = resolve(Settings.quick(work_dir=str(tmp_path)), data_dir=str(real_data_dir),
                dataset=None, weights=None, feature_file=None)
    assert s.dataset == "cifar10" and s.weights == "imagenet" and not s.notes


def test_a_quick_run_never_writes_the_published_page():
    """``make bench-quick`` writes into the work folder; only a full run (or an explicit
    ``--out``) replaces BENCHMARKS.md and docs/bench.png."""
    from benchmarks.run import parse_args, report_paths

    assert report_paths(parse_args(["--quick"])) == (Path("bench-out/BENCHMARKS.md"),
                                                     Path("bench-out/bench.png"))
    assert report_paths(parse_args(["--quick", "--work-dir", "w"])) == (
        Path("w/BENCHMARKS.md"), Path("w/bench.png"))
    assert report_paths(parse_args([])) == (Path("BENCHMARKS.md"), Path("docs/bench.png"))
    assert report_paths(parse_args(["--quick", "--out", "x/B.md"])) == (
        Path("x/B.md"), Path("x/docs/bench.png"))


def test_the_report_writes_paths_relative_to_the_checkout(tmp_path):
    from benchmarks.report import relative_paths

    here = tmp_path / "clone"
    text = f"--data-dir {tmp_path}/shared/data --out-dir {here}/bench-out/s3 and /usr/bin/time"
    assert relative_paths(text, cwd=here) == \
        "--data-dir ../shared/data --out-dir bench-out/s3 and /usr/bin/time"


def test_importing_the_benchmark_leaves_the_head_registry_alone():
    """Only the baseline's child process imports benchmarks/baseline_heads.py (which replaces
    the registry's logreg, linear_svm and knn): importing every other benchmark module, as
    these tests do, changes no head another test of the same process compares."""
    code = ("import json, pkgutil, importlib, benchmarks\n"
            "from featcache.heads import HEADS\n"
            "before = {n: repr(s) for n, s in HEADS.items()}\n"
            "for m in pkgutil.iter_modules(benchmarks.__path__):\n"
            "    if m.name not in ('__main__', 'baseline_heads'):\n"
            "        importlib.import_module('benchmarks.' + m.name)\n"
            "print(json.dumps([n for n, s in HEADS.items() if before.get(n) != repr(s)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
