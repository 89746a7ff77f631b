"""Section 6: stage one's runtimes side by side — TensorFlow float32, OpenVINO float32,
OpenVINO bf16 (where the CPU has it) and OpenVINO int8 (NNCF-quantized, calibrated on the
subset's training images).

For each runtime, in alternating rounds on the same images:

- **pipeline**: :func:`featcache.extract.run.extract_features` end to end with ``--flip`` (as
  ``make features`` runs it) through that runtime, steady-state images/s from the progress
  callback (:func:`benchmarks.throughput.pipeline_rep`); the conversion, when there is one,
  is done once before the rounds (the on-disk cache), so it is outside every window;
- **bare engine**: the backbone alone in that engine — a ``tf.function`` of the Keras model,
  or the backbone converted by ``ov.convert_model`` and compiled with the same hints — on
  one pre-made, resized and preprocessed float32 batch and its mirror (two forward passes
  per image, as the pipeline does), same batch size and number of batches.

Achieved FLOP/s = FLOPs per image (x2 for the mirror) x images/s, against the median
FLOP/s of the float32 matmul timed in the same rounds
(:func:`benchmarks.throughput.matmul_gflops`), and against the roof of each precision: an
n x n matmul compiled by OpenVINO at float32, bf16 and int8
(:func:`benchmarks.throughput.openvino_matmul_gops`), timed in the same rounds. The features
of every engine are compared with OpenVINO float32's on the same images (cosine per image).
Writes ``<work_dir>/s6_<runtime>_<precision>.h5``.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from .env import Settings, open_subset
from .throughput import Bare, count_flops, matmul_gflops, openvino_matmul_gops, pipeline_rep

log = logging.getLogger(__name__)


def engines() -> list[tuple[str, str]]:
    """(runtime, precision) pairs this machine can run."""
    from featcache.backbones.runtime import cpu_has_bf16, nncf_available

    out = [("tensorflow", "float32"), ("openvino", "float32")]
    if cpu_has_bf16():
        out.append(("openvino", "bf16"))
    if nncf_available():
        out.append(("openvino", "int8"))
    return out


def label(runtime: str, precision: str) -> str:
    return f"{'TensorFlow' if runtime == 'tensorflow' else 'OpenVINO'} {precision}"


class BareEngine(Bare):
    """The backbone alone in one engine, on one pre-made preprocessed batch and its mirror
    (timed by :meth:`Bare.rep`)."""

    def __init__(self, s: Settings, ds, runtime: str, precision: str):
        import numpy as np
        import tensorflow as tf

        from featcache.backbones.registry import build_backbone, get_backbone, preprocess
        from featcache.data.resize import REGISTRY_ANTIALIAS, resize_images

        spec = get_backbone(s.backbone)
        model = build_backbone(spec, weights=s.weights, seed=s.seed)
        images, _ = next(ds.batches("train", 0, s.batch, s.batch))
        x = resize_images(tf.cast(images, tf.float32), s.size, antialias=REGISTRY_ANTIALIAS)
        x = preprocess(x, spec.preprocess).numpy()
        self.inputs = [x, np.ascontiguousarray(x[:, :, ::-1])]
        if runtime == "tensorflow":
            fn = tf.function(lambda t: tf.cast(model(t, training=False), tf.float32))
            consts = [tf.constant(v) for v in self.inputs]
            self._run = lambda: [fn(c).numpy() for c in consts]
        else:
            import openvino as ov

            from featcache.backbones.runtime import convert_graph

            graph = lambda t: {"features": tf.cast(model(t, training=False), tf.float32)}  # noqa: E731
            m = convert_graph(graph, (s.size, s.size, 3), "float32")
            if precision == "int8":   # the same calibration as the pipeline's, preprocessed
                from featcache.config import ExtractConfig
                from featcache.extract import quantize

                cal = quantize.calibration_images(ds, ExtractConfig().calibration, s.seed)
                cal = resize_images(tf.cast(cal, tf.float32), s.size,
                                    antialias=REGISTRY_ANTIALIAS)
                m = quantize.quantize(m, preprocess(cal, spec.preprocess).numpy())
            m.reshape({m.inputs[0]: [s.batch, s.size, s.size, 3]})
            compiled = ov.Core().compile_model(m, "CPU", {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"})
            req = compiled.create_infer_request()

            def run():
                out = []
                for v in self.inputs:
                    req.infer({0: v})
                    out.append(req.get_output_tensor(0).data.copy())
                return out
            self._run = run
        self.step()  # trace / first inference
        self.batch, self.warmup = s.batch, s.tp_warmup

    def step(self):
        return self._run()


def run(s: Settings) -> dict:
    """Section 6: every engine's pipeline and bare rates, ratios, FLOP/s vs matmul."""
    work = Path(s.work_dir)
    ds = open_subset(s, {"train": s.rt_images})
    flops = count_flops(s.backbone, s.size)
    todo = engines()
    bares, t_setup = {}, {}
    for rt, prec in todo:
        t0 = time.perf_counter()
        # the first pipeline run converts (OpenVINO) and fills the conversion cache
        pipeline_rep(s, ds, work / f"s6_{rt}_{prec}.h5", runtime=rt, precision=prec, flip=True)
        bares[(rt, prec)] = BareEngine(s, ds, rt, prec)
        t_setup[f"{rt}/{prec}"] = time.perf_counter() - t0
    pipe = {e: [] for e in todo}
    bare = {e: [] for e in todo}
    mm, mm_state = [], {}
    roofs = {"float32": [], "bf16": [], "int8": []}
    roof_state: dict = {}
    precisions = sorted({p for _, p in todo}, key=list(roofs).index)
    for r in range(s.rt_reps):
        order = todo if r % 2 == 0 else todo[::-1]
        for e in order:
            steps = ("pipe", "bare") if r % 2 == 0 else ("bare", "pipe")
            for which in steps:
                if which == "pipe":
                    pipe[e].append(pipeline_rep(s, ds, work / f"s6_{e[0]}_{e[1]}.h5",
                                                runtime=e[0], precision=e[1], flip=True))
                else:
                    n = pipe[e][-1]["batches"] if pipe[e] else \
                        -(-s.rt_images // s.batch) - s.tp_warmup
                    bare[e].append(bares[e].rep(n))
        mm.extend(matmul_gflops(s.matmul_n, s.matmul_reps, state=mm_state))
        for prec in precisions:
            roofs[prec].extend(openvino_matmul_gops(s.matmul_n, s.matmul_reps,
                                                    precision=prec, state=roof_state))
        log.info("round %d: %s", r, ", ".join(
            f"{label(*e)} {pipe[e][-1]['images_per_s']:.1f}/{bare[e][-1]['images_per_s']:.1f}"
            for e in todo))
    mm_med = statistics.median(mm)
    roof_med = {p: statistics.median(v) for p, v in roofs.items() if v}
    per_image = 2 * flops["flops"]  # the image and its mirror
    cosine = _cosines(work, todo)
    rows = []
    base = None
    ov32 = None
    for e in todo:
        p = statistics.median(x["images_per_s"] for x in pipe[e])
        b = statistics.median(x["images_per_s"] for x in bare[e])
        base = base or p
        if e == ("openvino", "float32"):
            ov32 = p
        rows.append({"runtime": e[0], "precision": e[1], "label": label(*e),
                     "featcache": pipe[e], "bare": bare[e],
                     "pipeline_images_per_s": p, "bare_images_per_s": b, "ratio": p / b,
                     "vs_tensorflow": p / base,
                     "pipeline_gflops": p * per_image / 1e9, "bare_gflops": b * per_image / 1e9,
                     "pipeline_flops_ratio": p * per_image / 1e9 / mm_med,
                     "bare_flops_ratio": b * per_image / 1e9 / mm_med,
                     "roof_gops": roof_med.get(e[1]),
                     "roof_ratio": p * per_image / 1e9 / roof_med[e[1]] if e[1] in roof_med
                     else None,
                     "cosine_to_float32": cosine.get(e)})
    for row in rows:
        row["vs_openvino_float32"] = row["pipeline_images_per_s"] / ov32 if ov32 else None
    from featcache.backbones.runtime import INT8_FLAGS, cpu_flags, cpu_has_bf16

    skipped = [] if cpu_has_bf16() else [
        "OpenVINO bf16: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16)"]
    if ("openvino", "int8") not in todo:
        skipped.append("OpenVINO int8: NNCF is not installed")
    return {"rows": rows, "roofs_gops": roofs, "roofs_gops_median": roof_med,
            "int8_flags": sorted(set(INT8_FLAGS) & cpu_flags()), "flops": flops,
            "matmul_gflops": mm, "matmul_gflops_median": mm_med,
            "matmul_n": s.matmul_n, "images_per_rep": s.rt_images, "setup_s": t_setup,
            "skipped": skipped, "flip": True}


def _cosines(work: Path, todo) -> dict:
    """Per engine: mean and minimum cosine of its features (the image's and the mirror's)
    to OpenVINO float32's on the same images (from the last pipeline run's files)."""
    import numpy as np

    from featcache.cache.reader import load_features

    def rows(e):
        fs = load_features(work / f"s6_{e[0]}_{e[1]}.h5")
        return np.concatenate([fs["train"].features, fs["train"].features_flip])

    ref = rows(("openvino", "float32"))
    ref_norm = np.linalg.norm(ref, axis=1)
    out = {}
    for e in todo:
        x = rows(e)
        norm = np.linalg.norm(x, axis=1) * ref_norm
        ok = norm > 0   # random weights can give all-zero features: no angle to measure
        cos = (ref[ok] * x[ok]).sum(1) / norm[ok]
        out[e] = {"mean": float(cos.mean()), "min": float(cos.min()),
                  "images": int(ok.sum())} if ok.any() else None
    return out
