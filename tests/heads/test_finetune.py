"""Fine-tuning from the cache: cut points, activations at a cut in stage one
(storage, resume), the top rebuilt from a cut, the ``finetune`` head through stage two,
streaming, and its export.

The backbone is MobileNetV2 with random weights whose BatchNorm statistics are calibrated on
a few synthetic images (Keras' random init makes its activations vanish, ~1e-10: float16
would store zeros), at 32 px, on the 160-image synthetic set.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cache import lock, reader
from featcache.config import ExtractConfig
from featcache.errors import ConfigError, Interrupted

SIZE = 32


def _images(n=16):
    from featcache.data.datasets import Synthetic

    images, _ = next(Synthetic().batches("train", 0, n, n))
    return images


@pytest.fixture(scope="module")
def weights(calibrated_weights):
    """A MobileNetV2 weight file: random, BatchNorm statistics set to the data's."""
    return calibrated_weights("mobilenet_v2")


def _cfg(tmp_path, weights, **kw):
    base = dict(dataset="synthetic", backbone="mobilenet_v2", weights=weights, size=SIZE,
                batch=32, flip=True, cut="block_15", runtime="tensorflow",
                out_dir=str(tmp_path))
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def cut_file(tmp_path_factory, weights):
    from featcache.extract.run import extract_features

    return extract_features(_cfg(tmp_path_factory.mktemp("cut"), weights)).path


# ---------------------------------------------------------------------------- cut points

def test_cut_points_are_block_ends_a_single_tensor_crosses():
    from featcache.backbones.cut import cut_points
    from featcache.backbones.registry import build_backbone, get_backbone

    points = {p.name: p.layer for p in cut_points(
        build_backbone(get_backbone("mobilenet_v2"), weights="none"))}
    assert points["block_13"] == "block_13_project_BN"   # stride 2: no residual add
    assert points["block_14"] == "block_14_add"
    assert points["block_16"] == "block_16_project_BN"
    assert list(points) == [f"block_{i}" for i in range(1, 17)]


def test_cuts_command_lists_shape_cache_size_and_flops(capsys):
    from featcache.cli.main import main

    assert main(["cuts", "mobilenet_v2"]) == 0
    out = capsys.readouterr().out
    assert "| block_16 | block_16_project_BN | 7x7x320 | 3.50 GiB | 40.1 |" in out
    assert "| block_13 | block_13_project_BN | 7x7x160 | 1.75 GiB |" in out
    rows = [l for l in out.splitlines() if l.startswith("| block_")]
    flops = [float(r.split("|")[5]) for r in rows]
    assert flops == sorted(flops, reverse=True) and len(rows) == 16


@pytest.mark.parametrize("argv, want", [
    (["cuts", "mobilenet"], "mobilenet has no cut points"),
    (["features", "-q", "--dataset", "synthetic", "--backbone", "mobilenet_v2", "--weights", "none",
      "--size", "32", "--cut", "block_99", "--out-dir", "{tmp}"],
     "unknown cut 'block_99' for mobilenet_v2; choose one of: block_1, block_2"),
    (["path", "--cut", "../x"], "--cut takes a block name"),
    (["path", "--cut", "block_16", "--shard", "0/2"], "--cut does not work with --shard"),
])
def test_bad_cut_is_one_line_error(argv, want, tmp_path, capsys):
    from featcache.cli.main import main

    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and want in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("*.h5*"))


def test_cut_is_in_the_file_name_and_cache_key(weights, tmp_path):
    plain = _cfg(tmp_path, weights, cut=None)
    cut = _cfg(tmp_path, weights)
    assert cut.output_path.name == "synthetic_mobilenet_v2_32_mobilenet_v2_calibrated.weights" \
                                   "_flip_cut-block_15.h5"
    assert plain.output_path != cut.output_path
    key = dict(dataset_sha256="d", weights_sha256="w", runtime_version="v")
    assert cut.cache_key(**key)["cut"] == "block_15" and "cut" not in plain.cache_key(**key)


# ---------------------------------------------------------------------------- storage

