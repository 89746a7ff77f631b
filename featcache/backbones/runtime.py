"""Stage one's runtimes: which engine runs the backbone (TensorFlow or OpenVINO), at which
precision, and OpenVINO's on-disk conversion cache.

Keras stays where backbones are defined (:mod:`featcache.backbones.registry`); this module decides
what runs them. Two halves:

- **Choosing** (cheap: imports neither TensorFlow nor OpenVINO, so the Makefile can name the
  feature file before any virtualenv exists): :func:`resolve_runtime` turns ``auto`` into
  ``openvino`` on a CPU and ``tensorflow`` when an NVIDIA GPU is visible
  (:func:`visible_gpus`: the devices the kernel shows, honouring ``CUDA_VISIBLE_DEVICES``);
  :func:`resolve_precision` turns ``auto`` into the measured rule of
  :func:`auto_precision`: ``int8`` (NNCF's post-training quantization of the converted
  graph, :mod:`featcache.extract.quantize`) for OpenVINO on a CPU whose ``/proc/cpuinfo``
  lists VNNI or AMX int8 instructions (:func:`cpu_has_fast_int8`), else ``bf16`` on a CPU
  that lists ``avx512_bf16`` or ``amx_bf16`` (:func:`cpu_has_bf16`), else ``float32``;
  flags are read, never assumed. The rule is the same with activations at a cut (the
  fine-tuned row on an int8 cut file is within 0.5 points of float32's, docs/stage-one.md).
- **Running** (:func:`openvino_step`): the whole step — uint8 batch -> resize -> the
  backbone's preprocessing -> backbone -> pooling (-> mirrored copy) — as one TensorFlow
  graph (the same one the TensorFlow runtime runs), converted by ``ov.convert_model`` once
  per :func:`conversion_key` and cached under :func:`cache_dir`, then compiled for the CPU
  at a fixed batch size (a short last batch is padded) with ``INFERENCE_PRECISION_HINT``.
  :func:`compile_cached` (convert or read the cache, then compile) and :class:`OpenVINOStep`
  (padded batches) also run ``featcache predict``'s exported models
  (:mod:`featcache.ship.engines`), under keys of their own.

Reads ``/proc/cpuinfo``, ``/proc/driver/nvidia/gpus`` (or ``/dev/nvidia*``) and the cache;
writes only conversion-cache entries (``<cache_dir>/openvino/<key hash>/``: ``model.xml``,
``model.bin``, ``key.json`` with the key and the files' sha256). An entry is written under
a temporary name and renamed, so a killed conversion leaves no entry; an entry whose key
or checksums do not match is converted again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

from featcache.errors import ConfigError, ConversionError, FeatcacheError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "tensorflow", "openvino")
DEFAULT_RUNTIME = "auto"
#: ``--precision`` values of each runtime (``auto`` resolves to one of them).
RUNTIME_PRECISIONS = {
    "tensorflow": ("float32", "mixed_bfloat16", "mixed_float16"),   # Keras dtype policies
    "openvino": ("float32", "bf16", "int8"),   # INFERENCE_PRECISION_HINT; int8: NNCF-quantized
}
PRECISIONS = ("auto", "float32", "bf16", "int8", "mixed_bfloat16", "mixed_float16")
DEFAULT_PRECISION = "auto"
#: What ``--precision auto`` picks for OpenVINO on a CPU with bf16 (the one place to change it).
OPENVINO_BF16_AUTO = "bf16"
#: Bumped when the converted graph's layout changes (part of every conversion key).
CONVERSION_FORMAT = 1
CACHE_ENV = "FEATCACHE_CACHE_DIR"


# ---------------------------------------------------------------------------- choosing

@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


#: CPU flags of the instructions that make int8 arithmetic pay: VNNI (AVX-512 or AVX)
#: and AMX; without them OpenVINO emulates int8 dot products with AVX2 multiplies.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_has_fast_int8() -> bool:
    """True when the CPU has VNNI or AMX int8 instructions (:data:`INT8_FLAGS`)."""
    return bool(set(INT8_FLAGS) & cpu_flags())


def nncf_available() -> bool:
    """True when NNCF (the quantizer of ``--precision int8``) can be imported (cheap:
    looks it up without importing it)."""
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


def float_precision(runtime: str) -> str:
    """The fastest float precision ``runtime`` has on this CPU: ``bf16`` for OpenVINO on a
    CPU with native bfloat16, else ``float32``."""
    return OPENVINO_BF16_AUTO if runtime == "openvino" and cpu_has_bf16() else "float32"


#: What ``--precision auto`` picks for OpenVINO on a CPU with VNNI/AMX (the one place to
#: change it): int8 measured 2.87x float32 and 1.33x bf16 there, at 0.00 / -0.31 points of the
#: best row on all of CIFAR-10 (docs/stage-one.md, "int8").
OPENVINO_INT8_AUTO = "int8"
#: ``--precision auto`` picks int8 only for a data set of at least this many images: its
#: one-off quantization (about a minute for mobilenet_v2 on 2 cores) paid for itself from
#: about 6,000 images with mirrors against float32 (docs/own-images.md, "int8 on a small
#: folder"), later against bf16, which runs closer to int8
INT8_AUTO_MIN_IMAGES = 10_000


def auto_precision(runtime: str, images: Callable[[], int | None] | None = None) -> str:
    """What ``--precision auto`` is for ``runtime`` on this CPU, the measured rule
    (docs/stage-one.md): for OpenVINO on a CPU with VNNI or AMX int8 instructions
    (:func:`cpu_has_fast_int8`) ``int8``, with or without a cut (the frozen rows and the
    fine-tuned row from int8 activations are within 0.5 points of float32's), unless
    ``images()`` (the data set's image count, asked only then; None: not known) is below
    :data:`INT8_AUTO_MIN_IMAGES`; otherwise :func:`float_precision`. Without VNNI/AMX int8
    is not measured here (published figures: 1.3-1.8x on AVX2, and a slowdown on some
    CPUs), so it stays float."""
    if runtime == "openvino" and cpu_has_fast_int8():
        n = images() if images is not None else None
        if n is None or n >= INT8_AUTO_MIN_IMAGES:
            return OPENVINO_INT8_AUTO
    return float_precision(runtime)


def visible_gpus() -> list[str]:
    """NVIDIA GPUs the kernel shows and ``CUDA_VISIBLE_DEVICES`` does not hide: the devices
    a CUDA build of TensorFlow would use. Cheap (no TensorFlow import)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return []
    return sorted(glob.glob("/proc/driver/nvidia/gpus/*")) or \
        sorted(glob.glob("/dev/nvidia[0-9]*"))


def resolve_runtime(runtime: str) -> str:
    """``auto`` -> ``tensorflow`` when a GPU is visible, else ``openvino``."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    return "tensorflow" if visible_gpus() else "openvino"


def resolve_precision(precision: str, runtime: str,
                      images: Callable[[], int | None] | None = None) -> str:
    """``auto`` -> the default of ``runtime`` on this machine for a data set of ``images()``
    images (:func:`auto_precision`); refuse what it cannot run."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of "
                          f"{', '.join(PRECISIONS)}")
    if precision == "auto":
        return auto_precision(runtime, images)
    if precision not in RUNTIME_PRECISIONS[runtime]:
        other = {"bf16": "mixed_bfloat16 with --runtime tensorflow, or --runtime openvino",
                 "int8": "--runtime openvino (NNCF quantizes OpenVINO's graph)",
                 "mixed_bfloat16": "bf16 with --runtime openvino, or --runtime tensorflow",
                 "mixed_float16": "--runtime tensorflow (a GPU policy)"}[precision]
        raise ConfigError(f"--precision {precision} does not exist for --runtime {runtime} "
                          f"(it takes {', '.join(RUNTIME_PRECISIONS[runtime])}); use {other}")
    if precision == "bf16" and not cpu_has_bf16():
        raise ConfigError("--precision bf16: this CPU has no native bfloat16 (no avx512_bf16 "
                          "or amx_bf16 in /proc/cpuinfo); use --precision float32")
    return precision


def require_int8() -> None:
    """Refuse ``--precision int8`` where NNCF is missing (checked when stage one runs, not
    when a file is named: naming works without the virtualenv)."""
    if not nncf_available():
        raise ConfigError("--precision int8 needs NNCF, which is not installed (make install "
                          "installs it; or pip install nncf); use --precision float32")


def cache_dir() -> Path:
    """Where converted models are cached: ``$FEATCACHE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/featcache``, else ``~/.cache/featcache``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "featcache"


def runtime_version(runtime: str) -> str:
    """The version string of ``runtime`` (imports it)."""
    if runtime == "openvino":
        import openvino
        return openvino.__version__
    import tensorflow as tf
    return tf.__version__


# ---------------------------------------------------------------------------- converting

def conversion_key(*, backbone: str, weights_sha256: str, input_shape: tuple, input_dtype: str,
                   image_size: int, preprocess: str, pooling: str, flip: bool,
                   precision: str, cut: str | None = None) -> dict:
    """Everything the converted graph depends on (batch size does not: it is set at compile);
    ``cut`` only when set, so the keys of graphs without one do not change."""
    import keras
    import openvino
    import tensorflow as tf

    return {"format": CONVERSION_FORMAT, "backbone": backbone, "weights_sha256": weights_sha256,
            "input_shape": [int(d) for d in input_shape], "input_dtype": str(input_dtype),
            "image_size": int(image_size), "preprocess": preprocess, "pooling": pooling,
            "flip": bool(flip), "precision": precision, "openvino_version": openvino.__version__,
            "tensorflow_version": tf.__version__, "keras_version": keras.__version__,
            **({"cut": cut} if cut else {})}


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def convert_graph(graph: Callable, input_shape: tuple, input_dtype: str, extensions=(),
                  share_weights: bool = True):
    """``ov.convert_model`` of ``graph`` (images -> dict of outputs) traced for
    ``(None, *input_shape)`` images of ``input_dtype``; ``extensions``: OpenVINO frontend
    conversion extensions (ops the converter has no rule for).

    ``share_weights=True`` (OpenVINO's default) makes the converted model's weights *point
    into* the TensorFlow variables' memory: the Keras model must then outlive it (stage one
    keeps it). A caller that drops the Keras model after converting passes ``False`` (the
    weights are copied): otherwise the model computes with whatever reuses that memory."""
    import openvino as ov
    import tensorflow as tf

    fn = tf.function(graph, input_signature=[
        tf.TensorSpec((None, *input_shape), tf.as_dtype(input_dtype), name="images")])
    kw = {"extension": list(extensions)} if extensions else {}
    if not share_weights:
        kw["share_weights"] = False
    return ov.convert_model(fn, **kw)


#: what a failed stage-one conversion tells the user to do instead
STAGE_ONE_FALLBACK = "run it with --runtime tensorflow (make: RUNTIME=tensorflow)"


def _label(key: dict, label: str | None) -> str:
    return label or str(key.get("backbone", "the model"))


def _conversion_error(label: str, exc: BaseException, fallback: str) -> ConversionError:
    """One line: the converter's summary line naming the ops (``-- No conversion rule found
    for operations: X``) where it has one, else its first line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    ops = [ln.lstrip("- ") for ln in lines if ln.startswith(("-- No conversion rule",
                                                             "-- Conversion is failed"))]
    first = (ops or lines or [type(exc).__name__])[0]
    return ConversionError(f"OpenVINO could not convert {label} ({first[:200]}); {fallback}")


