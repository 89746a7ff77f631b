"""``--engine ray``: shards as Ray tasks on a local cluster on loopback, merged
into the file a single-process run writes, byte for byte.

One Ray cluster (2 CPUs, no dashboard) for the module, shut down at the end. Writes only
under ``tmp_path``. Skipped when Ray is not installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featcache.cache.reader import load_features, read_attrs
from featcache.config import ExtractConfig
from featcache.errors import StaleCacheError, WeightsError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def config(out: Path, **kw) -> ExtractConfig:
    base = dict(dataset="synthetic", backbone="mobilenet_025", weights="none", size=32,
                batch=16, out_dir=str(out), flip=True)
    base.update(kw)
    return ExtractConfig(**base)


def test_ray_shards_merge_to_the_single_process_bytes(cluster, tmp_path):
    from featcache.extract.distributed import extract_with_ray
    from featcache.extract.run import extract_features

    single = extract_features(config(tmp_path / "single")).path
    cfg = config(tmp_path / "ray")
    result = extract_with_ray(cfg, shards=2)
    assert result.path == cfg.merged_path.resolve()
    assert result.images == 160 and not result.cached
    assert len(result.parts) == 2 and all(p.images > 0 for p in result.parts)
    assert not list(result.path.parent.glob("*.part*")), "parts are removed after the merge"
    assert "2 shards" in result.summary()
    a, b = load_features(single), load_features(result.path)
    for split in a.splits:
        assert np.array_equal(a[split].features, b[split].features), split
        assert np.array_equal(a[split].features_flip, b[split].features_flip), split
        assert np.array_equal(a[split].labels, b[split].labels), split
    assert read_attrs(result.path)["config_sha256"] == read_attrs(single)["config_sha256"]

    again = extract_with_ray(cfg, shards=2)       # up to date: nothing is recomputed
    assert again.cached and "up to date" in again.summary()


def test_ray_task_errors_arrive_as_project_errors(cluster, tmp_path):
    from featcache.extract.distributed import extract_with_ray

    bad = tmp_path / "not_weights.h5"
    bad.write_bytes(b"not an hdf5 file" * 64)
    with pytest.raises(WeightsError, match="does not fit"):
        extract_with_ray(config(tmp_path / "w", weights=str(bad)), shards=2)


def test_ray_refuses_a_stale_merged_file(tmp_path):
    from featcache.extract.distributed import extract_with_ray
    from featcache.extract.run import extract_features

    cfg = config(tmp_path)
    # a complete file of another configuration (other random weights) under the same name
    out = extract_features(config(tmp_path, seed=1)).path
    assert out == cfg.merged_path
    before = out.read_bytes()
    with pytest.raises(StaleCacheError, match="--force"):
        extract_with_ray(cfg, shards=2)
    assert out.read_bytes() == before


def test_cli_refuses_ray_with_a_single_shard_option(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "featcache", "features", "--engine", "ray",
                           "--shard", "0/2", "--dataset", "synthetic", "--weights", "none",
                           "--backbone", "mobilenet_025", "--size", "32",
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("featcache: error: --engine ray")
    assert not list(tmp_path.iterdir())
