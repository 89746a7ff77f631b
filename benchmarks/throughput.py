"""Section 2: stage one vs the bare backbone, and the backbone vs the machine's matmul peak.

- **Pipeline** (A): :func:`featcache.extract.run.extract_features` (TensorFlow runtime; section 6
  compares the runtimes) end to end on uint8 32 px
  images (read, resize and preprocess in the graph, forward, write to HDF5), timed over
  its steady state: from the end of batch ``tp_warmup`` to the end of the last batch
  (progress callbacks), so model building, tracing and file creation are excluded (and
  reported separately as the end-to-end rate).
- **Bare backbone** (B): the same backbone, built the same way, called through a
  ``tf.function`` on one pre-made, already resized and preprocessed float32 batch of the
  same images, same batch size, same number of batches, after the same warm-up.
- **Matmul** (M): a large float32 ``tf.matmul`` (n x n @ n x n, 2 n^3 FLOPs), timed.

Rounds alternate A B M / B A M so drift and load hit both sides; the reported ratios are
ratios of medians. The backbone's FLOPs per image are counted analytically from its
layers (2 x multiply-adds of every Conv2D / DepthwiseConv2D / SeparableConv2D / Dense).

Reads the dataset and weights of :class:`~benchmarks.env.Settings`; writes
``<work_dir>/s2_pipeline.h5`` (rebuilt each round).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np

from .env import Settings, open_subset

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- FLOPs

def count_flops(backbone: str, size: int) -> dict:
    """FLOPs (2 x multiply-adds) per image of ``backbone`` at ``size`` px, from its layers.

    Batch norm, activations, additions and pooling are not counted (a few percent for
    MobileNetV2); the count is what a dense float32 matmul would have to do.
    """
    import keras

    from featcache.backbones.registry import get_backbone

    spec = get_backbone(backbone)
    model = spec.build(include_top=False, input_shape=(size, size, 3), pooling="avg",
                       weights=None)
    macs = 0
    for layer in _layers(model):
        kind = type(layer).__name__
        if kind not in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense"):
            continue
        cin = int(layer.input.shape[-1])
        out = layer.output.shape
        spatial = int(np.prod([d for d in out[1:-1]])) if len(out) > 2 else 1
        cout = int(out[-1])
        if kind == "Dense":
            macs += cin * cout
            continue
        k = int(np.prod(layer.kernel_size))
        if kind == "Conv2D":
            macs += spatial * cout * k * cin // getattr(layer, "groups", 1)
        elif kind == "DepthwiseConv2D":
            macs += spatial * cout * k
        else:  # separable: depthwise on cin * multiplier channels, then pointwise
            mult = int(getattr(layer, "depth_multiplier", 1))
            macs += spatial * cin * mult * k + spatial * cin * mult * cout
    del model
    keras.backend.clear_session()
    return {"macs": int(macs), "flops": int(2 * macs), "size": size, "backbone": backbone}


def _layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _layers(layer)
        else:
            yield layer


# ---------------------------------------------------------------------------- timers

def matmul_gflops(n: int, reps: int, *, state: dict) -> list[float]:
    """GFLOP/s of ``reps`` timed float32 n x n matmuls (operands made once, in ``state``)."""
    import tensorflow as tf

    if "ab" not in state:
        g = tf.random.Generator.from_seed(0)
        state["ab"] = (g.normal((n, n)), g.normal((n, n)))
        tf.matmul(*state["ab"]).numpy()  # warm-up
    a, b = state["ab"]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tf.matmul(a, b).numpy()
        out.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return out


def openvino_matmul_gops(n: int, reps: int, *, precision: str, state: dict) -> list[float]:
    """GOP/s of ``reps`` timed n x n matmuls compiled by OpenVINO's CPU plugin at
    ``precision``: ``float32``, ``bf16`` (the inference-precision hint) or ``int8`` (both
    operands through 256-level FakeQuantize, which the plugin runs as a u8 x s8 matmul:
    VNNI/AMX where the CPU has them). The roofs the backbone's precisions are measured
    against; the compiled models are made once, in ``state``."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    if precision not in state:
        rng = np.random.default_rng(0)
        param = ops.parameter([n, n], np.float32, name="a")
        a, w = param, ops.constant(rng.uniform(-1, 1, (n, n)).astype(np.float32))
        if precision == "int8":
            lo, hi = ops.constant(np.float32(-1)), ops.constant(np.float32(1))
            a = ops.fake_quantize(a, lo, hi, lo, hi, 256)
            w = ops.fake_quantize(w, lo, hi, lo, hi, 255)
        model = ov.Model([ops.matmul(a, w, False, True)], [param])
        compiled = ov.Core().compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"})
        req = compiled.create_infer_request()
        x = rng.uniform(-1, 1, (n, n)).astype(np.float32)
        req.infer({0: x})   # warm-up
        state[precision] = (req, x)
    req, x = state[precision]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        req.infer({0: x})
        out.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return out


