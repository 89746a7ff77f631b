"""Image-folder datasets (featcache.data.folders): layout, decoding, skipping, fingerprint,
stage one.

All offline on a small generated folder: varied sizes, JPEG/PNG/BMP/GIF, gray/RGBA/palette,
an animated GIF, images nested in sub-folders of a class, one corrupt file, ignored files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from image_folders import CLASSES, KINDS, make_image_folder, picture, write_image
from PIL import Image

from featcache.data.folders import FolderDataset
from featcache.data.imagefiles import decode_image
from featcache.errors import ConfigError, DataError, StaleCacheError


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "pets")


# ---------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("name,size,mode,fmt", KINDS)
def test_decode_every_kind_to_rgb(tmp_path, name, size, mode, fmt):
    path = tmp_path / Path(name).name
    write_image(path, "cat", size, mode, fmt, seed=1)
    rgb = decode_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (size[1], size[0], 3)
    with Image.open(path) as im:
        im.seek(0)
        want = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(rgb, want)
    if mode == "L":
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert decode_image(path.read_bytes()).tobytes() == rgb.tobytes()


def test_decode_palette_bmp_gives_colours_not_indices(tmp_path):
    # TensorFlow's BMP decoder returns palette indices as gray here; ours must not.
    path = tmp_path / "p.bmp"
    write_image(path, "dog", (16, 16), "P", "BMP", seed=3)
    rgb = decode_image(path).astype(int)
    assert rgb[..., 2].mean() > rgb[..., 0].mean() + 50  # the dog colour is blue


def test_decode_gif_takes_the_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    write_image(path, "bird", (20, 20), "P", "GIF", seed=4)
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 2
        first = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(decode_image(path), first)


def test_decode_16bit_png_is_scaled(tmp_path):
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    rgb = decode_image(path)
    assert rgb.shape == (8, 8, 3)
    np.testing.assert_array_equal(rgb[..., 0], (arr >> 8).astype(np.uint8))


def test_decode_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="bad.png cannot be decoded"):
        decode_image(bad)
    with pytest.raises(DataError, match="does not exist"):
        decode_image(tmp_path / "missing.jpg")


# ---------------------------------------------------------------------------- layout

def test_split_layout_classes_counts_and_order(folder):
    ds = FolderDataset(folder, image_size=32)
    assert ds.name == "pets" and ds.classes == list(CLASSES)
    assert ds.extra_attrs["folder_layout"] == "split"
    # 8 good images per class (+ a corrupt one in dog): round(8|9 * 0.2) = 2 test per class,
    # drawn before decoding, so dog loses one where broken.jpg was drawn
    assert ds.splits["train"] + ds.splits["test"] == 24
    dog_test = 2 - ("dog/broken.jpg" in {r for r, _ in ds.candidates["test"]})
    assert np.bincount(ds.labels("test"), minlength=3).tolist() == [2, 2, dog_test]
    assert np.bincount(ds.labels("train"), minlength=3).tolist() == [6, 6, 8 - dog_test]
    for split in ("train", "test"):
        files = ds.files(split)
        labels = ds.labels(split)
        assert [lab for _, lab in files] == labels.tolist()
        assert labels[:2].tolist() == [0, 1]  # round-robin: prefixes are balanced
        for rel, lab in files:
            assert rel.split("/")[0] == CLASSES[lab]  # nested images belong to their class
    every = {rel for s in ("train", "test") for rel, _ in ds.files(s)}
    assert "cat/indoor/deeper/d0.bmp" in every and "cat/f0.PNG" in every
    assert not any("hidden" in r or ".thumbs" in r or r.endswith(".txt") for r in every)
    assert not set(r for r, _ in ds.files("train")) & set(r for r, _ in ds.files("test"))


def test_split_is_seeded_and_deterministic(folder):
    a = FolderDataset(folder, image_size=32, seed=0)
    b = FolderDataset(folder, image_size=32, seed=0)
    c = FolderDataset(folder, image_size=32, seed=1)
    assert a.files("test") == b.files("test")
    assert a.fingerprint() == b.fingerprint()
    assert a.files("test") != c.files("test")
    assert a.fingerprint() != c.fingerprint()
    half = FolderDataset(folder, image_size=32, test_fraction=0.5)
    assert np.bincount(half.labels("test"), minlength=3)[:2].tolist() == [4, 4]


def test_train_test_layout(tmp_path):
    root = make_image_folder(tmp_path / "tt", split_dirs=True)
    ds = FolderDataset(root, image_size=32)
    assert ds.extra_attrs["folder_layout"] == "train/test"
    assert ds.classes == list(CLASSES)
    assert ds.splits == {"train": 24, "test": 24}  # broken.jpg (in train/) is skipped
    assert all(r.startswith("test/") for r, _ in ds.files("test"))


def test_limit_keeps_classes_balanced(folder):
    ds = FolderDataset(folder, image_size=32, limit=6)
    assert ds.splits["train"] <= 6 and ds.splits["test"] <= 6
    assert ds.splits["train"] + ds.splits["test"] >= 11  # at most the one corrupt file lost
    assert np.bincount(ds.labels("train"), minlength=3)[:2].tolist() == [2, 2]


def test_corrupt_file_is_skipped_counted_listed_and_warned(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="featcache.data.folders"):
        ds = FolderDataset(folder, image_size=32)
    assert ds.extra_attrs["skipped_count"] == 1
    assert len(ds.extra_attrs["skipped_files"]) == 1
    assert ds.extra_attrs["skipped_files"][0].startswith("dog/broken.jpg: ")
    assert "dog/broken.jpg" in caplog.text and "skipped 1 file" in caplog.text
    assert not any("broken" in r for s in ds.splits for r, _ in ds.files(s))


@pytest.mark.parametrize("build,match", [
    (lambda r: None, "is empty"),
    (lambda r: picture("cat", (8, 8), 0).save(r / "loose.png"), "no class sub-folders"),
    (lambda r: ((r / "cat").mkdir(), write_image(r / "cat" / "x.png", "cat", (8, 8), "RGB",
                                                 "PNG", 0), (r / "dog").mkdir()),
     "empty class: .*dog holds no images"),
    (lambda r: ((r / "cat").mkdir(), (r / "cat" / "x.png").write_bytes(b"junk"),
                [write_image(r / "dog" / f"{i}.png", "dog", (8, 8), "RGB", "PNG", i)
                 for i in range(3)]),
     "no image of class cat"),
    (lambda r: ((r / "train" / "cat").mkdir(parents=True), (r / "test").mkdir(),
                write_image(r / "train" / "cat" / "x.png", "cat", (8, 8), "RGB", "PNG", 0)),
     "test has no class sub-folders"),
])
def test_bad_folders_are_clear_errors(tmp_path, build, match):
    root = tmp_path / "bad"
    root.mkdir()
    build(root)
    with pytest.raises(DataError, match=match):
        FolderDataset(root, image_size=32)


def test_missing_folder_and_bad_fraction(tmp_path, folder):
    with pytest.raises(DataError, match="does not exist"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(ConfigError, match="test-fraction"):
        FolderDataset(folder, test_fraction=1.0)


# ---------------------------------------------------------------------------- fingerprint

def test_fingerprint_tracks_adds_removes_and_edits(folder):
    def fp():
        return FolderDataset(folder, image_size=32).fingerprint()

    base = fp()
    assert fp() == base
    extra = folder / "bird" / "new.png"
    write_image(extra, "bird", (10, 10), "RGB", "PNG", 99)
    added = fp()
    assert added != base
    extra.unlink()
    assert fp() == base
    target = folder / "cat" / "a0.jpg"
    original = target.read_bytes()
    write_image(target, "dog", (40, 30), "RGB", "JPEG", 5)
    assert fp() != base
    target.write_bytes(original)
    os.utime(target, (1, 1))  # restored bytes (even with another mtime): the same data
    assert fp() == base
    broken = folder / "dog" / "broken.jpg"
    broken.write_bytes(b"still broken, differently")
    assert fp() != base  # skipped files count too


# ---------------------------------------------------------------------------- streaming

def test_batches_stream_resized_float32(folder):
    import tensorflow as tf

    ds = FolderDataset(folder, image_size=24)
    got = list(ds.batches("train", 3, 14, batch_size=4))
    assert [len(y) for _, y in got] == [4, 4, 3]
    images = np.concatenate([x for x, _ in got])
    assert images.dtype == np.float32 and images.shape == (11, 24, 24, 3)
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), ds.labels("train")[3:14])
    rel = ds.files("train")[5][0]
    want = tf.image.resize(decode_image(folder / rel).astype(np.float32), (24, 24),
                           method="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(images[2], want, atol=1e-4)
    assert images.min() >= 0 and images.max() <= 255


def test_file_broken_after_opening_is_a_clear_error(folder):
    ds = FolderDataset(folder, image_size=16)
    rel = ds.files("test")[0][0]
    (folder / rel).write_bytes(b"gone bad")
    with pytest.raises(DataError, match="changed while it was read"):
        list(ds.batches("test", 0, ds.splits["test"], 8))


# ---------------------------------------------------------------------------- stage one

def _name(folder) -> str:
    """``pets_mobilenet_025_32_random[_ov[_bf16]].h5``: the default runtime's name."""
    from featcache.config import ExtractConfig

    return ExtractConfig(dataset=str(folder), backbone="mobilenet_025", weights="none",
                         size=32).output_path.name


