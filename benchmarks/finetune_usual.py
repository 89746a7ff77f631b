"""Section 9: fine-tuning the usual way vs from the cache — same images, backbone, input
size, cut, trainable blocks, head, optimisers, learning rates, epochs, batch sizes and seed.

**The usual way** is the Keras transfer-learning-then-fine-tuning recipe: one model, images
(uint8) -> resize -> the backbone's preprocessing -> the whole backbone (the layers below
the cut frozen, the blocks above it trainable, every BatchNorm in inference mode) -> pooled
-> the head. Phase 1 trains the head with the backbone frozen, phase 2 the top blocks and
the head together; every epoch runs every image through the whole backbone. **From the
cache** is featcache: stage one once with activations at the cut, then the ``finetune``
head (:class:`featcache.heads.finetune.head.FinetuneHead`) on the file, which never runs
the bottom. Both sides train the same top and head (:func:`featcache.heads.finetune.model.
build_base` and :func:`~featcache.heads.finetune.model.build_above_cut`, the same seed, so
the same initial weights), with the same compiled step
(:func:`featcache.heads.finetune.head.train_step`: its tape records only the trainable
layers, so the usual way's frozen bottom runs forward without being kept for a backward
pass) and the head's own settings (rates, cosine, batch sizes), for exactly
``Settings.ft_head_epochs`` + ``Settings.ft_top_epochs`` epochs (no validation, no early
stopping). The head's Normalization needs the pooled features' statistics: the cache has
them, the usual way makes one forward pass over the training images for them (its setup).

Reads the dataset and weights given by :class:`~benchmarks.env.Settings`; writes the
feature file ``<work_dir>/s9_<cut>.h5`` (deleted and rebuilt each run, never a cache hit).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .env import Settings, open_subset
from .tutorial import arrays

log = logging.getLogger(__name__)


def finetune_head(s: Settings):
    """The ``finetune`` head both sides follow: its defaults, with the section's fixed
    epochs and nothing that stops a fit early."""
    from featcache.heads.finetune.head import FinetuneHead

    return FinetuneHead(warmup_epochs=s.ft_head_epochs, epochs=s.ft_top_epochs,
                        time_budget_s=None, random_state=s.seed)


def _side(stage_one_s: float, setup_s: float, head_epochs: list[float],
          top_epochs: list[float], predict_s: float, acc: float) -> dict:
    """One side's numbers; ``total_s`` is the sum of its parts, ``top_epoch_s`` a phase-2
    epoch's seconds: the mean of those after the first (which traces the step function),
    the first when there is only one."""
    steady = top_epochs[1:] or top_epochs
    d = {"stage_one_s": stage_one_s, "setup_s": setup_s, "head_epochs_s": head_epochs,
         "top_epochs_s": top_epochs, "head_s": float(sum(head_epochs)),
         "top_s": float(sum(top_epochs)),
         "top_epoch_s": float(np.mean(steady)) if steady else float("nan"),
         "predict_s": predict_s, "acc": acc}
    d["total_s"] = d["stage_one_s"] + d["setup_s"] + d["head_s"] + d["top_s"] + d["predict_s"]
    return d


def stage_one_config(s: Settings, ds, cut: str, *, work: Path):
    """Stage one's settings (``<work>/s9_<cut>.h5``, no mirrors); the usual way reads its
    input size, preprocessing, pooling, weights and seed from them too."""
    from featcache.backbones.registry import get_backbone
    from featcache.config import ExtractConfig

    return ExtractConfig(dataset=ds.name, data_dir=s.data_dir, backbone=s.backbone,
                         size=s.size, batch=s.batch, weights=s.weights,
                         preprocess=get_backbone(s.backbone).preprocess, seed=s.seed,
                         output=str(work / f"s9_{cut}.h5"), download=False, flip=False,
                         cut=cut)


def from_cache(s: Settings, ds, cfg) -> dict:
    """Stage one (``cfg``) into a fresh file, then the ``finetune`` head on its rows:
    timings per part and epoch, test accuracy."""
    from featcache.cache.activations import ActivationReader
    from featcache.cache.lock import partial_path
    from featcache.extract.run import extract_features
    from featcache.heads.finetune.data import ActRows

    out = Path(cfg.output)
    for p in (out, partial_path(out)):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = extract_features(cfg, dataset=ds)
    stage_one_s = time.perf_counter() - t0
    with ActivationReader(res.path) as r:
        ytr, yte = r.labels("train"), r.labels("test")
    train = ActRows(str(res.path), "train", np.arange(len(ytr)))
    test = ActRows(str(res.path), "test", np.arange(len(yte)))

    head = finetune_head(s)
    t1 = time.perf_counter()
    head.fit(train, ytr)
    t2 = time.perf_counter()
    pred = head.predict(test)
    t3 = time.perf_counter()
    epochs = {1: [], 2: []}
    for h in head.history_:
        epochs[h["phase"]].append(h["epoch_s"])
    fit_s = t2 - t1
    side = _side(stage_one_s, fit_s - sum(epochs[1]) - sum(epochs[2]), epochs[1], epochs[2],
                 t3 - t2, float(np.mean(pred == yte)))
    side.update(file=str(res.path), file_mb=Path(res.path).stat().st_size / 2**20,
                trainable_blocks=head.trainable_blocks_,
                trainable_values=_values(head.model_.trainable_weights))
    log.info("from the cache: %s", {k: v for k, v in side.items() if isinstance(v, float)})
    return side


def usual_model(s: Settings, cfg, classes, pooled_stats):
    """The usual way's model (images -> probabilities) and its two phases' variables:
    ``(model, head variables, top variables, resolved trainable blocks)``.
    ``pooled_stats(base, inputs)`` -> (mean, var) of the pooled training features, for the
    head's Normalization; ``inputs`` is the model's resize + preprocessing."""
    import keras
    import tensorflow as tf

    from featcache.backbones.registry import preprocess
    from featcache.data.resize import REGISTRY_ANTIALIAS, resize_images
    from featcache.heads.finetune.model import build_above_cut, build_base, to_cut

    p = finetune_head(s).get_params()

    def inputs(images):
        x = tf.cast(images, tf.float32)
        if x.shape[1] != cfg.size or x.shape[2] != cfg.size:
            x = resize_images(x, cfg.size, antialias=REGISTRY_ANTIALIAS)
        return preprocess(x, cfg.preprocess)

    # the seeding and build order of the head's own model (so the same initial weights)
    base = build_base(cfg.backbone, weights=cfg.weights, pooling=cfg.pooling,
                      backbone_seed=cfg.seed, seed=p["random_state"])
    mean, var = pooled_stats(base, inputs)
    b = build_above_cut(base, cfg.backbone, cfg.cut, len(classes), mean, var,
                        trainable_blocks=p["trainable_blocks"], hidden=p["hidden"],
                        dropout=p["dropout"])
    bottom = to_cut(base, cfg.cut, cfg.backbone)

    class Usual(keras.Model):
        def __init__(self):
            super().__init__(name="usual_finetune")
            self.bottom, self.top, self.head = bottom, b.top, b.head

        def call(self, images, training=False):
            acts = self.bottom(inputs(images), training=False)
            return self.head(self.top(acts, training=training), training=training)

    return (Usual(), list(b.head.trainable_weights), list(b.top.trainable_weights),
            b.trainable_blocks)


def _epochs(step, x, y, epochs: int, batch: int, rng) -> list[float]:
    """Seconds of each of ``epochs`` shuffled passes of ``step`` over ``(x, y)``."""
    import tensorflow as tf

    out = []
    for _ in range(epochs):
        t = time.perf_counter()
        order = rng.permutation(len(y))
        for i in range(0, len(y), batch):
            sel = order[i:i + batch]
            step(tf.constant(x[sel]), tf.constant(y[sel]))
        out.append(time.perf_counter() - t)
    return out


def usual_way(s: Settings, ds, cfg) -> dict:
    """The whole model trained on the images, phase 1 then phase 2: timings, accuracy."""
    import keras
    import tensorflow as tf

    from featcache.heads.finetune.data import feature_stats
    from featcache.heads.finetune.head import learning_rate, train_step

    p = finetune_head(s).get_params()
    xtr, ytr_raw = arrays(ds, "train")
    xte, yte_raw = arrays(ds, "test")
    classes, ytr = np.unique(ytr_raw, return_inverse=True)
    yte = np.searchsorted(classes, yte_raw)

    def pooled_stats(base, inputs):
        forward = tf.function(lambda x: base(inputs(x), training=False), reduce_retracing=True)
        s1 = s2 = 0.0
        for i in range(0, len(xtr), s.batch):
            a = np.asarray(forward(tf.constant(xtr[i:i + s.batch])), np.float64)
            s1, s2 = s1 + a.sum(0), s2 + (a * a).sum(0)
        return feature_stats(s1, s2, len(xtr))

    t0 = time.perf_counter()
    model, head_vars, top_vars, blocks = usual_model(s, cfg, classes, pooled_stats)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    setup_s = time.perf_counter() - t0
    rng = np.random.default_rng(int(p["random_state"]))
    # phase 1: the head, the whole backbone frozen
    step1 = train_step(model, [(learning_rate(p["learning_rate"]), head_vars)], loss_fn)
    head_epochs = _epochs(step1, xtr, ytr, s.ft_head_epochs, p["warmup_batch_size"], rng)
    # phase 2: the top blocks and the head, the head's two rates along its cosine
    steps = s.ft_top_epochs * -(-len(ytr) // p["batch_size"]) \
        if p["schedule"] == "cosine" else 0
    step2 = train_step(model, [(learning_rate(p["backbone_lr"], steps), top_vars),
                               (learning_rate(p["finetune_lr"], steps), head_vars)], loss_fn)
    top_epochs = _epochs(step2, xtr, ytr, s.ft_top_epochs, p["batch_size"], rng)
    t1 = time.perf_counter()
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    pred = np.concatenate([np.asarray(forward(tf.constant(xte[i:i + s.batch]))).argmax(1)
                           for i in range(0, len(xte), s.batch)])
    predict_s = time.perf_counter() - t1
    side = _side(0.0, setup_s, head_epochs, top_epochs, predict_s, float(np.mean(pred == yte)))
    side.update(trainable_blocks=blocks, trainable_values=_values(head_vars + top_vars))
    log.info("the usual way: %s", {k: v for k, v in side.items() if isinstance(v, float)})
    return side


def run(s: Settings) -> dict:
    """Section 9. Returns both sides' timings and accuracies and the ratios (JSON-safe)."""
    from featcache.backbones.registry import recommended_cut

    cut = recommended_cut(s.backbone)
    ds = open_subset(s, {"train": s.n_train, "test": s.n_test})
    cfg = stage_one_config(s, ds, cut, work=Path(s.work_dir))
    cache = from_cache(s, ds, cfg)
    usual = usual_way(s, ds, cfg)
    if (usual["trainable_blocks"], usual["trainable_values"]) != \
            (cache["trainable_blocks"], cache["trainable_values"]):
        raise RuntimeError(f"section 9: the two sides train different tops: "
                           f"{usual['trainable_blocks']} blocks ({usual['trainable_values']} "
                           f"values) vs {cache['trainable_blocks']} "
                           f"({cache['trainable_values']})")
    p = finetune_head(s).get_params()
    return {
        "dataset": ds.name, "n_train": ds.splits["train"], "n_test": ds.splits["test"],
        "backbone": s.backbone, "size": s.size, "cut": cut,
        "trainable_blocks": cache["trainable_blocks"],
        "head_epochs": s.ft_head_epochs, "top_epochs": s.ft_top_epochs,
        "head_batch": p["warmup_batch_size"], "top_batch": p["batch_size"],
        "rates": {"head": p["learning_rate"], "backbone": p["backbone_lr"],
                  "finetune": p["finetune_lr"], "schedule": p["schedule"]},
        "usual": usual, "cache": cache,
        "ratio_top_epoch": usual["top_epoch_s"] / cache["top_epoch_s"],
        "ratio_total": usual["total_s"] / cache["total_s"],
    }


