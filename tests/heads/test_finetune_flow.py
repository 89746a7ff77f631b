"""The one-command fine-tuning flow: the registry's recommended cut, ``featcache finetune
FILE`` (the frozen rows and the finetune row in one comparison, then export of the best
row), the time budget (``--budget``: its planner, its parser, what the row records).

Tiny on purpose: the synthetic set at 32 px, MobileNetV2 with random weights whose
BatchNorm statistics are calibrated (the ``calibrated_weights`` fixture), one comparison.
"""

from __future__ import annotations

import json

import pytest

from featcache.heads.finetune.budget import MAX_PLANNED_EPOCHS, Deadline, plan_epochs

# ---------------------------------------------------------------------------- the planner


@pytest.mark.parametrize("budget, step_s, steps, fixed, extra", [
    (1800, 2.2, 176, 60, 35),      # the study's scale: about 2.2 s a step, 176 steps
    (90, 0.5, 40, 10, 2),
    (10, 0.1, 7, 9.5, 0),          # not even one epoch left
    (5, 3.0, 1, 0, 0),
    (3600, 0.01, 10, 1, 0.1),      # a huge budget: capped
])
def test_planned_epochs_never_exceed_the_budget(budget, step_s, steps, fixed, extra):
    n = plan_epochs(budget, step_s, steps, fixed, extra)
    assert 0 <= n <= MAX_PLANNED_EPOCHS
    assert fixed + n * (steps * step_s + extra) <= budget
    if n < MAX_PLANNED_EPOCHS:    # one more epoch would not have fitted
        assert fixed + (n + 1) * (steps * step_s + extra) > budget


def test_a_tiny_budget_plans_fewer_epochs_and_a_large_one_is_capped():
    plans = [plan_epochs(b, 1.0, 100, 20, 5) for b in (60, 200, 500, 1000, 10 ** 6)]
    assert plans == sorted(plans) and plans[0] == 0 and plans[1] == 1 and plans[2] == 4
    assert plans[-1] == MAX_PLANNED_EPOCHS
    assert plan_epochs(1000, 1.0, 100, 0, 0, cap=3) == 3
    assert plan_epochs(0, 1.0, 100) == 0 and plan_epochs(100, 1.0, 0) == 0


def test_the_deadline_refuses_a_step_that_would_end_past_the_budget():
    import time

    clock = Deadline(10.0, t0=time.perf_counter() - 8.0)      # 2 s left
    assert clock.step_fits(1.0) and not clock.step_fits(1.0, reserve_s=1.5)
    assert not clock.step_fits(2.5)
    assert Deadline(None).step_fits(10 ** 9)


# ---------------------------------------------------------------------------- budget values