def _extract(folder, out, **kw):
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    cfg = ExtractConfig(dataset=str(folder), backbone="mobilenet_025", weights="none", size=32,
                        batch=8, out_dir=str(out), **kw)
    return extract_features(cfg)


def test_extract_folder_end_to_end_and_staleness(folder, tmp_path):
    from featcache.cache.reader import load_features

    res = _extract(folder, tmp_path / "out")
    assert res.path.name == _name(folder) and not res.cached
    fs = load_features(res.path)
    assert fs.classes == list(CLASSES)
    ds = FolderDataset(folder, image_size=32)
    assert len(fs["train"]) == ds.splits["train"] and len(fs["test"]) == ds.splits["test"]
    assert ds.splits["train"] + ds.splits["test"] == 24
    np.testing.assert_array_equal(fs["test"].labels, ds.labels("test"))
    for split in ("train", "test"):  # each row's id is its image's path under the folder
        ids = fs[split].ids
        assert ids.dtype == object and all(isinstance(i, str) for i in ids)
        assert list(ids) == [rel for rel, _ in ds.files(split)]
        assert all((folder / rel).is_file() for rel in ids)
        assert [CLASSES.index(Path(i).parts[0]) for i in ids] == fs[split].labels.tolist()
        # and the content hash of each row's file as it was read (what mistakes.png checks)
        assert list(fs[split].sha256) == [hashlib.sha256((folder / rel).read_bytes())
                                          .hexdigest() for rel in ids]
    assert "dog/broken.jpg" not in set(fs["train"].ids) | set(fs["test"].ids)
    assert fs.attrs["skipped_count"] == 1
    assert list(fs.attrs["skipped_files"])[0].startswith("dog/broken.jpg")
    assert fs.attrs["source_dir"] == str(folder.resolve())
    assert fs.attrs["dataset_sha256"] == ds.fingerprint()
    assert np.isfinite(fs["train"].features).all() and fs["train"].features.dtype == np.float32

    assert _extract(folder, tmp_path / "out").cached  # unchanged folder: a no-op
    write_image(folder / "cat" / "z.png", "cat", (12, 12), "RGB", "PNG", 7)
    with pytest.raises(StaleCacheError, match="dataset_sha256"):
        _extract(folder, tmp_path / "out")  # changed folder: refused, never reused
    rebuilt = _extract(folder, tmp_path / "out", force=True)
    assert not rebuilt.cached
    assert load_features(rebuilt.path).attrs["dataset_sha256"] != fs.attrs["dataset_sha256"]