def test_activations_are_stored_as_the_backbone_computes_them(cut_file, weights):
    import keras

    from featcache.backbones.cut import bottom_model
    from featcache.backbones.registry import build_backbone, get_backbone

    with h5py.File(cut_file, "r") as f:
        assert f.attrs["cut"] == "block_15" and f.attrs["cut_layer"] == "block_15_add"
        assert list(f.attrs["cut_shape"]) == [1, 1, 160]
        acts, acts_flip = f["train/acts"][:16], f["train/acts_flip"][:16]
        assert acts.dtype == np.float16 and f["train/acts"].shape == (120, 1, 1, 160)
        feats = f["train/features"][:16]
    model = build_backbone(get_backbone("mobilenet_v2"), weights=weights)
    x = keras.applications.mobilenet_v2.preprocess_input(_images().astype(np.float32))
    ref_feats, ref = (np.asarray(t) for t in bottom_model(model, "block_15")(x, training=False))
    assert np.abs(ref).max() > 0.1                       # calibrated: not vanishing
    np.testing.assert_allclose(acts.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-3, atol=1e-3)
    _, ref_flip = bottom_model(model, "block_15")(x[:, :, ::-1], training=False)
    np.testing.assert_allclose(acts_flip.astype(np.float32), np.asarray(ref_flip), rtol=2e-3,
                               atol=2e-3)


def test_interrupted_cut_extraction_resumes_bit_identically(cut_file, weights, tmp_path):
    from featcache.extract.run import extract_features

    cfg = _cfg(tmp_path, weights)
    with pytest.raises(Interrupted, match="run the same command again to resume"):
        extract_features(cfg, stop_after=64)
    partial = lock.partial_path(cfg.output_path)
    assert reader.read_attrs(partial)["rows_done"] == [64, 0]
    r = extract_features(dataclasses.replace(cfg, batch=50))  # the file's batch size is used
    assert r.images == 96
    with h5py.File(cut_file, "r") as a, h5py.File(r.path, "r") as b:
        for split in ("train", "test"):
            for key in ("acts", "acts_flip", "features", "features_flip", "labels"):
                np.testing.assert_array_equal(a[split][key][()], b[split][key][()])


# ---------------------------------------------------------------------------- the top

def test_top_rebuilt_from_the_cut_is_the_backbone_above_it(cut_file, weights):
    import keras

    from featcache.backbones.cut import bottom_model, top_model, top_units
    from featcache.backbones.registry import build_backbone, get_backbone
    from featcache.heads.finetune.model import build

    model = build_backbone(get_backbone("mobilenet_v2"), weights=weights)
    x = keras.applications.mobilenet_v2.preprocess_input(
        np.array(keras.layers.Resizing(64, 64)(_images(8).astype(np.float32))))
    full = np.asarray(model(x, training=False))
    _, acts = bottom_model(model, "block_13")(x, training=False)
    top = top_model(model, "block_13")
    np.testing.assert_allclose(np.asarray(top(acts, training=False)), full, rtol=1e-4,
                               atol=1e-5 * np.abs(full).max())
    assert [u[0].name.split("_")[1] for u in top_units(top)[:3]] == ["14", "15", "16"]
    # the head's own rebuild (weights from the file's provenance), before any training
    top2 = build(str(cut_file), 4, np.zeros(1280, np.float32), np.ones(1280, np.float32),
                 trainable_blocks=1, hidden=8, dropout=0.5, seed=0).top
    with h5py.File(cut_file, "r") as f:
        a, pooled = f["test/acts"][:8].astype(np.float32), f["test/features"][:8]
    np.testing.assert_allclose(np.asarray(top2(a, training=False)), pooled, rtol=1e-2,
                               atol=1e-2 * np.abs(pooled).max())  # a is float16-rounded
    trainable = {v.path.split("/")[0] for v in top2.trainable_weights}
    assert trainable == {"Conv_1"}  # one block above: Conv_1 (its BatchNorm frozen)