def load_or_convert(key: dict, graph: Callable | None = None, *, root: Path | None = None,
                    core=None, convert: Callable | None = None, label: str | None = None,
                    fallback: str = STAGE_ONE_FALLBACK):
    """The converted ``ov.Model`` for ``key``: from the cache, else converted and cached.

    Converted from ``graph`` (:func:`convert_graph` for ``key``'s input), or by
    ``convert()`` (returns an ``ov.Model``; called only when the cache has no entry, so
    what it loads is not loaded on a hit). Returns ``(model, converted)``. A damaged or
    mismatching entry is converted again; a cache that cannot be written is warned about
    and the conversion used all the same. A failed conversion is a :class:`ConversionError`
    that names ``label`` (default: ``key["backbone"]``) and says ``fallback``; a
    :class:`~featcache.errors.FeatcacheError` from ``convert`` is raised as it is.
    """
    import openvino as ov

    label = _label(key, label)
    core = core or ov.Core()
    entry = (root or cache_dir()) / "openvino" / _key_hash(key)[:24]
    manifest = entry / "key.json"
    if entry.exists():
        try:
            meta = json.loads(manifest.read_text())
            if meta["key"] != key:
                raise ValueError("its key differs")
            for name, digest in meta["sha256"].items():
                if _file_sha256(entry / name) != digest:
                    raise ValueError(f"{name} does not match its checksum")
            model = core.read_model(entry / "model.xml")
            log.debug("OpenVINO model of %s from the conversion cache %s", label, entry)
            return model, False
        except Exception as exc:  # noqa: BLE001 - any damage means: convert again
            log.warning("conversion cache entry %s is unusable (%s); converting again",
                        entry, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
            shutil.rmtree(entry, ignore_errors=True)
    t0 = time.perf_counter()
    log.info("converting %s to OpenVINO (once per key; cached in %s)", label, entry.parent)
    try:
        model = convert() if convert is not None else \
            convert_graph(graph, tuple(key["input_shape"]), key["input_dtype"])
    except FeatcacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
        raise _conversion_error(label, exc, fallback) from None
    log.info("converted in %.1f s", time.perf_counter() - t0)
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp", dir=entry.parent))
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
        sums = {n: _file_sha256(tmp / n) for n in ("model.xml", "model.bin")}
        (tmp / "key.json").write_text(json.dumps({"key": key, "sha256": sums}, indent=1,
                                                 sort_keys=True))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process cached the same key meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.warning("could not cache the conversion in %s (%s); it is converted again next "
                    "time", entry.parent, exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, True


# ---------------------------------------------------------------------------- running

class OpenVINOStep:
    """Runs a compiled step on batches: ``step(images) -> (features, flipped or None)``;
    :meth:`infer` gives every output of any compiled model (``featcache predict``'s too).

    One synchronous infer request: two in flight (the next batch running while this one is
    written) measured 0.97x of this on 2 cores, so it was not kept."""

    def __init__(self, compiled, *, batch: int, flip: bool = False, input_dtype: str):
        import numpy as np

        self.compiled, self.batch, self.flip = compiled, batch, flip
        self.dtype = np.dtype(input_dtype)
        self._request = compiled.create_infer_request()
        names = {name for o in compiled.outputs for name in o.get_names()}
        self._ports = [compiled.output(n) for n in ("features", "features_flip")[:1 + flip]
                       if n in names]

    def _padded(self, images):
        import numpy as np

        images = np.ascontiguousarray(images, dtype=self.dtype)
        n = len(images)
        if n == self.batch:
            return images
        if n > self.batch:
            raise ValueError(f"batch of {n} images; this step was compiled for {self.batch}")
        pad = np.zeros((self.batch - n, *images.shape[1:]), self.dtype)
        return np.concatenate([images, pad])

    def _outputs(self, req, n: int):
        feats = req.get_tensor(self._ports[0]).data[:n].copy()
        flipped = req.get_tensor(self._ports[1]).data[:n].copy() if self.flip else None
        return feats, flipped

    def __call__(self, images):
        self._request.infer({0: self._padded(images)})
        return self._outputs(self._request, len(images))

    def infer(self, images) -> list:
        """Every output of the compiled model for ``images`` (at most ``batch``; a short
        batch is padded and the padding cut off), in the model's output order."""
        n = len(images)
        self._request.infer({0: self._padded(images)})
        return [self._request.get_output_tensor(i).data[:n].copy()
                for i in range(len(self.compiled.outputs))]

    def outputs(self, images) -> dict:
        """Every named output for ``images`` (the activations at a cut too) as a dict."""
        n = len(images)
        self._request.infer({0: self._padded(images)})
        names = {name for o in self.compiled.outputs for name in o.get_names()}
        return {name: self._request.get_tensor(self.compiled.output(name)).data[:n].copy()
                for name in ("features", "features_flip", "acts", "acts_flip") if name in names}


def compile_cached(key: dict, graph: Callable | None = None, *, batch: int,
                   threads: int | None = None, root: Path | None = None,
                   convert: Callable | None = None, label: str | None = None,
                   fallback: str = STAGE_ONE_FALLBACK):
    """The compiled OpenVINO model for ``key`` at ``batch``: converted (or read from the
    cache) by :func:`load_or_convert`, reshaped to ``(batch, *key["input_shape"])`` and
    compiled for the CPU with ``key["precision"]`` as ``INFERENCE_PRECISION_HINT``.

    A failure to convert or compile becomes one :class:`ConversionError` line that names
    ``label`` and says ``fallback`` (the TensorFlow runtime)."""
    import openvino as ov

    precision = key["precision"]
    core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for name, cap in (("bf16", "BF16"), ("int8", "INT8")):
        if precision == name and cap not in caps:
            raise ConfigError(f"--precision {name}: OpenVINO reports no {cap} support on this "
                              "CPU; use --precision float32")
    model, _ = load_or_convert(key, graph, root=root, core=core, convert=convert, label=label,
                               fallback=fallback)
    # an int8 model runs its quantized ops in int8 whatever the hint; the rest (resize,
    # preprocessing, pooling) stays float32
    config = {"PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        model.reshape({model.inputs[0]: [batch, *key["input_shape"]]})
        return core.compile_model(model, "CPU", config)
    except Exception as exc:  # noqa: BLE001 - an op the CPU plugin cannot compile
        raise _conversion_error(_label(key, label), exc, fallback) from None


def openvino_step(graph: Callable, key: dict, *, batch: int, threads: int | None = None,
                  root: Path | None = None) -> OpenVINOStep:
    """Convert (or load from the cache) and compile ``graph`` for ``key`` at ``batch``.

    A failure to convert or compile becomes one :class:`ConversionError` line that names
    the TensorFlow fallback.
    """
    compiled = compile_cached(key, graph, batch=batch, threads=threads, root=root)
    return OpenVINOStep(compiled, batch=batch, flip=key["flip"], input_dtype=key["input_dtype"])