@pytest.mark.parametrize("value", ["3x", "30 minutes", "1h30", "-5m", "m", "0s", "8d"])
def test_a_bad_budget_is_a_one_line_error_with_an_example(value, capsys):
    from featcache.cli.main import main

    rc = main(["finetune", "no-such-file.h5", f"--budget={value}"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--budget" in err and ("30m" in err or "between 1 and" in err), err


def test_budget_forms_are_seconds():
    from featcache.config import HeadsConfig, format_duration, parse_duration

    assert [parse_duration(t) for t in ("90s", "30m", "1h", "1h30m", "2h5m10s", "45")] == \
        [90, 1800, 3600, 5400, 7510, 45]
    assert parse_duration(None) is None and HeadsConfig("f.h5", budget="30m").budget == 1800
    assert format_duration(5400) == "1h30m" and format_duration(90) == "1m30s"


# ---------------------------------------------------------------------------- recommended cut

def _with_cut():
    from featcache.backbones.registry import BACKBONES

    return sorted(n for n, s in BACKBONES.items() if s.cut)


def test_mobilenet_v2_recommends_the_measured_cut():
    from featcache.backbones.registry import get_backbone
    from featcache.config import ExtractConfig

    assert get_backbone("mobilenet_v2").cut == "block_13"
    assert {"resnet50", "efficientnet_b0"} <= set(_with_cut())
    cfg = ExtractConfig(cut="recommended", runtime="tensorflow").resolved()
    assert cfg.cut == "block_13" and cfg.output_path.name.endswith("_cut-block_13.h5")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", _with_cut())
def test_the_default_cut_is_stored_exactly_where_its_activations_are_small(backbone):
    """The recommended cut is one of the backbone's cut points (describe_cuts has its row),
    and ``cut_by_default`` is the rule, not a list: flagged iff that cut's float16
    activations are at most DEFAULT_CUT_MAX_RATIO x the pooled float32 features."""
    from featcache.backbones.cut import describe_cuts
    from featcache.backbones.registry import DEFAULT_CUT_MAX_RATIO, get_backbone

    spec = get_backbone(backbone)
    info, = describe_cuts(backbone, spec.default_size, images=1, flip=False, only=spec.cut)
    ratio = info.cache_bytes / (4 * spec.dim)
    assert spec.cut_by_default == (ratio <= DEFAULT_CUT_MAX_RATIO), (backbone, ratio)


def test_the_default_cut_resolves_per_backbone_and_engine():
    from featcache.config import ExtractConfig

    def cut(**kw):
        return ExtractConfig(runtime="tensorflow", **kw).resolved().cut

    assert cut() == "block_13"                           # mobilenet_v2: stored by default
    assert cut(cut="none") is None and cut(cut=None) is None
    assert cut(backbone="resnet50") is None              # 25x the pooled features: opt-in
    assert cut(backbone="resnet50", cut="recommended") == "conv5_block1"
    assert cut(backbone="mobilenet_025") is None         # no cut points at all, no error
    assert cut(engine="ray") is None                     # shards carry no activations yet
    assert ExtractConfig(cut="none", precision="float32").stem + "_cut-block_13" == \
        ExtractConfig(precision="float32").stem


def test_a_backbone_without_cut_points_has_no_recommended_cut(capsys):
    from featcache.cli.main import main

    assert main(["path", "--backbone", "mobilenet", "--cut", "recommended"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mobilenet has no recommended cut" in err


# ---------------------------------------------------------------------------- the flow

@pytest.fixture(scope="module")
def cut_file(tmp_path_factory, calibrated_weights):
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    cfg = ExtractConfig(dataset="synthetic", backbone="mobilenet_v2", size=32, batch=32,
                        weights=calibrated_weights("mobilenet_v2"), flip=True,
                        cut="block_15", runtime="tensorflow",
                        out_dir=str(tmp_path_factory.mktemp("flow")))
    return extract_features(cfg).path


def test_a_file_without_a_cut_is_one_line_naming_the_fix(synthetic_features, capsys):
    from featcache.cli.main import main

    assert main(["finetune", str(synthetic_features)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "made without --cut" in err and "make finetune" in err
    assert "featcache features --cut recommended" in err   # mobilenet_025: none of its own


def test_finetune_command_puts_frozen_and_finetune_rows_in_one_report(cut_file, tmp_path,
                                                                      capsys):
    import keras
    import numpy as np

    from featcache.cli.main import main
    from featcache.data.datasets import Synthetic

    report = tmp_path / "report"
    budget = 20
    assert main(["finetune", str(cut_file), "-q", "--heads", "logreg", "--cv-below", "0",
                 "--budget", f"{budget}s", "--out-dir", str(report)]) == 0
    out = capsys.readouterr().out
    results = json.loads((report / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == ["logreg", "logreg+flip", "finetune+flip"]
    assert results["config"]["workers"] == 0                   # no WORKERS=0 needed
    pairs = {frozenset((p["a"], p["b"])) for p in results["mcnemar"]}
    assert frozenset(("finetune+flip", "logreg+flip")) in pairs   # one comparison
    assert "| finetune+flip" in out and "| logreg+flip" in out    # one table
    row = results["rows"][2]
    b = row["budget"]
    assert b["budget_s"] == budget and 0 <= b["epochs_planned"] <= MAX_PLANNED_EPOCHS
    assert b["rows_per_s"] > 0 and b["epochs_run"] <= max(1, b["epochs_planned"])
    assert b["fit_s"] <= budget + 3          # within the budget, give or take a step
    assert "time budget 20s per fit" in (report / "report.md").read_text()
    assert "phase-2 epochs planned" in out

    model_path = tmp_path / "best.keras"
    assert main(["export", str(cut_file), "--report-dir", str(report),
                 "--output", str(model_path)]) == 0
    model = keras.models.load_model(model_path)
    images, _ = next(Synthetic().batches("test", 0, 4, 4))
    probs = np.asarray(model(images.astype(np.float32)))
    assert probs.shape == (4, len(results["classes"]))
    assert np.allclose(probs.sum(1), 1, atol=1e-4)



def test_a_planned_cosine_runs_to_its_end_whatever_the_patience(cut_file):
    """Under a budget the cosine is planned over phase 2's epochs, and every planned epoch
    runs (patience 0 would stop an unplanned phase after its first epoch); the best epoch is
    kept. Without a budget patience still stops it."""
    import h5py

    from featcache.compare.protocol import stratified_split
    from featcache.heads.finetune.data import ActRows
    from featcache.heads.finetune.head import FinetuneHead

    with h5py.File(cut_file, "r") as f:
        y = f["train/labels"][:]
    fit, val = stratified_split(y, 0.2, 0)

    def rows(r, flip=False):
        return ActRows(str(cut_file), "train", r, flip)

    def phase2(**kw):
        head = FinetuneHead(trainable_blocks=1, warmup_epochs=1, patience=0, epochs=3, **kw)
        head.fit(rows(fit), y[fit], rows(fit, True), (rows(val), y[val], rows(val, True)))
        return head, [h for h in head.history_ if h["phase"] == 2]

    head, runs = phase2(budget_s=600)
    planned = head.budget_["epochs_planned"]
    assert planned >= 2 and len(runs) == planned, (planned, len(runs))
    assert 0 <= head.best_epochs_ <= planned          # the best epoch kept (0: phase 1's)
    _, unplanned = phase2()
    assert len(unplanned) == 1


@pytest.mark.slow
def test_finetune_on_a_small_image_folder_lands_beside_the_frozen_rows(tmp_path,
                                                                      calibrated_weights):
    """An own folder of a few images per class (what transfer learning is for): stage one
    stores the cut, ``featcache finetune FILE`` selects every row by k-fold on it and
    puts the fine-tuned row in the same report as the frozen ones."""
    from image_folders import make_image_folder

    from featcache.cli.main import main
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    photos = make_image_folder(tmp_path / "my photos", copies=2, corrupt=False)
    feats = extract_features(ExtractConfig(
        dataset=str(photos), backbone="mobilenet_v2", size=32, batch=16, flip=True,
        weights=calibrated_weights("mobilenet_v2"), cut="block_15", runtime="tensorflow",
        out_dir=str(tmp_path / "features"))).path
    report = tmp_path / "report"
    assert main(["finetune", str(feats), "-q", "--heads", "logreg", "--cv-repeats", "1",
                 "--budget", "3s", "--out-dir", str(report)]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["protocol"]["plan"]["kind"] != "holdout"      # small: k-fold selection
    assert results["protocol"]["plan"]["folds"] > 1
    names = [r["name"] for r in results["rows"]]
    assert names == ["logreg", "logreg+flip", "finetune+flip"]
    assert results["classes"] == ["bird", "cat", "dog"]
    row = results["rows"][2]
    assert row["budget"]["budget_s"] == 3 and 0 <= row["test_accuracy"] <= 1
    assert "| finetune+flip" in (report / "report.md").read_text()
