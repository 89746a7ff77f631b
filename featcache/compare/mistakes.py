"""``mistakes.png``: the best row's most confident wrong test predictions, as an image grid.

Reads the feature file named in stage two's ``results`` (test labels and per-row ``ids``;
the test features too when it must predict), the best row's test probabilities as the
comparison computed them or else its saved head (``<report>/heads/<row>.joblib|.keras``),
and the images themselves through the ids: registry data sets (CIFAR-10,
synthetic) by index in the test split (from ``data_dir``: the comparison's ``--data-dir``,
as stage one's, default ``data``; where that lacks CIFAR-10,
:func:`featcache._util.paths.find_cifar10`), image folders by relative path under the
file's ``source_dir`` — only files still the ones stage one read (their sha256 against
the file's ``/test/sha256``; in a file without those, not modified since ``created_utc``): a
changed or missing file is left out of the figure with one warning that counts them, and
when none is left the figure is not drawn. Writes ``<report>/mistakes.png`` (atomically).
When the images or the head cannot be found it logs why and writes nothing: the report
never fails for it.
A head without ``predict_proba`` is ranked by test-row order and titled without a
probability.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from featcache._util.atomic import write_bytes
from featcache.errors import FeatcacheError

log = logging.getLogger(__name__)

N_SHOWN = 16


def confident_mistakes(y, pred, proba=None, n: int = N_SHOWN) -> np.ndarray:
    """Row indices of the ``n`` wrong predictions with the highest predicted probability
    (without probabilities: the first ``n`` wrong rows)."""
    wrong = np.flatnonzero(np.asarray(pred) != np.asarray(y))
    if proba is not None and len(wrong):
        conf = np.asarray(proba)[wrong].max(axis=1)
        wrong = wrong[np.argsort(-conf, kind="stable")]
    return wrong[:n]


#: seconds of clock slack when a file's mtime is compared with the feature file's creation
MTIME_SLACK_S = 2.0


def load_images(attrs: dict, split: str, ids, *, data_dir=None) -> list[np.ndarray]:
    """The images of ``ids`` (uint8 RGB) for a feature file with ``attrs`` (unchecked: see
    :func:`checked_images`)."""
    if "source_dir" in attrs:
        from featcache.data.imagefiles import decode_image

        root = Path(str(attrs["source_dir"]))
        return [decode_image(root / str(i)) for i in ids]
    from featcache._util import paths
    from featcache.data.datasets import open_dataset

    data_dir = data_dir or "data"
    ds = open_dataset(str(attrs["dataset"]), data_dir=paths.find_cifar10(data_dir) or data_dir,
                      download=False)
    out = []
    for i in ids:
        images, _ = next(iter(ds.batches(split, int(i), int(i) + 1, 1)))
        out.append(np.asarray(images[0]).astype(np.uint8))
    return out


def checked_images(attrs: dict, split: str, ids, sha256=None, *,
                   data_dir=None) -> tuple[list[np.ndarray | None], list[str]]:
    """The images of ``ids`` as :func:`load_images` reads them, but for an image folder
    only those still the files stage one read: each file's bytes are hashed and compared
    with the ``sha256`` the feature file stored for its row (a file written before those
    were stored: not modified after the feature file was created, ``created_utc``). Returns
    (an image, or None for a file changed or gone, per id; the ids left out, each with why)."""
    if "source_dir" not in attrs:   # a registry data set: found by index, fixed
        return load_images(attrs, split, ids, data_dir=data_dir), []
    from featcache.data.imagefiles import decode_image

    root = Path(str(attrs["source_dir"]))
    made = _created(attrs)
    images: list[np.ndarray | None] = []
    left_out: list[str] = []
    for k, rel in enumerate(str(i) for i in ids):
        path = root / rel
        why = None
        try:
            data = path.read_bytes()
            if sha256 is not None:
                if hashlib.sha256(data).hexdigest() != str(sha256[k]):
                    why = "changed"
            elif made is None:
                why = "cannot be checked: the feature file has neither hashes nor created_utc"
            elif path.stat().st_mtime > made + MTIME_SLACK_S:
                why = "modified after the feature file was made"
        except OSError:
            why = "gone"
        if why is None:
            try:
                images.append(decode_image(data, name=rel))
                continue
            except FeatcacheError:
                why = "cannot be decoded"
        images.append(None)
        left_out.append(f"{rel} ({why})")
    return images, left_out


def _created(attrs: dict) -> float | None:
    """When the feature file was created (``created_utc``), as a POSIX time; None if not
    recorded or not readable."""
    from datetime import datetime, timezone

    try:
        t = datetime.fromisoformat(str(attrs["created_utc"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _probabilities(head, X, Xf):
    if not hasattr(head, "predict_proba"):
        return None
    try:
        return np.asarray(head.predict_proba(X, X_flip=Xf) if Xf is not None
                          else head.predict_proba(X))
    except (AttributeError, NotImplementedError, TypeError):  # e.g. a hinge-loss head
        return None


def plot_grid(images, titles, path: Path, suptitle: str) -> None:
    from featcache.compare.plots import pyplot

    plt = pyplot()
    cols = min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, title in zip(axes.ravel(), images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=7)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def write_mistakes(results: dict, report_dir, *, n: int = N_SHOWN,
                   data_dir: str | os.PathLike | None = None,
                   predicted: tuple | None = None) -> Path | None:
    """Write ``<report_dir>/mistakes.png`` for ``results``' best row; its path, or None.
    ``predicted``: the best row's (test predictions, test probabilities) as the comparison
    computed them; without probabilities the saved head predicts again."""
    from featcache.cache.reader import file_identity, load_features
    from featcache.heads import HEADS, as_head, load_head

    report_dir = Path(report_dir)
    try:
        best = next(r for r in results["rows"] if r["name"] == results["best_row"])
        tta = bool(best.get("tta"))
        fs = load_features(results["feature_file"], ["test"], flip=tta)
        test = fs["test"]
        if predicted is not None and predicted[1] is not None:
            pred, proba = np.asarray(predicted[0]), np.asarray(predicted[1])
        else:
            head = as_head(load_head(report_dir / best["saved"],   # a plain sklearn head too
                                     fitted_on=file_identity(fs)))
            X, Xf = test.features, (test.features_flip if tta else None)
            if getattr(HEADS.get(best.get("head")), "file_rows", None):  # finetune
                from featcache.heads.finetune.data import file_test_rows

                X, Xf = file_test_rows(results["feature_file"], len(test.labels), tta)
            pred = np.asarray(head.predict(X, X_flip=Xf) if tta else head.predict(X))
            proba = _probabilities(head, X, Xf)
        rows = confident_mistakes(test.labels, pred, proba, n)
        if not len(rows):
            log.info("no wrong test predictions: no mistakes.png")
            return None
        images, left_out = checked_images(
            fs.attrs, "test", test.ids[rows],
            None if test.sha256 is None else test.sha256[rows],
            data_dir=data_dir or results.get("config", {}).get("data_dir"))
    except (FeatcacheError, OSError, KeyError, StopIteration, ValueError) as exc:
        log.warning("mistakes.png not written (%s)", str(exc).splitlines()[0] if str(exc)
                    else type(exc).__name__)
        return None
    source = fs.attrs.get("source_dir")
    if left_out and len(left_out) == len(rows):
        log.warning("mistakes.png not written: the images of all %d most confident mistakes "
                    "changed or are gone in %s since stage one read them (e.g. %s); re-run "
                    "stage one (--force) to draw it", len(rows), source, left_out[0])
        return None
    if left_out:
        log.warning("mistakes.png leaves out %d of the %d most confident mistakes: their images "
                    "changed or are gone in %s since stage one read them (%s%s)",
                    len(left_out), len(rows), source, ", ".join(left_out[:3]),
                    ", …" if len(left_out) > 3 else "")
        keep = [k for k, im in enumerate(images) if im is not None]
        rows, images = rows[keep], [images[k] for k in keep]
    def name(label) -> str:
        k = int(label)
        return fs.classes[k] if 0 <= k < len(fs.classes) else str(label)

    titles = []
    for r in rows:
        p = f" {100 * proba[r].max():.0f}%" if proba is not None else ""
        titles.append(f"true {name(test.labels[r])}\npred {name(pred[r])}{p}\n"
                      f"id {str(test.ids[r])[-28:]}")
    what = "probability" if proba is not None else "test-row order (no probabilities)"
    path = report_dir / "mistakes.png"
    plot_grid(images, titles, path,
              f"{best['name']}: the {len(rows)} most confident wrong test predictions "
              f"(by {what})")
    return path
