"""``featcache merge``, ``export`` and ``predict``: joining shard parts, and shipping one
model (raw images -> classes). Registered with :mod:`featcache.cli.main` when it builds its parser;
prints and exits like it (errors from below become one line)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from featcache.cli.base import ProgressBar, command, escape_name, options

# ---------------------------------------------------------------------------- merge

def _merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="the part files (<name>.partIofN.h5), or the one feature file to "
                        "merge into (its parts are found beside it)")
    p.add_argument("-o", "--output", default=None,
                   help="merged file (default: the name the parts share, without .partIofN)")
    p.add_argument("--remove-parts", action="store_true",
                   help="delete the part files once the merged file is complete")
    p.add_argument("--force", action="store_true",
                   help="replace a merged file made with another configuration")
    p.add_argument("--wait", action="store_true",
                   help="wait for another process writing the merged file instead of refusing")


@command("merge", help="join the part files of `features --shard I/N` into one feature file")
@options(_merge_options)
def cmd_merge(args) -> int:
    from featcache.cache.merge import is_part, merge
    from featcache.errors import ConfigError

    parts = [f for f in args.files if is_part(f)]
    others = [f for f in args.files if not is_part(f)]
    if len(others) > 1 or (others and parts) or (others and args.output):
        raise ConfigError("give either part files (<name>.partIofN.h5, with -o OUT) or the "
                             "one feature file to merge into, not both")
    t0 = time.perf_counter()
    out = merge(others[0] if others else args.output, parts, force=args.force,
                wait=args.wait, remove_parts=args.remove_parts)
    print(f"merged into {out} ({out.stat().st_size / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------- export and predict

def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("feature_file", help="the feature file whose backbone the model uses")
    p.add_argument("--head", default=None,
                   help="a head fitted by `featcache heads` (default: the comparison's best)")
    p.add_argument("--head-file", default=None, help="a saved head file instead (.joblib/.keras)")
    p.add_argument("--format", default=None, choices=("keras", "savedmodel", "tflite"),
                   help="keras (one .keras file, the default), savedmodel (a TensorFlow "
                        "SavedModel folder) or tflite (takes images resized to the model's "
                        "size); default: from --output's suffix, else keras")
    p.add_argument("--output", default=None,
                   help="the model to write, ending in .keras, .savedmodel or .tflite "
                        "(default: <report dir>/<stem>_<head>.<format>); its class names go "
                        "beside it in <output>.json")
    p.add_argument("--report-dir", default=None,
                   help="where results.json is (default: the feature file's path without .h5)")
    p.add_argument("--weights", default=None,
                   help="the backbone weight file, if not where the features were made from")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None,
                     help="also run the mirrored image and average (default: as compared)")
    tta.add_argument("--no-tta", dest="tta", action="store_false")


@command("export", help="one model (Keras, SavedModel or TFLite): raw images -> resize -> "
                        "backbone -> fitted head, plus <model>.json with the class names")
@options(_export_options)
def cmd_export(args) -> int:
    from featcache.ship.export import export_model

    result = export_model(args.feature_file, head=args.head, head_file=args.head_file,
                          output=args.output, report_dir=args.report_dir,
                          weights=args.weights, tta=args.tta, format=args.format)
    print(result.summary())
    return 0


#: ``featcache predict`` draws a progress bar (stderr) for more files than this
PROGRESS_FROM = 300


def _predict_options(p: argparse.ArgumentParser) -> None:
    from featcache.ship.engines import (
        DEFAULT_PRECISION,
        DEFAULT_RUNTIME,
        PRECISIONS,
        RUNTIMES,
    )

    p.add_argument("model", help="a model written by `featcache export` (.keras, .savedmodel "
                                 "or .tflite, with its <model>.json beside it)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG/PNG/BMP/GIF)")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image")
    p.add_argument("--batch", type=int, default=32, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON (one list) for machines")
    # no argparse choices: a bad name is featcache's one-line error, listing the choices
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, metavar="|".join(RUNTIMES),
                   help="what runs the model: auto = openvino on a CPU (converted once, "
                        "cached), tensorflow when a GPU is visible to TensorFlow; tensorflow "
                        "runs .tflite on TFLite's interpreter (default: %(default)s)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, metavar="|".join(PRECISIONS),
                   help="auto = bf16 with openvino on a CPU with native bfloat16 "
                        "(AVX512-BF16/AMX), else float32; float32 gives TensorFlow's "
                        "probabilities (default: %(default)s)")


@command("predict", help="classify image files with an exported model (top-k classes)")
@options(_predict_options)
def cmd_predict(args) -> int:
    """Rows are printed batch by batch as they are done; a file that cannot be read gets
    one line on stderr and the rest still run; the exit status is 2 if any failed. More
    than ``PROGRESS_FROM`` files get a progress bar on stderr (not with ``--quiet``)."""
    from featcache.ship.predict import iter_predictions

    bar = ProgressBar() if len(args.images) > PROGRESS_FROM and not args.quiet else None
    same_terminal = bar is not None and bar.tty and sys.stdout.isatty()
    bad = done = 0
    if args.json:
        print("[", flush=True)
    for rows in iter_predictions(args.model, args.images, top_k=args.top_k, batch=args.batch,
                                 runtime=args.runtime, precision=args.precision,
                                 progress=bar):
        if bar is not None and (same_terminal or any("error" in r for r in rows)):
            bar.clear()  # lines go where the bar is; it is drawn again below them
        for row in rows:
            if "error" in row:
                bad += 1
                print(f"featcache: error: {escape_name(row['error'])}", file=sys.stderr)
            elif args.json:
                print(("," if done else "") + json.dumps(row))
                done += 1
            else:
                tops = "  ".join(f"{t['class']} {100 * t['probability']:.1f}%"
                                 for t in row["top"])
                print(f"{escape_name(row['image'])}: {tops}")
                done += 1
        sys.stdout.flush()
        sys.stderr.flush()
    if args.json:
        print("]")
    return 2 if bad else 0