def test_too_many_trainable_blocks_is_an_error(cut_file):
    from featcache.heads.finetune.model import build

    with pytest.raises(ConfigError, match=r"has 2 blocks above it \(0\.\.2\)"):
        build(str(cut_file), 4, np.zeros(1280, np.float32), np.ones(1280, np.float32),
              trainable_blocks=3, hidden=8, dropout=0.5, seed=0)


# ---------------------------------------------------------------------------- streaming

def test_training_batches_stream_every_row_once_per_epoch(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.finetune_mem import write_activation_file
    from featcache.cache.activations import ActivationReader
    from featcache.heads.finetune.data import ActRows, train_batches

    p = write_activation_file(tmp_path / "a.h5", n_train=1000, n_test=10, shape=(1, 2, 4))
    rows = np.sort(np.random.default_rng(0).choice(1000, 700, replace=False))
    labels = np.full(1000, -1)
    labels[rows] = rows
    with ActivationReader(p) as r:
        plain, mirror = r.read("train", 0, 1000), r.read("train", 0, 1000, flip=True)
        seen, flipped = [], 0
        for x, y in train_batches(r, ActRows(str(p), "train", rows), labels, 64,
                                  np.random.default_rng(1), mirror=True, read_rows=128,
                                  buffer_blocks=2):
            assert x.dtype == np.float32 and len(x) <= 64
            is_plain = np.all(x == plain[y].astype(np.float32), axis=(1, 2, 3))
            is_mirror = np.all(x == mirror[y].astype(np.float32), axis=(1, 2, 3))
            assert np.all(is_plain | is_mirror)
            flipped += int(np.sum(is_mirror & ~is_plain))
            seen.extend(y.tolist())
    assert sorted(seen) == rows.tolist()
    assert 0.35 < flipped / len(rows) < 0.65
    assert seen[:50] != sorted(seen[:50])   # shuffled


def test_shift_maps_translates_each_map_with_edges_repeated():
    from featcache.heads.finetune.data import shift_maps

    x = np.random.default_rng(0).normal(size=(400, 5, 6, 3)).astype(np.float32)
    assert shift_maps(x, 0, np.random.default_rng(0)) is x
    out = shift_maps(x, 1, np.random.default_rng(1))
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    seen = set()
    for i in range(len(x)):
        hits = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)
                if np.array_equal(out[i], pad[i, 1 + a:6 + a, 1 + b:7 + b])]
        assert len(hits) == 1, i      # exactly one translation of its own map
        seen.add(hits[0])
    assert len(seen) == 9             # every (dy, dx) in [-1, 1]^2 drawn
    # a map moved by (+1, 0) repeats its last row: out[i] row 4 == x[i] row 4
    i = next(i for i in range(len(x)) if np.array_equal(out[i], pad[i, 2:7, 1:7]))
    assert np.array_equal(out[i][:4], x[i][1:]) and np.array_equal(out[i][4], x[i][4])
# ---------------------------------------------------------------------------- stage two

@pytest.mark.slow
def test_finetune_head_in_the_comparison_never_runs_the_bottom_and_exports(cut_file,
                                                                           tmp_path,
                                                                           monkeypatch):
    import keras

    import featcache.backbones.cut
    import featcache.extract.run
    from featcache.compare.comparison import compare_heads
    from featcache.config import HeadsConfig
    from featcache.data.datasets import Synthetic
    from featcache.heads import load_head
    from featcache.heads.finetune.data import ActRows
    from featcache.ship.export import export_model

    def no_bottom(*a, **k):
        raise AssertionError("stage two ran the backbone's bottom")

    monkeypatch.setattr(featcache.backbones.cut, "bottom_model", no_bottom)
    monkeypatch.setattr(featcache.extract.run, "step_graph", no_bottom)
    report = tmp_path / "report"
    res = compare_heads(HeadsConfig(str(cut_file), heads=("finetune",), workers=0,
                                    out_dir=str(report)))
    monkeypatch.undo()
    [row] = res["rows"]   # mirrors in the file: only the +flip row
    assert row["name"] == "finetune+flip" and row["head"] == "finetune"
    # a small data set: chosen by k-fold on file rows, one repeat (a dear head), then refit
    assert row["plan"] == "kfold" and res["protocol"]["plan"]["folds"] == 5
    assert row["refit"] and row["n_val"] * 2 == row["n_train"]   # every row validated once
    assert (report / "mistakes.png").is_file()   # drawn from the head's file rows
    assert row["test_accuracy"] > 0.35 and row["ci95"][0] <= row["test_accuracy"]  # chance: 0.25
    # the default trains every block above the cut (block_15: block_16 and Conv_1)
    assert row["params"]["trainable_blocks"] == 2
    assert row["params"]["epochs"] >= 0  # 0: phase 2 kept phase 1

    head = load_head(report / row["saved"])
    out = export_model(cut_file, head="finetune+flip", report_dir=report,
                       output=tmp_path / "m.keras")
    assert out.tta
    model = keras.models.load_model(tmp_path / "m.keras")
    images, _ = next(Synthetic().batches("test", 0, 8, 8))
    got = np.asarray(model(images.astype(np.float32)))
    want = head.predict_proba(ActRows(str(cut_file), "test", np.arange(8)),
                              ActRows(str(cut_file), "test", np.arange(8), True))
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert np.abs(got - want).max() < 2e-3        # activations are float16 in the file