def test_cli_features_on_a_folder(folder, tmp_path, capsys):
    from featcache.cli.main import main

    rc = main(["features", "-q", "--dataset", str(folder), "--backbone", "mobilenet_025",
               "--weights", "none", "--size", "32", "--batch", "16",
               "--out-dir", str(tmp_path / "o")])
    assert rc == 0
    assert _name(folder) in capsys.readouterr().out
    rc = main(["features", "-q", "--dataset", str(tmp_path / "o"), "--backbone",
               "mobilenet_025", "--weights", "none", "--size", "32",
               "--out-dir", str(tmp_path / "o2")])
    assert rc != 0
    assert "featcache: error:" in capsys.readouterr().err


def test_features_inside_the_folder_never_read_their_own_output(folder, monkeypatch, caplog,
                                                               capsys):
    """``featcache features --dataset .`` run inside the image folder writes ./features/
    there: stage one used to read it as a class ("empty class: features"), and a report
    folder's PNGs as images. Its --out-dir is skipped with an info line, any other folder
    of feature files or a report with a warning; the data set is the same as without them
    and the next run finds the file up to date."""
    from featcache.cli.main import main

    before = FolderDataset(folder, image_size=32)
    monkeypatch.chdir(folder)
    args = ["features", "--dataset", ".", "--backbone", "mobilenet_025", "--weights", "none",
            "--size", "32", "--batch", "16", "--no-flip"]
    with caplog.at_level(logging.INFO, logger="featcache"):
        assert main(args) == 0, capsys.readouterr().err
    assert "not reading features: it is where this run writes (--out-dir)" in caplog.text
    h5 = sorted((folder / "features").glob("*.h5"))
    assert len(h5) == 1
    # a report beside it (PNGs included) and a report written elsewhere in the folder
    report = h5[0].with_suffix("")
    for d in (report, folder / "reports"):
        write_image(d / "accuracy.png", "cat", (20, 20), "RGB", "PNG", 1)
        (d / "results.json").write_text("{}")
    (folder / "features" / "x.h5.lock").write_text("")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="featcache"):
        assert main(args) == 0, capsys.readouterr().err
    assert "up to date" in capsys.readouterr().out + caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not reading reports: it is a featcache report folder (results.json)" in w
               for w in warned), warned
    after = FolderDataset(folder, image_size=32)   # no exclude: the markers suffice
    assert after.classes == list(CLASSES) and after.fingerprint() == before.fingerprint()
    assert main([*args[:-1], "--flip"]) == 0        # another file into the same features/
    assert len(list((folder / "features").glob("*.h5"))) == 2


