"""Stage one on a Ray cluster: ``featcache features --engine ray --shards N``.

Runs the ``N`` shards of :func:`featcache.extract.run.shard_range` as Ray tasks, each one
``extract_features(replace(config, shard=(i, N)))`` in a fresh worker process, then joins
the part files with :func:`featcache.cache.merge.merge` into the file a single-process run writes
(same path, same provenance, same array bytes). Reads what stage one reads (every node
needs the dataset and the weights at the same paths); writes the part files
``<stem>.part<i>of<N>.h5`` (on a shared filesystem for a multi-node cluster), the merged
file, and removes the parts once the merge is complete.

Resumable at every level: a killed run leaves finished parts complete and unfinished
ones ``.partial``; the same command skips the former and resumes the latter. Each task
gets ``cpus_per_shard`` CPUs and sets TensorFlow's thread pools to that many threads so
tasks sharing a node do not oversubscribe it; with GPUs in the cluster each task gets one
GPU (Ray sets ``CUDA_VISIBLE_DEVICES``), i.e. one worker per GPU.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from featcache.config import ExtractConfig
from featcache.errors import ConfigError, FeatcacheError

log = logging.getLogger(__name__)


@dataclass
class PartResult:
    path: str
    images: int
    seconds: float
    cached: bool
    peak_rss_mb: float
    node: str = ""


@dataclass
class DistributedResult:
    """What ``extract_with_ray`` returns (``summary()`` is the CLI's last line)."""

    path: Path
    shards: int
    images: int
    seconds: float
    merge_seconds: float
    cached: bool
    parts: list[PartResult] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def file_mb(self) -> float:
        return self.path.stat().st_size / 2**20 if self.path.exists() else 0.0

    @property
    def peak_rss_mb(self) -> float:
        """The largest peak RSS of one shard's worker."""
        return max((p.peak_rss_mb for p in self.parts), default=0.0)

    def summary(self) -> str:
        if self.cached:
            return f"{self.path} is up to date (same configuration, complete); nothing to do"
        nodes = len({p.node for p in self.parts if p.node}) or 1
        return (f"{self.images} images in {self.seconds:.1f} s ({self.images_per_s:.1f} img/s) "
                f"on Ray: {self.shards} shards on {nodes} node(s), "
                f"merge {self.merge_seconds:.1f} s "
                f"-> {self.path} ({self.file_mb:.1f} MiB), worker peak RSS "
                f"{self.peak_rss_mb:.0f} MiB")


def _absolute(cfg: ExtractConfig) -> ExtractConfig:
    """Paths made absolute, so workers whose working directory differs find them."""
    def absp(p):
        return str(Path(p).expanduser().resolve()) if p else p

    changes = dict(out_dir=absp(cfg.out_dir), data_dir=absp(cfg.data_dir))
    if cfg.output:
        changes["output"] = absp(cfg.output)
    if cfg.weights not in ("imagenet", "none"):
        changes["weights"] = absp(cfg.weights)
    if os.sep in cfg.dataset or Path(cfg.dataset).exists():
        changes["dataset"] = absp(cfg.dataset)
        # keep the file name (dataset_name() of the resolved folder is the same)
    return replace(cfg, **changes)


def _run_part(cfg: ExtractConfig, threads: int) -> PartResult:
    """One Ray task: extract one shard with ``threads`` TensorFlow (or OpenVINO) threads."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
    except RuntimeError:  # TensorFlow already initialised in this worker
        pass
    import socket

    from featcache.extract.run import extract_features
    r = extract_features(replace(cfg, threads=threads))
    return PartResult(str(r.path), r.images, r.seconds, r.cached, r.peak_rss_mb,
                      socket.gethostname())


def _init_ray(ray, address: str | None, num_cpus: int | None):
    """Connect to ``address`` or start a local one-node cluster on loopback; return
    whether we started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                 _node_ip_address="127.0.0.1", **kw)
    else:
        ray.init(address=address, **kw)
    return True


def extract_with_ray(config: ExtractConfig, *, shards: int | None = None,
                     address: str | None = None,
                     cpus_per_shard: int | None = None, gpus_per_shard: float | None = None,
                     keep_parts: bool = False, num_cpus: int | None = None) -> DistributedResult:
    """Stage one as ``shards`` Ray tasks plus a merge; returns a :class:`DistributedResult`.

    ``shards`` and ``address`` default to the config's ``shards`` and ``ray_address``.
    ``address``: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``);
    default: a local one-node cluster with ``num_cpus`` CPUs (default: all), shut down
    afterwards. ``cpus_per_shard``: CPUs (and TensorFlow threads) per task; default: an
    even share of the smallest node. ``gpus_per_shard``: default 1 when the cluster has
    GPUs, else 0. ``keep_parts``: keep the part files after a successful merge.
    """
    shards = config.shards if shards is None else shards
    address = config.ray_address if address is None else address
    config = replace(config, engine="local")   # each shard runs in its worker's process
    t0 = time.perf_counter()
    if config.shard is not None:
        raise ConfigError("--engine ray runs all shards itself; drop --shard (or use "
                          "--engine local --shard I/N on each machine, then `featcache merge`)")
    if shards < 1:
        raise ConfigError(f"--shards must be at least 1, not {shards}")
    cfg = _absolute(config.resolved())
    out = cfg.merged_path
    if out.exists() and not cfg.force:
        # The final name only ever holds a complete file; if it has this configuration
        # (stage one checks dataset and weights hashes), there is nothing to do.
        from featcache.extract.run import extract_features

        r = extract_features(cfg)  # a no-op if up to date; refuses if stale
        return DistributedResult(r.path, shards, r.images, time.perf_counter() - t0, 0.0,
                                 r.cached)
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'featcache[ray]' (or "
                          "'ray[default]'), or use --engine local") from None

    started = _init_ray(ray, address, num_cpus)
    try:
        resources = ray.cluster_resources()
        node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        smallest = int(min(node_cpus)) if node_cpus else int(resources.get("CPU", 1))
        if cpus_per_shard is None:
            per_node = math.ceil(shards / max(1, len(node_cpus)))
            cpus_per_shard = max(1, smallest // per_node)
        if gpus_per_shard is None:
            gpus_per_shard = 1 if resources.get("GPU", 0) >= 1 else 0
        log.info("Ray: %d shards, %d CPU(s)%s each, cluster %s", shards, cpus_per_shard,
                 f" + {gpus_per_shard} GPU" if gpus_per_shard else "",
                 {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})
        env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               "TF_NUM_INTRAOP_THREADS": str(cpus_per_shard),
               "OMP_NUM_THREADS": str(cpus_per_shard)}
        task = ray.remote(num_cpus=cpus_per_shard, num_gpus=gpus_per_shard, max_calls=1,
                          max_retries=2, retry_exceptions=False,
                          runtime_env={"env_vars": env})(_run_part)
        refs = [task.remote(replace(cfg, shard=(i, shards)), cpus_per_shard)
                for i in range(shards)]
        try:
            parts = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, FeatcacheError):
                raise cause from None
            raise
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()
    t_merge = time.perf_counter()
    from featcache.cache.merge import merge

    path = merge(out, [Path(p.path) for p in parts], force=cfg.force, wait=cfg.wait,
                 remove_parts=not keep_parts)
    now = time.perf_counter()
    return DistributedResult(path, shards, sum(p.images for p in parts), now - t0,
                             now - t_merge, False, list(parts))
