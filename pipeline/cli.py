"""The ``featcache`` command (also ``python -m pipeline``): argparse front end for every stage.

The only module that prints or exits. Each sub-command is one function registered with
``@command``; a :class:`~pipeline.errors.FeatcacheError` from below becomes one line on
stderr (``featcache: error: …``) and a non-zero exit, Ctrl-C exits 130. Heavy imports
(TensorFlow, scikit-learn) happen inside the commands, so ``--help`` and ``path`` are fast
and work without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Callable

from .errors import FeatcacheError
from .quiet import quiet_tensorflow

log = logging.getLogger("pipeline")

COMMANDS: dict[str, tuple[Callable, Callable, str]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> int`` as a sub-command; ``fn.configure(parser)`` adds options."""
    def deco(fn):
        COMMANDS[name] = (fn, getattr(fn, "configure", lambda p: None), help)
        return fn
    return deco


def options(configure: Callable):
    """Attach an argparse configurator to a command function."""
    def deco(fn):
        fn.configure = configure
        return fn
    return deco


# ---------------------------------------------------------------------------- stage one

def _extract_options(p: argparse.ArgumentParser) -> None:
    from .backbones import BACKBONES, POOLINGS, PREPROCESS_MODES
    from .config import DEFAULT_BACKBONE, DEFAULT_BATCH
    from .runtime import DEFAULT_PRECISION, DEFAULT_RUNTIME, PRECISIONS, RUNTIMES

    env = os.environ.get
    p.add_argument("--dataset", default=env("FEATCACHE_DATASET", "cifar10"),
                   help="cifar10, synthetic, or a folder with one sub-folder per class")
    p.add_argument("--data-dir", default=env("FEATCACHE_DATA_DIR", "data"),
                   help="where cifar-10-batches-py is (or is downloaded to); default: data")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES),
                   metavar="NAME", help=f"one of: {', '.join(sorted(BACKBONES))}")
    p.add_argument("--size", type=int, default=None,
                   help="input size in px the images are resized to (default: the backbone's)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="images per forward pass")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (Keras cache / KERAS_HOME), none (random), or a .h5 path")
    p.add_argument("--preprocess", choices=sorted(PREPROCESS_MODES), default=None,
                   help="override the backbone's own preprocessing (scale01 = the tutorial's /255)")
    p.add_argument("--pooling", choices=POOLINGS, default="avg")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored feature dtype")
    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help="what runs the backbone: auto = openvino on a CPU, tensorflow when "
                        "a GPU is visible")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="auto = bf16 with openvino on a CPU with AVX512-BF16/AMX, else "
                        "float32; bf16 (openvino), mixed_bfloat16 / mixed_float16 (tensorflow "
                        "Keras policies)")
    p.add_argument("--flip", action="store_true",
                   help="also store features of horizontally flipped images")
    p.add_argument("--xla", action="store_true", help="compile the forward pass with XLA")
    p.add_argument("--limit", type=int, default=None, help="at most N images per split")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="image folders without train/ and test/: the test share (stratified)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="features")
    p.add_argument("--variant", default=None,
                   help="name suffix (default: derived from the non-default settings)")
    p.add_argument("--output", default=None, help="explicit output path (overrides naming)")
    p.add_argument("--shard", default=None, help="i/n: extract only the i-th of n slices")
    p.add_argument("--no-download", action="store_true", help="never try to download data")
    p.add_argument("--force", action="store_true",
                   help="rebuild a feature file made with another configuration")
    p.add_argument("--wait", action="store_true",
                   help="wait for another process writing the same file instead of refusing")


def _extract_config(args):
    from .config import ExtractConfig, parse_shard

    return ExtractConfig(
        dataset=args.dataset, data_dir=args.data_dir, backbone=args.backbone, size=args.size,
        batch=args.batch, weights=args.weights, preprocess=args.preprocess,
        pooling=args.pooling, dtype=args.dtype, runtime=args.runtime,
        precision=args.precision, flip=args.flip,
        xla=args.xla, limit=args.limit, val_fraction=args.val_fraction, seed=args.seed,
        out_dir=args.out_dir, variant=args.variant, output=args.output,
        shard=parse_shard(args.shard), download=not args.no_download, force=args.force,
        wait=args.wait)


class ProgressBar:
    """Draws ``split [#####.....] 1234/60000 115.2 img/s ETA 8m40s`` on stderr (stage one's
    ``Progress``), or ``heads [#####.....] 3/8 elapsed 0m41s ETA 1m02s`` for a progress
    object with ``elapsed_s`` instead of ``images_per_s`` (stage two's ``HeadsProgress``).
    A progress object's ``message`` (e.g. a finished row) is printed on a line of its own
    above the bar."""

    def __init__(self, stream=sys.stderr, width: int = 28):
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self._last = 0.0
        self._final = False

    def __call__(self, p) -> None:
        now = time.monotonic()
        final = p.done >= p.total
        message = getattr(p, "message", "")
        if message:
            self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        elif self._final or (not final and now - self._last < (0.2 if self.tty else 15.0)):
            return
        self._last = now
        self._final = final
        frac = p.done / p.total if p.total else 1.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        eta = "--" if p.eta_s == float("inf") else f"{int(p.eta_s // 60)}m{int(p.eta_s % 60):02d}s"
        rate = (f"{p.images_per_s:6.1f} img/s" if hasattr(p, "images_per_s") else
                f"elapsed {int(p.elapsed_s // 60)}m{int(p.elapsed_s % 60):02d}s")
        line = f"{p.split:>5} [{bar}] {p.done}/{p.total} {rate} ETA {eta}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@command("features", help="stage one: run a backbone over a dataset once, cache features")