# ---------------------------------------------------------------------------- large images

BIG = (1200, 900)   # "large" here: the tests lower the limits through the settings


def _big(path: Path, fmt: str) -> Path:
    write_image(path, "cat", BIG, "RGB", fmt, seed=5)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_image_is_decoded_reduced_to_a_few_times_the_input_size(tmp_path, fmt):
    """Above --reduce-pixels an image is decoded reduced (JPEG: Pillow's draft mode, PNG:
    Image.reduce) by a whole factor that keeps its shorter side >= REDUCE_TO x the input
    size; resized to that size it is the full decode's image to a few grey levels."""
    from featcache.data.imagefiles import REDUCE_TO, decode_scaled
    from featcache.data.resize import resize_images

    path = _big(tmp_path / f"big.{fmt.lower()}", fmt)
    full, was = decode_scaled(path, size=32, reduce_pixels=10 ** 7)   # under the limit
    assert not was and full.shape == (BIG[1], BIG[0], 3)
    np.testing.assert_array_equal(full, decode_image(path))
    small, was = decode_scaled(path, size=32, reduce_pixels=100_000)
    assert was and REDUCE_TO * 32 <= min(small.shape[:2]) < min(full.shape[:2]) // 2
    a = np.asarray(resize_images(full.astype(np.float32), 32))
    b = np.asarray(resize_images(small.astype(np.float32), 32))
    assert np.abs(a - b).mean() < 3.0, np.abs(a - b).mean()


