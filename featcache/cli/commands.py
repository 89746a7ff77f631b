"""The stage commands: ``features``, ``path``, ``info``, ``settings``, ``backbones``, ``cuts``,
``heads``, ``finetune``, ``curve``. Registered with :mod:`featcache.cli.main` when it builds its
parser.

Their options come from the settings table (:func:`featcache._util.settings.add_options` over
:class:`~featcache.config.ExtractConfig` and :class:`~featcache.config.HeadsConfig`), and the
configs from the parsed arguments (:func:`featcache._util.settings.from_args`): a setting's default,
help and choices are written once, in ``featcache/config.py``. ``--json`` prints machine
output on stdout (logs and progress stay on stderr).
"""

from __future__ import annotations

import argparse
import json
import time

from featcache.cli.base import ProgressBar, command, options


def _json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------------------- stage one

def _extract_options(p: argparse.ArgumentParser) -> None:
    from featcache._util.settings import add_options
    from featcache.config import ExtractConfig

    add_options(p, ExtractConfig)


def _extract_config(args):
    from featcache._util.settings import from_args
    from featcache.config import ExtractConfig

    return from_args(ExtractConfig, args)


@command("features", help="stage one: run a backbone over a dataset once, cache features")
@options(_extract_options)
def cmd_features(args) -> int:
    from featcache.api import extract_features

    cfg = _extract_config(args)  # resolved once, by stage one (it warns about runtime=auto)
    result = extract_features(cfg, progress=None if args.quiet else ProgressBar())
    print(result.summary())
    return 0


def _path_options(p: argparse.ArgumentParser) -> None:
    _extract_options(p)
    p.add_argument("--json", action="store_true",
                   help="print the resolved settings and the path as JSON")


@command("path", help="print the feature file path the given settings write (no TensorFlow)")
@options(_path_options)
def cmd_path(args) -> int:
    from dataclasses import asdict

    cfg = _extract_config(args).resolved()
    if args.json:
        _json({**asdict(cfg), "output": str(cfg.output_path)})
    else:
        print(cfg.output_path)
    return 0


@command("info", help="print a feature file's provenance attributes as JSON: the settings "
                      "of its cache key first (in the settings table's order), then the rest")
@options(lambda p: p.add_argument("feature_file"))
def cmd_info(args) -> int:
    from featcache.cache.reader import read_attrs
    from featcache.config import cache_key_fields

    attrs = read_attrs(args.feature_file)
    first = [k for k in cache_key_fields() if k in attrs]
    ordered = {**{k: attrs[k] for k in first},
               **{k: attrs[k] for k in sorted(attrs) if k not in first}}
    print(json.dumps(ordered, indent=2, default=str))
    return 0


def _upgrade_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="feature files (.h5 or .h5.partial) to migrate")
    p.add_argument("--wait", action="store_true",
                   help="wait for another process writing a file instead of refusing")


@command("upgrade", help="migrate feature files of an older schema in place (adds row ids)")
@options(_upgrade_options)
def cmd_upgrade(args) -> int:
    from featcache.cache.upgrade import upgrade

    for path in args.files:
        print(upgrade(path, wait=args.wait))
    return 0