@options(lambda p: (_extract_options(p),
                    p.add_argument("--engine", choices=("local", "ray"), default="local",
                                   help="ray: run --shards parts as Ray tasks, then merge"),
                    p.add_argument("--shards", type=int, default=2,
                                   help="with --engine ray: how many parts"),
                    p.add_argument("--ray-address", default=None,
                                   help="with --engine ray: an existing cluster (default: local)")))
def cmd_features(args) -> int:
    cfg = _extract_config(args)
    if args.engine == "ray":
        from .distributed import extract_with_ray

        result = extract_with_ray(cfg, shards=args.shards, address=args.ray_address)
    else:
        from .extract import extract_features

        result = extract_features(cfg, progress=None if args.quiet else ProgressBar())
    print(result.summary())
    return 0


@command("path", help="print the feature file path the given settings write (no TensorFlow)")
@options(_extract_options)
def cmd_path(args) -> int:
    print(_extract_config(args).output_path)
    return 0


@command("info", help="print a feature file's provenance attributes as JSON")
@options(lambda p: p.add_argument("feature_file"))
def cmd_info(args) -> int:
    from .store import read_attrs

    print(json.dumps(read_attrs(args.feature_file), indent=2, sort_keys=True))
    return 0


def _upgrade_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="feature files (.h5 or .h5.partial) to migrate")
    p.add_argument("--wait", action="store_true",
                   help="wait for another process writing a file instead of refusing")


@command("upgrade", help="migrate feature files of an older schema in place (adds row ids)")
@options(_upgrade_options)
def cmd_upgrade(args) -> int:
    from .upgrade import upgrade

    for path in args.files:
        print(upgrade(path, wait=args.wait))
    return 0


