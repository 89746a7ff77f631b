"""Stage one's input size and precision, for users choosing settings for a time budget:
stage-one images/s and the best row's test accuracy for ``--size`` 128 / 160 / 192 / 224
at OpenVINO float32, bf16 (where the CPU has it) and int8, on a stated CIFAR-10 subset.

Each configuration is extracted (with mirrors, as ``make features`` does) into
``bench-out/precision_size/`` and compared with ``make heads``' default heads (best row
chosen on validation, test scored once); the speed is the steady-state images/s of that
extraction, the configurations run one after another on an otherwise idle machine.

Reads CIFAR-10 (FEATCACHE_REAL_DATA, data/ or ../shared/data) and the ImageNet weights;
writes the feature files and their reports; prints one markdown row per configuration and
writes them to ``bench-out/precision_size/table.md``.

    KERAS_HOME=... python -m benchmarks.studies.precision_size [--limit 5000] [--sizes ...]
"""
import argparse
import json
import time
from pathlib import Path

from featcache._util import paths

paths.keras_home()  # a writable KERAS_HOME before Keras is imported
DATA = str(paths.find_cifar10() or "../shared/data")

from featcache import compare_heads  # noqa: E402
from featcache.backbones.runtime import INT8_FLAGS, cpu_flags, cpu_has_bf16  # noqa: E402
from featcache.config import ExtractConfig  # noqa: E402
from featcache.extract.run import extract_features  # noqa: E402

OUT = Path("bench-out/precision_size")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=5000, help="images per split")
    p.add_argument("--sizes", default="128,160,192,224")
    p.add_argument("--precisions", default=None, help="default: float32,bf16 (if any),int8")
    args = p.parse_args()
    precisions = (args.precisions.split(",") if args.precisions else
                  ["float32"] + (["bf16"] if cpu_has_bf16() else []) + ["int8"])
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    flags = sorted(set(INT8_FLAGS) & cpu_flags()) or ["no VNNI/AMX"]
    print(f"CIFAR-10, {args.limit:,} train / {args.limit:,} test images, mobilenet_v2, with "
          f"mirrors; int8 instructions: {', '.join(flags)}")
    header = ("| size | precision | stage one img/s | stage one s | best row | best-row test "
              "accuracy | 95% interval |\n| --- | --- | --- | --- | --- | --- | --- |")
    print(header)
    for size in [int(s) for s in args.sizes.split(",")]:
        for prec in precisions:
            cfg = ExtractConfig(data_dir=DATA, size=size, precision=prec, runtime="openvino",
                                limit=args.limit, out_dir=str(OUT), download=False)
            stamps = []
            t0 = time.perf_counter()
            res = extract_features(cfg, progress=lambda q: stamps.append(
                (time.perf_counter(), q.done)))
            total = time.perf_counter() - t0
            if len(stamps) > 4:   # steady state: past the first batches
                (ta, na), (tb, nb) = stamps[2], stamps[-1]
                rate = (nb - na) / (tb - ta)
            else:
                rate = res.images_per_s
            comp = compare_heads(res.path)
            best = comp.best
            lo, hi = best["ci95"]
            row = {"size": size, "precision": prec, "images_per_s": rate, "seconds": total,
                   "cached": res.cached, "best_row": comp.best_row,
                   "test_accuracy": best["test_accuracy"], "ci95": [lo, hi]}
            rows.append(row)
            print(f"| {size} | {prec} | {rate:.1f} | {total:.0f}{' (cached)' if res.cached else ''}"
                  f" | {comp.best_row} | {100 * best['test_accuracy']:.2f}% | "
                  f"{100 * lo:.1f}-{100 * hi:.1f} |", flush=True)
    (OUT / "table.json").write_text(json.dumps(rows, indent=1))
    lines = [header] + [
        f"| {r['size']} | {r['precision']} | {r['images_per_s']:.1f} | {r['seconds']:.0f} | "
        f"{r['best_row']} | {100 * r['test_accuracy']:.2f}% | {100 * r['ci95'][0]:.1f}-"
        f"{100 * r['ci95'][1]:.1f} |" for r in rows]
    (OUT / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