def test_pillows_own_size_warning_is_never_shown(tmp_path, monkeypatch):
    """Pillow warns above Image.MAX_IMAGE_PIXELS (twice: once when the folder is checked,
    once when it is read) and refuses twice that; featcache's size policy decides instead:
    no warning, and Pillow's refusal is an ImageTooLarge naming the file."""
    import warnings

    from PIL import Image

    from featcache.data.imagefiles import ImageTooLarge

    path = _big(tmp_path / "big.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BIG[0] * BIG[1] * 2 // 3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert decode_image(path, size=32, reduce_pixels=100_000).shape[0] < BIG[1]
        assert decode_image(path).shape == (BIG[1], BIG[0], 3)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BIG[0] * BIG[1] // 3)
    with pytest.raises(ImageTooLarge, match="big.png is too large for Pillow to open"):
        decode_image(path)


def test_an_image_above_max_pixels_is_skipped_and_listed(tmp_path, caplog):
    """Above --max-pixels an image is skipped before it is decoded: one warning, listed in
    skipped_files; an image the policy changes (skipped or reduced) is marked in the
    fingerprint, so another policy makes the feature file stale, while a folder without
    such images keeps the fingerprint it had before the policy existed."""
    root = _simple_folder(tmp_path / "f", per_class=4)
    plain = FolderDataset(root, image_size=32).fingerprint()
    assert FolderDataset(root, image_size=32, reduce_pixels=100_000,
                         max_pixels=500_000).fingerprint() == plain
    _big(root / "cat" / "huge.png", "PNG")
    with caplog.at_level(logging.WARNING, logger="featcache"):
        ds = FolderDataset(root, image_size=32, reduce_pixels=100_000, max_pixels=500_000)
    assert ds.extra_attrs["skipped_count"] == 1
    listed = ds.extra_attrs["skipped_files"][0]
    assert listed.startswith("cat/huge.png: is too large (1200x900 = 1,080,000 pixels, more "
                             "than --max-pixels 500,000); raise --max-pixels"), listed
    warned = [r.getMessage() for r in caplog.records if "huge.png" in r.getMessage()]
    assert len(warned) == 1 and "too large" in warned[0], warned
    assert "cat/huge.png" not in {rel for s in ds.splits for rel, _ in ds.files(s)}
    read = FolderDataset(root, image_size=32, reduce_pixels=100_000, max_pixels=2_000_000)
    assert "cat/huge.png" in {rel for s in read.splits for rel, _ in read.files(s)}
    full = FolderDataset(root, image_size=32)
    assert len({ds.fingerprint(), read.fingerprint(), full.fingerprint()}) == 3


def test_stage_one_applies_the_size_policy_from_its_settings(tmp_path, caplog, monkeypatch):
    """Through the CLI: --max-pixels skips the large image (one warning, never Pillow's,
    even above Pillow's own limit), --reduce-pixels reads it reduced (also in the tf.data
    pipeline) as a row of the feature file."""
    import warnings

    from PIL import Image

    from featcache.cache.reader import load_features
    from featcache.cli.main import main

    root = _simple_folder(tmp_path / "f", per_class=4)
    _big(root / "cat" / "huge.jpg", "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BIG[0] * BIG[1] * 2 // 3)
    args = ["features", "-q", "--dataset", str(root), "--backbone", "mobilenet_025",
            "--weights", "none", "--size", "32", "--batch", "8", "--no-flip"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING, logger="featcache"):
            assert main([*args, "--max-pixels", "500000", "--out-dir", str(tmp_path / "a")]) == 0
        said = [r.getMessage() for r in caplog.records if "huge.jpg" in r.getMessage()]
        assert len(said) == 1 and "too large" in said[0], said
        assert main([*args, "--reduce-pixels", "100000", "--out-dir", str(tmp_path / "b")]) == 0
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    skipped = load_features(next((tmp_path / "a").glob("*.h5")))
    assert list(skipped.attrs["skipped_files"])[0].startswith("cat/huge.jpg: is too large")
    read = load_features(next((tmp_path / "b").glob("*.h5")))
    assert read.attrs["skipped_count"] == 0
    ids = set(read["train"].ids) | set(read["test"].ids)
    assert "cat/huge.jpg" in ids and len(ids) == len(set(skipped["train"].ids)
                                                     | set(skipped["test"].ids)) + 1
    assert read.attrs["dataset_sha256"] != skipped.attrs["dataset_sha256"]


# ---------------------------------------------------------------------------- hostile trees

def _simple_folder(root: Path, per_class: int = 4, classes=("cat", "dog")) -> Path:
    for ci, cls in enumerate(classes):
        for i in range(per_class):
            write_image(root / cls / f"{i}.png", cls if cls in CLASSES else "cat", (16, 16),
                        "RGB", "PNG", seed=10 * ci + i)
    return root


def _all_files(ds):
    return sorted(r for split in ("train", "test") for r, _ in ds.files(split))


def test_a_link_into_another_class_is_not_read_under_a_second_label(tmp_path, caplog):
    root = _simple_folder(tmp_path / "pets")
    os.symlink(root / "dog", root / "cat" / "dogs_too")              # into another class
    os.symlink(root / "dog" / "0.png", root / "cat" / "a_dog.png")   # a file of another class
    os.symlink("..", root / "dog" / "up")                            # back up the tree
    with caplog.at_level(logging.WARNING, logger="featcache.data.imagefiles"):
        ds = FolderDataset(root, image_size=32)
    files = _all_files(ds)
    assert len(files) == 8 and not any("dogs_too" in f or "a_dog" in f or "up/" in f
                                       for f in files)
    text = caplog.text
    assert "leads into another class" in text and "contains the class folder itself" in text


def test_a_link_to_an_outside_folder_is_read_once(tmp_path, caplog):
    root = _simple_folder(tmp_path / "pets")
    extra = _simple_folder(tmp_path / "extra", per_class=3, classes=("more",))
    os.symlink(extra / "more", root / "cat" / "more")
    os.symlink(extra / "more", root / "dog" / "more")                # the same folder again
    with caplog.at_level(logging.WARNING, logger="featcache.data.imagefiles"):
        ds = FolderDataset(root, image_size=32)
    files = _all_files(ds)
    assert sum("cat/more/" in f for f in files) == 3
    assert sum("dog/more/" in f for f in files) == 0 and "already read" in caplog.text


def test_a_link_from_train_into_test_is_refused(tmp_path, caplog):
    root = tmp_path / "tt"
    _simple_folder(root / "train")
    _simple_folder(root / "test", per_class=2)
    os.symlink(root / "test" / "cat", root / "train" / "cat" / "from_test")
    with caplog.at_level(logging.WARNING, logger="featcache.data.imagefiles"):
        ds = FolderDataset(root, image_size=32)
    assert ds.splits == {"train": 8, "test": 4} and "another class" in caplog.text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_named_like_an_image_is_skipped_not_read(tmp_path, caplog):
    import signal

    root = _simple_folder(tmp_path / "pets")
    os.mkfifo(root / "cat" / "pipe.png")
    signal.alarm(60)                      # reading the FIFO would block forever
    try:
        with caplog.at_level(logging.WARNING, logger="featcache.data.imagefiles"):
            ds = FolderDataset(root, image_size=32)
    finally:
        signal.alarm(0)
    assert len(_all_files(ds)) == 8 and "not a regular file" in caplog.text


@pytest.mark.parametrize("names,fix", [(("train", "val"), "rename val/ to test/"),
                                       (("train", "validation"), "rename validation/ to test/"),
                                       (("train",), "add test/<class>/")])
def test_train_without_test_is_refused_with_the_fix(tmp_path, names, fix):
    root = tmp_path / "layout"
    for n in names:
        _simple_folder(root / n)
    with pytest.raises(DataError) as e:
        FolderDataset(root, image_size=32)
    msg = str(e.value)
    assert "\n" not in msg and "has train/ but no test/" in msg and fix in msg


def test_16bit_pngs_are_scaled_by_bit_depth_not_by_their_values(tmp_path):
    dark = np.full((8, 8), 255, np.uint16)                 # 255 of 65,535: nearly black
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert decode_image(tmp_path / "dark.png").max() == 0
    one = dark.copy()
    one[0, 0] = 256                                        # one pixel more changes nothing
    Image.fromarray(one).save(tmp_path / "one.png")
    got = decode_image(tmp_path / "one.png")
    assert got[1:, 1:].max() == 0 and got[0, 0, 0] == 1
    bright = np.full((8, 8), 65535, np.uint16)
    Image.fromarray(bright).save(tmp_path / "bright.png")
    assert decode_image(tmp_path / "bright.png").min() == 255
