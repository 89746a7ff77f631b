"""Does the exported ``.keras`` model (which runs in Keras/TensorFlow) predict what stage two
predicts when stage one ran on OpenVINO?

Extracts the first N training and N test CIFAR-10 images with the default runtime (OpenVINO
on a CPU), fits ``logreg`` on them (``featcache heads``), exports it (``featcache export``),
then compares on the N test images the head's predictions on the cached OpenVINO features
with the exported model's predictions on the raw images: top-1 agreement, and each one's
accuracy.

Reads CIFAR-10 (FEATCACHE_REAL_DATA, data/ or ../shared/data: :mod:`featcache._util.paths`)
and the ImageNet weights; writes under ``bench-out/agreement/``; prints the agreement.

    KERAS_HOME=... python -m benchmarks.studies.agreement [N]
"""
import sys

import numpy as np

from featcache._util import paths

paths.keras_home()  # a writable KERAS_HOME before Keras is imported
from featcache.cache.reader import load_features
from featcache.compare.comparison import compare_heads
from featcache.config import ExtractConfig, HeadsConfig
from featcache.data.datasets import open_dataset
from featcache.extract.run import extract_features
from featcache.heads import load_head
from featcache.ship.export import export_model, resolve_head
from featcache.ship.predict import load_classifier

DATA = str(paths.find_cifar10() or "../shared/data")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
OUT = "bench-out/agreement"

r = extract_features(ExtractConfig(data_dir=DATA, limit=N, out_dir=OUT, download=False, flip=False))
fs = load_features(r.path)
print(f"features: {r.path} (runtime {fs.attrs['runtime']} {fs.attrs['runtime_version']}, "
      f"precision {fs.attrs['precision']})")
hc = HeadsConfig(feature_file=str(r.path), heads=("logreg",), flip="off")
compare_heads(hc)
_, head_path, _ = resolve_head(hc.report_dir, "logreg")
pipe = np.asarray(load_head(head_path).predict(fs["test"].features))
exported = export_model(r.path, head="logreg")
clf = load_classifier(exported.path)
ds = open_dataset("cifar10", data_dir=DATA, download=False, limit=N)
keras_pred = np.concatenate([clf.probabilities(images).argmax(1)
                             for images, _ in ds.batches("test", 0, N, 64)])
labels = fs["test"].labels
print(f"exported model {exported.path} (Keras {__import__('keras').__version__})")
print(f"{N} test images: top-1 agreement exported vs pipeline {np.mean(keras_pred == pipe):.4f} "
      f"({int(np.sum(keras_pred != pipe))} differ); "
      f"accuracy pipeline {np.mean(pipe == labels):.4f}, "
      f"exported {np.mean(keras_pred == labels):.4f}")
