"""TensorFlow's ``--precision mixed_bfloat16`` against float32 (``--runtime tensorflow``):
speed on the same batches, alternating, and the accuracy of a logistic probe on
1,000 / 1,000 real CIFAR-10 images.

Reads CIFAR-10 (FEATCACHE_REAL_DATA, data/ or ../shared/data) and the ImageNet weights;
writes feature files under ``bench-out/precision/``; prints its rows.

    KERAS_HOME=... python -m benchmarks.studies.tf_precision
"""
import time

import numpy as np

from featcache._util import paths  # noqa: E402

paths.keras_home()  # a writable KERAS_HOME before Keras is imported
DATA = str(paths.find_cifar10() or "../shared/data")
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from featcache.backbones.registry import build_backbone, get_backbone
from featcache.cache.reader import load_features
from featcache.config import ExtractConfig
from featcache.data.datasets import open_dataset
from featcache.extract.run import extract_features, make_step

for bb in ["mobilenet_v2", "resnet50"]:
    spec = get_backbone(bb)
    steps = {p: make_step(build_backbone(spec, weights="none" if bb=="resnet50" else "imagenet",
                                         precision=p), size=224, mode=spec.preprocess)
             for p in ("float32", "mixed_bfloat16")}
    ds = open_dataset("cifar10", data_dir=DATA, download=False)
    batches = [b for b, _ in ds.batches("test", 0, 64*4, 64)]
    for p, s in steps.items():
        s(batches[0])  # warm-up
    t = {p: [] for p in steps}
    for rep in range(2):
        for p, s in steps.items():
            t0 = time.perf_counter()
            for b in batches:
                s(b)
            t[p].append(len(batches)*64 / (time.perf_counter() - t0))
    print(bb, {p: round(float(np.median(v)), 1) for p, v in t.items()}, "bf16/f32 speed ratio",
          round(np.median(t["mixed_bfloat16"]) / np.median(t["float32"]), 2))
accs = {}
for p in ("float32", "mixed_bfloat16"):
    r = extract_features(ExtractConfig(data_dir=DATA, runtime="tensorflow", precision=p, limit=1000,
                                       out_dir="bench-out/precision", download=False, flip=False))
    fs = load_features(r.path)
    sc = StandardScaler().fit(fs["train"].features)
    clf = LogisticRegression(C=0.01, max_iter=1000).fit(sc.transform(fs["train"].features),
                                                         fs["train"].labels)
    accs[p] = (clf.score(sc.transform(fs["test"].features), fs["test"].labels), fs["test"].features)
a, b = accs["float32"][1], accs["mixed_bfloat16"][1]
cos = (a*b).sum(1)/np.linalg.norm(a,axis=1)/np.linalg.norm(b,axis=1)
print("probe acc (1000 train / 1000 test): f32 %.3f bf16 %.3f; feature cosine f32 vs bf16: "
      "mean %.4f min %.4f"
      % (accs["float32"][0], accs["mixed_bfloat16"][0], cos.mean(), cos.min()))