@command("backbones", help="list the backbone registry (markdown table)")
def cmd_backbones(args) -> int:
    from .backbones import BACKBONES

    print("| name | preprocess | default size | min size | dim | offline weights here |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in sorted(BACKBONES.items()):
        have = "yes" if s.offline_weights and s.offline_weights.is_file() else "no"
        print(f"| {name} | {s.preprocess} | {s.default_size} | {s.min_size} | {s.dim} | {have} |")
    return 0


# ---------------------------------------------------------------------------- scale-out (issue #5)

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
    from .errors import ConfigError
    from .merge import is_part, merge

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


# ---------------------------------------------------------------------------- export and predict (issue #4)

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
    from .export import export_model

    result = export_model(args.feature_file, head=args.head, head_file=args.head_file,
                          output=args.output, report_dir=args.report_dir,
                          weights=args.weights, tta=args.tta, format=args.format)
    print(result.summary())
    return 0


def _predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model written by `featcache export` (.keras, .savedmodel "
                                 "or .tflite, with its <model>.json beside it)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG/PNG/BMP/GIF)")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image")
    p.add_argument("--batch", type=int, default=32, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON (one list) for machines")


def escape_name(name: str) -> str:
    """A file name on one line of text output: backslash and control characters (a newline
    in a name) are written as escapes (``\\n``, ``\\x1b``); other characters as they are."""
    out = []
    for ch in str(name):
        if ch == "\\":
            out.append("\\\\")
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


@command("predict", help="classify image files with an exported model (top-k classes)")
@options(_predict_options)
def cmd_predict(args) -> int:
    """Rows are printed batch by batch as they are done; a file that cannot be read gets
    one line on stderr and the rest still run; the exit status is 2 if any failed."""
    from .export import iter_predictions

    bad = done = 0
    if args.json:
        print("[", flush=True)
    for rows in iter_predictions(args.model, args.images, top_k=args.top_k, batch=args.batch):
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


# ---------------------------------------------------------------------------- stage two: heads and curve (issue #3)

def _heads_options(p: argparse.ArgumentParser, *, curve: bool = False) -> None:
    p.add_argument("feature_file", nargs="?", help="a complete feature file (.h5)")
    p.add_argument("--heads", default=None,
                   help="comma-separated heads (default: the registry's defaults; "
                        "`featcache heads --list` shows them)")
    p.add_argument("--wait", action="store_true",
                   help="wait for another run writing the same report instead of refusing")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="stratified share of the training rows used for selection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None,
                   help="report folder (default: features/<stem>/ beside the feature file)")
    p.add_argument("--search", choices=("fast", "exhaustive"), default="fast",
                   help="fast: stop a C path once validation accuracy falls, keep the "
                        "early-stopped dense model; exhaustive: every grid point, every "
                        "head refit (the protocol before issue 12)")
    if curve:
        p.add_argument("--sizes", default="10,50,100,500,all",
                       help="labelled examples per class, comma-separated ('all' = every row)")
    else:
        p.add_argument("--flip", default="auto", choices=("auto", "off", "train", "tta", "both"),
                       help="rows using mirrored features: auto = '<head>+flip' rows (train on "
                            "plain+mirrored, average both at test) when the file has them")
        p.add_argument("--workers", type=int, default=None,
                       help="worker processes, one thread each (default: the cores available "
                            "to this process; 0: everything in this process, one row after "
                            "another); any count gives the same results")
        p.add_argument("--list", action="store_true", help="list the head registry and exit")


def _report_lock(report_dir, wait: bool):
    """The lock stage one takes (:class:`pipeline.store.FileLock`), on ``<report dir>.lock``
    beside the report folder (so a refused run creates no folder), around one stage-two
    run: a second ``heads``/``curve`` on the same report refuses (one line naming the
    holder's pid) or, with ``--wait``, queues behind the first."""
    from .store import FileLock

    return FileLock(report_dir, wait=wait)


def _heads_config(args):
    from .config import HeadsConfig
    from .errors import ConfigError

    if not args.feature_file:
        raise ConfigError("give a feature file, e.g. featcache heads "
                          "features/cifar10_mobilenet_v2_224_flip.h5")
    heads = tuple(h for h in (args.heads or "").replace(" ", "").split(",") if h)
    if args.heads is not None and not heads:
        raise ConfigError(f"--heads {args.heads!r} names no head; give comma-separated names "
                          f"(`featcache heads --list` shows them), or leave --heads out for "
                          f"the defaults")
    return HeadsConfig(feature_file=args.feature_file, heads=heads,
                       val_fraction=args.val_fraction, seed=args.seed,
                       flip=getattr(args, "flip", "off"), out_dir=args.out_dir,
                       workers=getattr(args, "workers", None), search=args.search)


@command("heads", help="stage two: select, fit and compare heads on a feature file; "
                       "write features/<stem>/results.json and the report")
@options(_heads_options)
def cmd_heads(args) -> int:
    from .heads import HEADS, resolve_heads

    if args.list:
        print("| head | default | grid | Keras export | what |")
        print("| --- | --- | --- | --- | --- |")
        for name, s in HEADS.items():
            grid = "; ".join(", ".join(f"{k}={v}" for k, v in g.items()) for g in s.grid)
            print(f"| {name} | {'yes' if s.default else 'no'} | {grid} | "
                  f"{'yes' if s.keras else 'no'} | {s.summary} |")
        return 0
    cfg = _heads_config(args)
    resolve_heads(cfg.heads)  # unknown names fail before anything is read
    from .compare import compare_heads
    from .report import format_mcnemar, format_table

    t0 = time.perf_counter()
    with _report_lock(cfg.report_dir, args.wait):
        results = compare_heads(cfg, progress=None if args.quiet else ProgressBar())
    print(format_table(results))
    print()
    sig = [p for p in results["mcnemar"] if p["significant"]]
    print(f"significant differences (exact McNemar, Holm, p<0.05): {len(sig)} of "
          f"{len(results['mcnemar'])} pairs; see report.md")
    print(f"best row (highest validation accuracy): {results['best_row']}; "
          f"{time.perf_counter() - t0:.1f} s; report: {cfg.report_dir}/report.md, "
          f"plots: {cfg.report_dir}/accuracy.png, {cfg.report_dir}/confusion.png")
    return 0


@command("curve", help="label-efficiency curve: test accuracy vs labelled examples per class")
@options(lambda p: _heads_options(p, curve=True))
def cmd_curve(args) -> int:
    from .errors import ConfigError
    from .heads import resolve_heads

    cfg = _heads_config(args)
    resolve_heads(cfg.heads)
    sizes = []
    for s in args.sizes.split(","):
        s = s.strip().lower()
        if s == "all":
            sizes.append(None)
        elif s.isdigit() and int(s) > 0:
            sizes.append(int(s))
        else:
            raise ConfigError(f"--sizes takes positive counts or 'all', not {s!r}")
    from .compare import label_curve
    from .report import curve_table

    with _report_lock(cfg.report_dir, args.wait):
        results = label_curve(cfg, sizes=tuple(sizes))
    print(curve_table(results))
    print(f"{results['wall_s']:.1f} s; plot: {cfg.report_dir}/curve.png, "
          f"table: {cfg.report_dir}/curve.md")
    return 0


# ---------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="featcache",
        description="Run a pretrained backbone once, cache its features, compare heads on them.")
    parser.add_argument("--version", action="version", version=f"featcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (fn, configure, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="debug logging, and TensorFlow's own start-up lines")
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_tensorflow(args.verbose)  # before any command imports TensorFlow
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        return args.func(args)
    except FeatcacheError as exc:
        print(f"featcache: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("featcache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
