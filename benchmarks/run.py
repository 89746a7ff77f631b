"""``python -m benchmarks [--quick] [--out BENCHMARKS.md]``: run the nine sections, print
what was measured as it goes, write the markdown report, its chart and a JSON dump.

Writes ``--out`` (default ``BENCHMARKS.md``; ``--quick``: ``bench-out/BENCHMARKS.md``),
``--chart`` (default ``docs/bench.png`` beside it; ``--quick``: ``bench-out/bench.png``) and
``<work_dir>/bench.json``; scratch feature files go to ``--work-dir``
(default ``bench-out/``, git-ignored). This is the benchmark's command line: the one
module here that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import env

SECTIONS = {1: "tutorial vs featcache", 2: "stage one vs bare backbone",
            3: "peak RSS", 4: "stage two", 5: "cache hit", 6: "stage one runtimes",
            7: "finetune memory", 8: "predict runtimes",
            9: "fine-tuning: the usual way vs from the cache"}
#: ``--quick`` leaves section 7 out unless named: its two children (TensorFlow, a backbone
#: rebuilt, two training runs) would add about a minute to the smoke run CI makes. Section
#: 9 at quick sizes (128 images at 64 px, 1 + 2 epochs each way) adds about 10 s.
QUICK_SECTIONS = "1,2,3,4,5,6,8,9"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="featcache's benchmark: nine sections measured side by side in one run "
                    "-> BENCHMARKS.md + a PNG chart (see docs/benchmarks.md).")
    p.add_argument("--quick", action="store_true",
                   help="the one-minute smoke version (tiny subsets, 64 px): checks it runs")
    p.add_argument("--out", default=None,
                   help="markdown report (default: BENCHMARKS.md; with --quick "
                        "<work-dir>/BENCHMARKS.md, so a smoke run never replaces the "
                        "published page)")
    p.add_argument("--chart", default=None,
                   help="PNG chart (default: docs/bench.png beside --out; with --quick "
                        "<work-dir>/bench.png)")
    p.add_argument("--work-dir", default="bench-out",
                   help="scratch feature files and bench.json (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py (default: $FEATCACHE_REAL_DATA, "
                        "data/, ../shared/data; else the synthetic set)")
    p.add_argument("--dataset", choices=("cifar10", "synthetic"), default=None,
                   help="force a dataset (default: real CIFAR-10 when found)")
    p.add_argument("--weights", choices=("imagenet", "none"), default=None,
                   help="force weights (default: imagenet when found, else none)")
    p.add_argument("--feature-file", default=None,
                   help="stage two on this file (default, full mode: "
                        "the file make features writes with its defaults, when present)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of 1-{max(SECTIONS)} (default: all; "
                        f"--quick: {QUICK_SECTIONS}, section 7 only when named)")
    return p.parse_args(argv)


def report_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where the report and its chart go: the published BENCHMARKS.md and docs/bench.png for
    a full run, the work folder for ``--quick`` (unless ``--out``/``--chart`` say)."""
    if args.out:
        out = Path(args.out)
    else:
        out = Path(args.work_dir) / "BENCHMARKS.md" if args.quick else Path("BENCHMARKS.md")
    if args.chart:
        return out, Path(args.chart)
    return out, (Path(args.work_dir) / "bench.png" if args.quick and not args.out
                 else out.parent / "docs" / "bench.png")


def _fmt_settings(s: env.Settings) -> str:
    d = s.to_dict()
    d.pop("notes")
    return "\n".join(f"  {k} = {v}" for k, v in d.items())


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, datefmt="%H:%M:%S",
                        format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("featcache", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for noisy in ("tensorflow", "absl"):  # retracing chatter: every extraction is a new graph
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.sections is None:
        args.sections = QUICK_SECTIONS if args.quick else ",".join(map(str, SECTIONS))
    try:
        sections = sorted({int(x) for x in args.sections.split(",") if x.strip()})
    except ValueError:
        sections = [0]
    if not sections or not set(sections) <= set(SECTIONS):
        print(f"benchmarks: error: --sections takes numbers from 1-{max(SECTIONS)}, not "
              f"{args.sections}", file=sys.stderr)
        return 2
    out, chart = report_paths(args)
    preset = env.Settings.quick if args.quick else env.Settings.full
    s = preset(work_dir=str(Path(args.work_dir).resolve()))
    s = env.resolve(s, data_dir=args.data_dir, dataset=args.dataset, weights=args.weights,
                    feature_file=args.feature_file)

    t_start = time.perf_counter()
    info = env.machine()
    res: dict = {"settings": s.to_dict(), "machine": info, "started": env.utc_now(),
                 "load_start": env.load(), "sections": sections, "timing": {}, "load": {}}
    dev = info["device"]
    print(f"featcache benchmarks ({s.mode}) — {res['started']}")
    print(f"device used: {dev['kind']} ({dev['name']}, {dev['count']}), TensorFlow "
          f"{info['tensorflow']}, load average {res['load_start']}")
    print("settings:\n" + _fmt_settings(s))
    for note in s.notes:
        print(f"NOTE: {note}")

    from . import processes, runtimes, stage2, throughput, tutorial

    def section(n: int, fn):
        if n not in sections:
            return
        print(f"\n== {n}. {SECTIONS[n]} ...", flush=True)
        before, t0 = env.load(), time.perf_counter()
        res[f"s{n}"] = fn()
        res["timing"][f"s{n}"] = time.perf_counter() - t0
        res["load"][f"s{n}"] = [before, env.load()]
        print(f"   done in {res['timing'][f's{n}']:.0f} s, load {before} -> {env.load()}",
              flush=True)

    section(1, lambda: tutorial.run(s))
    section(2, lambda: throughput.run(s))
    section(3, lambda: processes.run_memory(s))
    s1_file = (res.get("s1") or {}).get("featcache", {}).get("path")
    s4_file = s.stage2_feature_file or s1_file
    if 4 in sections and s4_file is None:
        s4_file = tutorial.run_featcache(s, env.open_subset(s, {"train": s.n_train,
                                                               "test": s.n_test}),
                                         size=s.size, mode=_own(s), work=Path(s.work_dir),
                                         logreg=False)["path"]
    section(4, lambda: stage2.run(s4_file, seed=s.seed, work=Path(s.work_dir)))
    if 5 in sections:
        mem = res.get("s3") or processes.run_memory(s)
        section(5, lambda: processes.run_cache_hit(s, mem))

    section(6, lambda: runtimes.run(s))

    from . import finetune_mem, finetune_usual, predict

    section(7, lambda: finetune_mem.run(s))
    section(8, lambda: predict.run(s))
    section(9, lambda: finetune_usual.run(s))

    res["total_s"] = time.perf_counter() - t_start
    res["load_end"] = env.load()
    res["finished"] = env.utc_now()

    from . import report

    Path(s.work_dir).mkdir(parents=True, exist_ok=True)
    json_path = Path(s.work_dir) / "bench.json"
    json_path.write_text(json.dumps(res, indent=1, default=_json_default))
    report.write(res, out=out, chart=chart)
    print()
    print(report.headline_text(res))
    print(f"\nwrote {out}, {chart}, {json_path} in {res['total_s'] / 60:.1f} min")
    return 0


def _own(s: env.Settings) -> str:
    from featcache.backbones.registry import get_backbone

    return get_backbone(s.backbone).preprocess


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