def _values(variables) -> int:
    return int(sum(int(np.prod(v.shape)) for v in variables))


# ---------------------------------------------------------------------------- report

def headline_rows(d: dict) -> list[tuple[str, str, str]]:
    """Section 9's row of the headline table."""
    u, c = d["usual"], d["cache"]
    return [(f"Fine-tuning the {d['trainable_blocks']} blocks above `{d['cut']}` the usual "
             f"way (every image through the whole backbone every epoch) vs from the cache "
             f"(stage one once, then the top on the activations), {d['n_train']:,} train / "
             f"{d['n_test']:,} test images at {d['size']} px, {d['head_epochs']} + "
             f"{d['top_epochs']} epochs: a phase-2 epoch / wall time to a tested model "
             f"(stage one included)",
             f"{u['top_epoch_s']:,.1f} s vs {c['top_epoch_s']:,.1f} s / "
             f"{u['total_s']:,.1f} s vs {c['total_s']:,.1f} s",
             f"**{d['ratio_top_epoch']:,.1f}x** / **{d['ratio_total']:,.1f}x** (usual / "
             f"cache)")]


def report_lines(d: dict, r: dict) -> list[str]:
    """Section 9 of BENCHMARKS.md."""
    u, c = d["usual"], d["cache"]
    rt = d["rates"]
    L = ["## 9. Fine-tuning: the usual way vs from the cache", "",
         f"Same {d['n_train']:,} training and {d['n_test']:,} test images ({d['dataset']}), "
         f"same backbone ({d['backbone']}, {d['size']} px, resized inside the graph), same "
         f"cut (`{d['cut']}`, the recommended one), the same {d['trainable_blocks']} "
         f"trainable blocks above it (BatchNorm frozen) and head, the same seed and initial "
         f"weights. Phase 1: the head alone, {_n(d['head_epochs'], 'epoch')}, batch "
         f"{d['head_batch']}, Adam {rt['head']:g}; phase 2: the top and the head, "
         f"{_n(d['top_epochs'], 'epoch')}, batch {d['top_batch']}, Adam {rt['backbone']:g} "
         f"(top) / {rt['finetune']:g} (head), {rt['schedule']}; no validation, no early "
         f"stopping. The usual way trains one Keras model on the images (the whole backbone "
         f"runs in every epoch; in phase 1 all of it is frozen); from the cache, stage one "
         f"stores the activations at the cut once and the `finetune` head trains the top "
         f"on them. Both use the same compiled step, whose tape records only the trainable "
         f"layers.", ""]
    rows = [["stage one (s)", f"{u['stage_one_s']:,.1f}", f"{c['stage_one_s']:,.1f}"],
            ["setup: model build, the head's normalisation statistics (s)",
             f"{u['setup_s']:,.1f}", f"{c['setup_s']:,.1f}"],
            ["phase 1, the head (s per epoch)", _epochs_text(u["head_epochs_s"]),
             _epochs_text(c["head_epochs_s"])],
            ["phase 2, top + head (s per epoch)", _epochs_text(u["top_epochs_s"]),
             _epochs_text(c["top_epochs_s"])],
            ["**phase-2 epoch (s; after the first, which traces the step)**",
             f"**{u['top_epoch_s']:,.1f}**",
             f"**{c['top_epoch_s']:,.1f}**"],
            ["test predictions (s)", f"{u['predict_s']:,.1f}", f"{c['predict_s']:,.1f}"],
            ["**total (s)**", f"**{u['total_s']:,.1f}**", f"**{c['total_s']:,.1f}**"],
            ["test accuracy", f"{100 * u['acc']:.1f}%", f"{100 * c['acc']:.1f}%"]]
    L += ["| | the usual way (through the whole backbone) | from the cache (stage one, "
          "then the top) |", "| --- | --- | --- |"]
    L += ["| " + " | ".join(row) + " |" for row in rows]
    L += ["", f"Usual / cache: a phase-2 epoch **{d['ratio_top_epoch']:,.1f}x**, the total "
          f"**{d['ratio_total']:,.1f}x**. The cache file (`{d['cut']}` activations, no "
          f"mirrors): {c['file_mb']:,.1f} MiB."]
    return L


def _n(k: int, what: str) -> str:
    return f"{k} {what}{'' if k == 1 else 's'}"


def _epochs_text(seconds: list[float]) -> str:
    return ", ".join(f"{x:,.1f}" for x in seconds) or "—"
