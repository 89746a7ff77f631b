"""Real ImageNet weights on real CIFAR-10 (marked ``real``; skipped without the files).

A logistic-regression probe on MobileNetV2 features must beat the same probe on
random-weight features of the same images by a wide margin, and the real data must look
like CIFAR-10."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.real

N = 300  # images per split: a few hundred, seconds on a CPU


def _probe(fs) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr, te = fs["train"], fs["test"]
    scaler = StandardScaler().fit(tr.features)
    clf = LogisticRegression(C=0.1, max_iter=1000).fit(scaler.transform(tr.features), tr.labels)
    return float(clf.score(scaler.transform(te.features), te.labels))


def test_real_cifar10_is_the_official_data(real_data_dir):
    from featcache.data.datasets import open_dataset

    ds = open_dataset("cifar10", data_dir=real_data_dir, download=False)
    assert ds.splits == {"train": 50000, "test": 10000}
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    counts = np.bincount(ds.labels("test"), minlength=10)
    assert (counts == 1000).all()
    images, _ = next(ds.batches("train", 0, 5000, 5000))
    mean = images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=0.01)


def _extract(real_data_dir, out_dir, **kw):
    from featcache.cache.reader import load_features
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    common = dict(dataset="cifar10", data_dir=str(real_data_dir), backbone="mobilenet_v2",
                  size=224, limit=N, out_dir=str(out_dir), download=False, flip=False,
                  cut="none", runtime="openvino", precision="float32")
    return load_features(extract_features(ExtractConfig(**{**common, **kw})).path)


@pytest.fixture(scope="module")
def real_float32(real_data_dir, keras_home, tmp_path_factory):
    """MobileNetV2's ImageNet features of the first N images of each split, OpenVINO
    float32, no mirrors: what the two tests below compare against."""
    return _extract(real_data_dir, tmp_path_factory.mktemp("real"))


def test_imagenet_features_beat_random_features_by_a_wide_margin(real_data_dir, real_float32,
                                                                 tmp_path):
    real = real_float32
    rand = _extract(real_data_dir, tmp_path, weights="none")
    assert real.attrs["weights"] == "imagenet" and rand.attrs["weights"] == "none"
    acc_real, acc_rand = _probe(real), _probe(rand)
    print(f"probe accuracy: imagenet {acc_real:.3f}, random {acc_rand:.3f}")
    assert acc_real > 0.5
    assert acc_real > acc_rand + 0.25


def test_int8_features_of_real_weights_are_close_to_float32(real_data_dir, real_float32,
                                                             tmp_path):
    """MobileNetV2 ImageNet weights at 224 px, calibrated on 100 training images: each
    image's int8 features point where its float32 ones do (cosine 0.96 on average over the
    full test split with the default 300), and a probe on them is as good within noise."""
    f32 = real_float32
    i8 = _extract(real_data_dir, tmp_path, precision="int8", calibration=100)
    a, b = f32["test"].features, i8["test"].features
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    acc32, acc8 = _probe(f32), _probe(i8)
    print(f"int8 vs float32: cosine mean {cos.mean():.4f} min {cos.min():.3f}; probe "
          f"{acc8:.3f} vs {acc32:.3f}")
    assert cos.mean() >= 0.93 and cos.min() >= 0.6
    assert acc8 >= acc32 - 0.04      # 300 test images: one SE of a difference is ~0.025


def test_input_size_does_not_change_the_weight_file(real_data_dir, keras_home, tmp_path):
    """Only the 224-px MobileNetV2 file exists offline; 96 px (a size Keras has its own file
    for) must still run, on exactly the same weights."""
    from featcache.cache.reader import read_attrs
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    common = dict(data_dir=str(real_data_dir), limit=8, batch=8, out_dir=str(tmp_path),
                  download=False, precision="float32", cut="none")
    a = read_attrs(extract_features(ExtractConfig(size=96, **common)).path)
    b = read_attrs(extract_features(ExtractConfig(size=128, **common)).path)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["image_size"] == 96 and b["image_size"] == 128


def test_predict_on_openvino_gives_tensorflows_answers_on_real_weights(real_data_dir,
                                                                         keras_home, tmp_path):
    """100 real CIFAR-10 test images as PNG files through an exported MobileNetV2 (ImageNet
    weights) + logreg: ``featcache predict`` on OpenVINO float32 gives TensorFlow's
    probabilities and top-1 class on every image. bf16 (where the CPU has it) is another
    computation: the same top-1 on most images (0.85 measured on these 100 with this weak
    head; 0.90 on 1,000 images with a head fitted on 1,000) at about the same accuracy."""
    from PIL import Image

    from featcache.backbones.runtime import cpu_has_bf16
    from featcache.cache.reader import load_features
    from featcache.config import ExtractConfig
    from featcache.data.datasets import open_dataset
    from featcache.extract.run import extract_features
    from featcache.heads import get_head
    from featcache.ship.export import export_model
    from featcache.ship.predict import predict_images

    n = 100
    fs = load_features(extract_features(ExtractConfig(
        dataset="cifar10", data_dir=str(real_data_dir), limit=n, flip=False,
        precision="float32", cut="none", out_dir=str(tmp_path), download=False)).path)
    head = get_head("logreg", C=0.01).fit(fs["train"].features, fs["train"].labels)
    model = export_model(fs.path, head=head, output=tmp_path / "cifar.keras").path
    ds = open_dataset("cifar10", data_dir=real_data_dir, download=False)
    images, labels = next(ds.batches("test", 0, n, n))
    files = []
    for i, im in enumerate(images):
        files.append(tmp_path / "png" / f"{i:03d}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(im).save(files[-1])

    def probs(**kw):
        rows = predict_images(model, files, top_k=10, **kw)
        return np.array([[{t["class"]: t["probability"] for t in r["top"]}[c]
                          for c in ds.classes] for r in rows])

    want = probs(runtime="tensorflow")
    got = probs(runtime="openvino", precision="float32")
    accuracy = float((want.argmax(1) == labels).mean())
    print(f"{n} images: accuracy {accuracy:.2f}; OpenVINO float32 vs TensorFlow max |dp| "
          f"{np.abs(got - want).max():.1e}")
    assert accuracy > 0.5                      # real weights, a real head
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    if cpu_has_bf16():
        bf = probs(runtime="openvino", precision="bf16")
        same = float((bf.argmax(1) == want.argmax(1)).mean())
        bf_accuracy = float((bf.argmax(1) == labels).mean())
        print(f"OpenVINO bf16: top-1 agreement {same:.2f}, accuracy {bf_accuracy:.2f}, max "
              f"|dp| {np.abs(bf - want).max():.3f}")
        assert same >= 0.75 and bf_accuracy >= accuracy - 0.1
