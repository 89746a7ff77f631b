"""``mistakes.png``: the best row's most confident wrong test predictions, as an image grid.

Reads the feature file named in stage two's ``results`` (test labels and per-row ``ids``;
the test features too when it must predict), the best row's test probabilities as the
comparison computed them or else its saved head (``<report>/heads/<row>.joblib|.keras``),
and the images themselves through the ids: registry data sets (CIFAR-10,
synthetic) by index in the test split (from ``data_dir``: the comparison's ``--data-dir``,
as stage one's, default ``data``; where that lacks CIFAR-10,
:func:`featcache._util.paths.find_cifar10`), image folders by relative path under the
file's ``source_dir``. Writes ``<report>/mistakes.png`` (atomically). When the images
or the head cannot be found it logs why and writes nothing: the report never fails for it.
A head without ``predict_proba`` is ranked by test-row order and titled without a
probability.
"""

from __future__ import annotations

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


def load_images(attrs: dict, split: str, ids, *, data_dir=None) -> list[np.ndarray]:
    """The images of ``ids`` (uint8 RGB) for a feature file with ``attrs``."""
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
    from featcache.cache.reader import load_features
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
            head = as_head(load_head(report_dir / best["saved"]))  # a plain sklearn head too
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
        images = load_images(fs.attrs, "test", test.ids[rows],
                             data_dir=data_dir or results.get("config", {}).get("data_dir"))
    except (FeatcacheError, OSError, KeyError, StopIteration, ValueError) as exc:
        log.warning("mistakes.png not written (%s)", str(exc).splitlines()[0] if str(exc)
                    else type(exc).__name__)
        return None
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