def pipeline_rep(s: Settings, ds, out: Path, *, runtime: str = "tensorflow",
                 precision: str = "float32", flip: bool = False) -> dict:
    """One full ``extract_features`` run into a fresh file; steady-state images/s.

    Section 2 times the TensorFlow runtime (its bare side is a ``tf.function``); section 6
    (:mod:`benchmarks.runtimes`) passes each runtime."""
    from featcache.cache.lock import partial_path
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    for p in (out, partial_path(out)):
        p.unlink(missing_ok=True)
    stamps: list[tuple[float, int]] = []
    cfg = ExtractConfig(dataset=ds.name, data_dir=s.data_dir, backbone=s.backbone,
                        size=s.size, batch=s.batch, weights=s.weights, seed=s.seed,
                        runtime=runtime, precision=precision, flip=flip, output=str(out),
                        download=False)
    t0 = time.perf_counter()
    res = extract_features(cfg, dataset=ds,
                           progress=lambda p: stamps.append((time.perf_counter(), p.done)))
    total = time.perf_counter() - t0
    w = min(s.tp_warmup, len(stamps) - 2)
    (ta, na), (tb, nb) = stamps[w - 1] if w > 0 else (t0, 0), stamps[-1]
    return {"images_per_s": (nb - na) / (tb - ta), "images": nb - na,
            "batches": len(stamps) - w, "seconds": tb - ta,
            "end_to_end_images_per_s": res.images / total, "end_to_end_s": total}


class Bare:
    """The backbone alone on one pre-made preprocessed batch of the same images."""

    def __init__(self, s: Settings, ds):
        import tensorflow as tf

        from featcache.backbones.registry import build_backbone, get_backbone, preprocess
        from featcache.data.resize import REGISTRY_ANTIALIAS, resize_images

        spec = get_backbone(s.backbone)
        model = build_backbone(spec, weights=s.weights, seed=s.seed)
        images, _ = next(ds.batches("train", 0, s.batch, s.batch))
        x = resize_images(tf.cast(images, tf.float32), s.size, antialias=REGISTRY_ANTIALIAS)
        self.x = tf.constant(preprocess(x, spec.preprocess))
        self.fn = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32))
        self.step()  # trace
        self.batch, self.warmup = s.batch, s.tp_warmup

    def step(self):
        """One batch through the engine, results fetched."""
        return self.fn(self.x).numpy()

    def rep(self, batches: int) -> dict:
        for _ in range(self.warmup):
            self.step()
        t0 = time.perf_counter()
        for _ in range(batches):
            self.step()
        dt = time.perf_counter() - t0
        return {"images_per_s": batches * self.batch / dt, "images": batches * self.batch,
                "batches": batches, "seconds": dt}


# ---------------------------------------------------------------------------- section

def run(s: Settings) -> dict:
    """Section 2: interleaved rounds, ratios of medians, FLOP/s vs matmul FLOP/s."""
    work = Path(s.work_dir)
    ds = open_subset(s, {"train": s.tp_images})
    flops = count_flops(s.backbone, s.size)
    bare = Bare(s, ds)
    mm_state: dict = {}
    pipe, raw, mm = [], [], []
    for r in range(s.tp_reps):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for which in order:
            if which == "A":
                pipe.append(pipeline_rep(s, ds, work / "s2_pipeline.h5"))
            else:
                # the same number of batches as the pipeline's timed window
                n = pipe[-1]["batches"] if pipe else -(-s.tp_images // s.batch) - s.tp_warmup
                raw.append(bare.rep(n))
        mm.extend(matmul_gflops(s.matmul_n, s.matmul_reps, state=mm_state))
        log.info("round %d: pipeline %.1f img/s, bare %.1f img/s, matmul %.0f GFLOP/s", r,
                 pipe[-1]["images_per_s"], raw[-1]["images_per_s"], mm[-1])
    med_pipe = statistics.median(p["images_per_s"] for p in pipe)
    med_bare = statistics.median(b["images_per_s"] for b in raw)
    med_mm = statistics.median(mm) * 1e9
    return {
        "flops": flops, "featcache": pipe, "bare": raw, "matmul_gflops": mm,
        "matmul_n": s.matmul_n, "images_per_rep": s.tp_images,
        "pipeline_images_per_s": med_pipe, "bare_images_per_s": med_bare,
        "ratio": med_pipe / med_bare,
        "bare_gflops": med_bare * flops["flops"] / 1e9,
        "pipeline_gflops": med_pipe * flops["flops"] / 1e9,
        "matmul_gflops_median": med_mm / 1e9, "matmul_gflops_max": max(mm),
        "flops_ratio": med_bare * flops["flops"] / med_mm,
        "pipeline_flops_ratio": med_pipe * flops["flops"] / med_mm,
    }
