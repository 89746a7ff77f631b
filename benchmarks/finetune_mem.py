"""Section 7: the ``finetune`` head's peak memory at two row counts (flat in rows), and its
training throughput.

Writes a synthetic feature file with activations at a cut (``write_activation_file``: the
layout of ``featcache features --cut``, random class-dependent activations, no backbone run)
for each row count under ``<work_dir>/s7_finetune/``, then runs ``python -m featcache heads
FILE --heads finetune --workers 0`` on it in a child process (through
:func:`benchmarks.processes.run_child`, so the peak RSS is the child's own) and reads its
``results.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def write_activation_file(path, *, n_train: int, n_test: int, shape=(7, 7, 320),
                          n_classes: int = 10, backbone: str = "mobilenet_v2",
                          cut: str = "block_16", weights: str = "none", flip: bool = True,
                          seed: int = 0, block: int = 256) -> Path:
    """A complete feature file with activations at ``cut`` (float16) and pooled features,
    written block by block like stage one (memory flat in rows). Class ``c``'s activations
    are a fixed random pattern plus noise, so a head can learn them."""
    from featcache.backbones.registry import get_backbone
    from featcache.cache.activations import ActivationWriter
    from featcache.cache.writer import SplitSpec

    dim = get_backbone(backbone).dim
    rng = np.random.default_rng(seed)
    patterns = rng.normal(0, 1, (n_classes, *shape)).astype(np.float32)
    attrs = {"config_sha256": f"synthetic-{seed}-{n_train}-{n_test}", "dataset": "synthetic",
             "backbone": backbone, "weights": weights, "weights_source": weights,
             "image_size": 224, "pooling": "avg", "seed": 0, "cut": cut, "cut_layer": cut,
             "batch_size": block}
    splits = {"train": SplitSpec(n_train), "test": SplitSpec(n_test)}
    writer_cls = ActivationWriter.for_shape(shape)
    with writer_cls.open(path, attrs=attrs, classes=[f"class_{i}" for i in range(n_classes)],
                         splits=splits, dim=dim, flip=flip, force=True) as w:
        if w.complete:
            return Path(path)
        for split, n in (("train", n_train), ("test", n_test)):
            for lo in range(0, n, block):
                m = min(block, n - lo)
                y = (np.arange(lo, lo + m) % n_classes).astype(np.int64)
                acts = patterns[y] + rng.normal(0, 2.0, (m, *shape)).astype(np.float32)
                feats = rng.normal(0, 1, (m, dim)).astype(np.float32)
                w.write(split, feats, y, feats if flip else None, acts=acts,
                        acts_flip=acts[:, :, ::-1] if flip else None)
        w.mark_complete()
    return Path(path)


def run(s) -> dict:
    """Peak RSS and seconds of ``featcache heads --heads finetune`` at two row counts."""
    from .processes import run_child

    work = Path(s.work_dir) / "s7_finetune"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sizes = (200, 800) if s.mode == "quick" else (2000, 8000)
    shape = (2, 2, 320) if s.mode == "quick" else (7, 7, 320)
    out = {"shape": list(shape), "runs": []}
    for n in sizes:
        path = write_activation_file(work / f"acts_{n}.h5", n_train=n, n_test=n // 5,
                                     shape=shape)
        report = work / f"report_{n}"
        cmd = [sys.executable, "-m", "featcache", "heads", str(path), "-q", "--heads",
               "finetune", "--workers", "0", "--out-dir", str(report)]
        r = run_child(cmd)
        if r["rc"] != 0:
            raise RuntimeError(f"`{' '.join(map(str, cmd))}` exited {r['rc']}:\n{r['output']}")
        res = json.loads((report / "results.json").read_text()) if r["rc"] == 0 else {}
        row = (res.get("rows") or [{}])[0]
        hist = row.get("selection") or []
        out["runs"].append({"rows": n, "rc": r["rc"], "seconds": r["seconds"],
                            "peak_rss_mb": r["peak_rss_mib"],
                            "file_mb": path.stat().st_size / 2**20,
                            "select_s": row.get("select_s"), "epochs":
                                (hist[0]["params"].get("epochs") if hist else None)})
        log.info("finetune on %d rows: peak RSS %.0f MiB, %.1f s", n, r["peak_rss_mib"],
                 r["seconds"])
    a, b = out["runs"]
    out["rss_growth_mb"] = b["peak_rss_mb"] - a["peak_rss_mb"]
    out["file_growth_mb"] = b["file_mb"] - a["file_mb"]
    return out


def report_lines(d: dict, r: dict) -> list[str]:
    """Section 7 of BENCHMARKS.md."""
    shape = "x".join(map(str, d["shape"]))
    L = ["## 7. finetune: peak memory is flat in the number of rows", "",
         f"`featcache heads FILE --heads finetune --workers 0` on synthetic feature files "
         f"with {shape} float16 activations at a cut (mirrors too), in a child process; "
         f"activations are streamed from the file in row blocks.", ""]
    rows = [[f"{x['rows']:,}", f"{x['file_mb']:.0f}", f"{x['peak_rss_mb']:.0f}",
             f"{x['seconds']:.1f}", str(x.get("epochs"))] for x in d["runs"]]
    L += ["| training rows | file MiB | peak RSS MiB | wall s | epochs |",
          "| --- | --- | --- | --- | --- |"] + ["| " + " | ".join(row) + " |" for row in rows]
    L += ["", f"The file grows by {d['file_growth_mb']:.0f} MiB, peak RSS by "
              f"{d['rss_growth_mb']:.0f} MiB."]
    return L