@pytest.mark.slow
def test_openvino_cut_outputs_match_tensorflow(cut_file, weights, tmp_path):
    from featcache.extract.run import extract_features

    # float32 on both sides: `auto` picks bf16 on a CPU with AMX or AVX512-BF16
    r = extract_features(_cfg(tmp_path, weights, runtime="openvino", precision="float32",
                              limit=32))
    with h5py.File(cut_file, "r") as a, h5py.File(r.path, "r") as b:
        for key in ("acts", "acts_flip"):
            np.testing.assert_allclose(b["test"][key][()].astype(np.float32),
                                       a["test"][key][:32].astype(np.float32),
                                       rtol=5e-3, atol=5e-3)


def test_phase_two_cosine_schedule_falls_from_the_rate_to_zero():
    from featcache.heads.finetune.head import FinetuneHead, learning_rate

    assert learning_rate(1e-4) == 1e-4
    s = learning_rate(1e-4, 100)
    assert [round(float(s(t)) / 1e-4, 4) for t in (0, 50, 100)] == [1.0, 0.5, 0.0]
    with pytest.raises(ConfigError, match="schedule='linear'"):
        FinetuneHead(schedule="linear").fit(None, [0, 1])


@pytest.mark.slow
def test_finetune_study_reads_only_the_training_split(cut_file, monkeypatch, capsys):
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.studies import finetune as finetune_study
    from featcache.cache.activations import ActivationReader

    real_read = ActivationReader.read

    def read(self, split, *a, **k):
        assert split == "train", "the study read the test split"
        return real_read(self, split, *a, **k)

    monkeypatch.setattr(ActivationReader, "read", read)
    assert finetune_study.main([str(cut_file), json.dumps(
        {"warmup_epochs": 2, "epochs": 1, "hidden": 16, "time_budget_s": 0})]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    epochs, result = lines[:-1], lines[-1]
    assert [e["phase"] for e in epochs] == [1, 1, 2]
    assert all(0 <= e["val_accuracy"] <= 1 for e in epochs)
    assert result["best_val_accuracy"] == max(e["val_accuracy"] for e in epochs)
    assert result["trainable_blocks"] == 2 and result["fit_rows"] + result["val_rows"] == \
        len(h5py.File(cut_file, "r")["train/labels"])


def test_a_file_without_a_cut_is_a_one_line_error_naming_cut(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.finetune_mem import write_activation_file
    from featcache.cache.activations import ActivationReader

    p = write_activation_file(tmp_path / "a.h5", n_train=8, n_test=4, shape=(1, 1, 4))
    with h5py.File(p, "r+") as f:
        del f.attrs["cut"]             # a file made without --cut has no such attribute
    with pytest.raises(ConfigError) as e:
        ActivationReader(p)
    msg = str(e.value)
    assert "\n" not in msg and "no activations at a cut" in msg
    assert "--cut BLOCK" in msg and "CUT= for make heads" in msg