@command("settings", help="list every setting: flag, default, cache key, Makefile variable")
@options(lambda p: p.add_argument("--json", action="store_true", help="print JSON"))
def cmd_settings(args) -> int:
    from featcache._util.settings import describe_settings
    from featcache.config import ExtractConfig, HeadsConfig

    rows = describe_settings(ExtractConfig, HeadsConfig)
    if args.json:
        _json(rows)
        return 0
    print("| stage | flag | default | cache key | make | what |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        stage = "features" if r["stage"] == "ExtractConfig" else "heads"
        choices = f" ({', '.join(map(str, r['choices']))})" if r["choices"] else ""
        print(f"| {stage} | {r['flag'] or r['name']} | {r['default']} | "
              f"{r['cache_key'] or ''} | {r['make'] or ''} | {r['help']}{choices} |")
    return 0


@command("backbones", help="list the backbone registry (markdown table, or --json)")
@options(lambda p: p.add_argument("--json", action="store_true", help="print JSON"))
def cmd_backbones(args) -> int:
    from featcache.backbones.registry import BACKBONES

    rows = [{"name": name, "preprocess": s.preprocess, "default_size": s.default_size,
             "min_size": s.min_size, "dim": s.dim,
             "offline_weights": bool(s.offline_weights and s.offline_weights.is_file())}
            for name, s in sorted(BACKBONES.items())]
    if args.json:
        _json(rows)
        return 0
    print("| name | preprocess | default size | min size | dim | offline weights here |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['preprocess']} | {r['default_size']} | {r['min_size']} | "
              f"{r['dim']} | {'yes' if r['offline_weights'] else 'no'} |")
    return 0


@command("cuts", help="list a backbone's cut points (for --cut): activation shape, CIFAR-10 "
                      "cache size, FLOPs above")
@options(lambda p: (p.add_argument("backbone", help="a registry name (featcache backbones)"),
                    p.add_argument("--size", type=int, default=None,
                                   help="input size in px (default: the backbone's)")))
def cmd_cuts(args) -> int:
    from featcache.backbones.cut import describe_cuts, format_cuts
    from featcache.backbones.registry import get_backbone
    from featcache.config import check_size

    spec = get_backbone(args.backbone)
    size = spec.default_size if args.size is None else check_size(args.size, spec.name)
    print(format_cuts(spec.name, size, describe_cuts(spec.name, size), recommended=spec.cut))
    return 0


# ---------------------------------------------------------------------------- stage two

def _heads_options(p: argparse.ArgumentParser, *, curve: bool = False) -> None:
    from featcache._util.settings import add_options
    from featcache.config import HeadsConfig

    # (the curve draws no images: no --data-dir)
    add_options(p, HeadsConfig,
                exclude=("flip", "workers", "data_dir", "budget") if curve else ())
    p.add_argument("--wait", action="store_true",
                   help="wait for another run writing the same report instead of refusing")
    if curve:
        p.add_argument("--sizes", default=None,
                       help="labelled examples per class, comma-separated ('all' = every row; "
                            "default: 10,50,100,500,all, those the data set has rows for)")
    else:
        p.add_argument("--list", action="store_true", help="list the head registry and exit")
        p.add_argument("--json", action="store_true",
                       help="print the results summary (or, with --list, the registry) as "
                            "JSON on stdout; logs and progress stay on stderr")


def _heads_config(args):
    from featcache._util.settings import from_args
    from featcache.config import HeadsConfig
    from featcache.errors import ConfigError

    if not args.feature_file:
        raise ConfigError("give a feature file, e.g. featcache heads "
                          "features/cifar10_mobilenet_v2_224_ov_flip.h5")
    return from_args(HeadsConfig, args, **({} if hasattr(args, "flip") else {"flip": "off"}))


def _head_registry() -> list[dict]:
    from featcache.heads import HEADS

    return [{"name": name, "default": bool(s.default), "grid": [dict(g) for g in s.grid],
             "keras": bool(s.keras), "summary": s.summary} for name, s in HEADS.items()]


def heads_summary(results: dict, report_dir) -> dict:
    """What ``featcache heads --json`` prints: every row's numbers, the best row, the
    significant pairs and where the report files are (``results.json`` has everything)."""
    keep = ("name", "head", "test_accuracy", "ci95", "macro_f1", "val_accuracy", "select_s",
            "fit_s", "predict_s_per_1000", "params", "saved")
    return {
        "feature_file": results["feature_file"], "report_dir": str(report_dir),
        "best_row": results["best_row"], "wall_s": results["wall_s"],
        "rows": [{k: r[k] for k in keep if k in r} for r in results["rows"]],
        "significant": [{k: p[k] for k in ("a", "b", "p_holm", "better") if k in p}
                        for p in results["mcnemar"] if p["significant"]],
        "files": {name: str(report_dir / name) for name in results.get("files", [])},
    }


@command("heads", help="stage two: select, fit and compare heads on a feature file; "
                       "write features/<stem>/results.json and the report")
@options(_heads_options)
def cmd_heads(args) -> int:
    if args.list:
        rows = _head_registry()
        if args.json:
            _json(rows)
            return 0
        print("| head | default | grid | Keras export | what |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            grid = "; ".join(", ".join(f"{k}={v}" for k, v in g.items()) for g in r["grid"])
            print(f"| {r['name']} | {'yes' if r['default'] else 'no'} | {grid} | "
                  f"{'yes' if r['keras'] else 'no'} | {r['summary']} |")
        return 0
    from featcache.heads import resolve_heads

    cfg = _heads_config(args)
    resolve_heads(cfg.heads)  # unknown names fail before anything is read
    from featcache.compare.comparison import compare_heads

    t0 = time.perf_counter()
    # compare_heads locks the report folder (<report dir>.lock): a second run on the same
    # report refuses in one line naming the holder's pid, or with --wait queues behind it
    results = compare_heads(cfg, progress=None if args.quiet else ProgressBar(),
                            wait=args.wait)
    return _print_comparison(results, cfg, args, t0)


def _print_comparison(results, cfg, args, t0: float) -> int:
    """What ``heads`` and ``finetune`` print: the table, the significant pairs, the time
    budgets' notes and the best row (or, with ``--json``, the summary)."""
    from featcache.compare.report import format_budgets, format_table

    if args.json:
        _json(heads_summary(results, cfg.report_dir))
        return 0
    print(format_table(results))
    print()
    if format_budgets(results):
        print(format_budgets(results))
    sig = [p for p in results["mcnemar"] if p["significant"]]
    print(f"significant differences (exact McNemar, Holm, p<0.05): {len(sig)} of "
          f"{len(results['mcnemar'])} pairs; see report.md")
    plots = ", ".join(f"{cfg.report_dir}/{f}" for f in results.get("plots", {}).values())
    print(f"best row (highest validation accuracy): {results['best_row']}; "
          f"{time.perf_counter() - t0:.1f} s; report: {cfg.report_dir}/report.md, "
          f"plots: {plots}")
    return 0


def _finetune_options(p: argparse.ArgumentParser) -> None:
    from featcache._util.settings import add_options
    from featcache.config import HeadsConfig

    # no --workers: the finetune head runs in this process on every core (HeadSpec.in_process)
    add_options(p, HeadsConfig, exclude=("workers",))
    p.add_argument("--wait", action="store_true",
                   help="wait for another run writing the same report instead of refusing")
    p.add_argument("--json", action="store_true",
                   help="print the results summary as JSON on stdout")


def no_cut_error(feature_file, backbone: str | None):
    """The one-line error for ``featcache finetune`` on a file made without ``--cut``."""
    from featcache.backbones.registry import BACKBONES
    from featcache.errors import ConfigError

    spec = BACKBONES.get(str(backbone))
    cut = spec.cut if spec is not None and spec.cut else "recommended"
    return ConfigError(f"{feature_file} was made without --cut (no activations to fine-tune "
                       f"on): run `make finetune`, or `featcache features --cut {cut}` with "
                       f"the same settings and `featcache finetune` on the file it names")


@command("finetune", help="stage two with fine-tuning: the default frozen heads and the "
                          "finetune head (the backbone's blocks above the file's cut) on a "
                          "file made with --cut, in one comparison and report")
@options(_finetune_options)
def cmd_finetune(args) -> int:
    from dataclasses import replace

    from featcache.cache.reader import read_attrs
    from featcache.heads import default_heads, resolve_heads

    cfg = _heads_config(args)
    attrs = read_attrs(cfg.feature_file)
    if not attrs.get("cut"):
        raise no_cut_error(cfg.feature_file, attrs.get("backbone"))
    # the frozen rows train on the same file's pooled features (the uncut file's, bit for
    # bit), so one comparison has them all: one table, intervals, McNemar
    frozen = [h for h in (cfg.heads or default_heads()) if h != "finetune"]
    cfg = replace(cfg, heads=(*frozen, "finetune"))
    resolve_heads(cfg.heads)
    from featcache.compare.comparison import compare_heads

    t0 = time.perf_counter()
    results = compare_heads(cfg, progress=None if args.quiet else ProgressBar(),
                            wait=args.wait)
    return _print_comparison(results, cfg, args, t0)


@command("curve", help="label-efficiency curve: test accuracy vs labelled examples per class")
@options(lambda p: _heads_options(p, curve=True))
def cmd_curve(args) -> int:
    from featcache.errors import ConfigError
    from featcache.heads import resolve_heads

    cfg = _heads_config(args)
    resolve_heads(cfg.heads)
    from featcache.compare.comparison import CURVE_SIZES, label_curve

    sizes = [] if args.sizes is not None else list(CURVE_SIZES)
    for s in (args.sizes.split(",") if args.sizes is not None else []):
        s = s.strip().lower()
        if s == "all":
            sizes.append(None)
        elif s.isdigit() and int(s) > 0:
            sizes.append(int(s))
        else:
            raise ConfigError(f"--sizes takes positive counts or 'all', not {s!r}")
    from featcache.compare.report import curve_table

    results = label_curve(cfg, sizes=CURVE_SIZES if args.sizes is None else tuple(sizes),
                          wait=args.wait)
    print(curve_table(results))
    print(f"{results['wall_s']:.1f} s; plot: {cfg.report_dir}/curve.png, "
          f"table: {cfg.report_dir}/curve.md")
    return 0
