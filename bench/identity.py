"""Byte identity of compressed models across two versions of onnxprune (for refactors).

Compresses every model in ../shared with fixed recipes and prints a sha256 of each result:
LeNet and mnist_cnn (every select-nodes criterion + reconstruct, spectral sequential, svd-bc,
dalr-bc on LeNet; 200 USPS samples), mnist_extdata (spectral, svd-bc, dalr-bc), ResNet-20
(spectral + reconstruct at keep and at flops 0.5, dalr-bc; 300 CIFAR samples), MobileNetV2
(spectral, dalr-bc; 48 images) and MiniLM-L3 (FFN spectral + reconstruct; 48 SST-2 rows).
Run it with PYTHONPATH at each checkout and diff the outputs; ``--names`` hashes each model
with its node and tensor names normalised (identity up to naming).

    PYTHONPATH=/path/to/checkout python bench/identity.py [--names] [lenet mnist_cnn ...] > out.txt
"""
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxprune
from onnxprune.calibration.provider import StatsProvider
try:
    from onnxprune.data.preprocess import Preprocess
    from onnxprune.data.samples import open_samples
except ImportError:
    from onnxprune.calibration.readers import Preprocess, open_samples
from onnxprune.model import load_model
from onnxprune.pipeline import Recipe, run_pipeline

SHARED = str(Path(__file__).resolve().parents[2] / "shared")     # not via bench.common: PYTHONPATH picks onnxprune
if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit(0)
NORMALISE = "--names" in sys.argv


def normalised(model: onnx.ModelProto) -> bytes:
    """The model with every node and tensor renamed by first appearance (identity modulo names)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep = {v.name for v in list(g.input) + list(g.output)}
    names: dict[str, str] = {}

    def new(name):
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")
    for t in g.initializer:
        t.name = new(t.name)
    for v in g.value_info:
        v.name = new(v.name)
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        node.input[:] = [new(x) for x in node.input]
        node.output[:] = [new(x) for x in node.output]
    for v in g.input:
        v.name = new(v.name)
    # initializer order by content-independent key: keep order (renaming preserves it)
    return m.SerializeToString(deterministic=True)


def digest(model):
    raw = normalised(model) if NORMALISE else model.SerializeToString(deterministic=True)
    return hashlib.sha256(raw).hexdigest()[:16]


def run(key, model, provider, recipes):
    for name, passes in recipes.items():
        started = time.perf_counter()
        mode = "sequential" if name.endswith("-seq") else "one-shot"
        out, _ = run_pipeline(model, Recipe(passes=tuple(passes), batch_size=50, mode=mode), provider)
        print(f"{key:10s} {name:14s} {digest(out)}  ({time.perf_counter() - started:.1f} s)", flush=True)


print("onnxprune from", onnxprune.__file__, file=sys.stderr)
only = [a for a in sys.argv[1:] if not a.startswith("--")]
CRITERIA = ["spectral", "momasp-J", "momasp-j", "pfa-en", "pfa-kl", "mean", "l1"]
SPECTRAL = [("select-nodes", {"criterion": "spectral", "keep": 0.5}), ("reconstruct-next-layer", {})]
SVD_BC = [("low-rank-split", {"method": "svd", "keep": 0.3}), ("bias-compensate", {})]
DALR_BC = [("low-rank-split", {"method": "dalr", "keep": 0.3}), ("bias-compensate", {})]
DIGITS = {"lenet": (f"{SHARED}/models/lenet_caffe_mnist.onnx", Preprocess()),
          "mnist_cnn": (f"{SHARED}/models/mnist_cnn_fc3136.onnx", Preprocess(mean=(0.5,), std=(0.5,)))}
for key, (path, pre) in DIGITS.items():
    if only and key not in only:
        continue
    model = load_model(path)
    target = open_samples(f"{SHARED}/data/digits/usps_test.npz", model, preprocess=pre).subset(np.arange(200))
    source = open_samples(f"{SHARED}/data/digits/mnist_test.npz", model, preprocess=pre).subset(np.arange(200))
    provider = StatsProvider({"target": target, "source": source}, batch_size=50, folds=2, progress=False)
    recipes = {c: [("select-nodes", {"criterion": c, **({} if c in ("pfa-kl", "pfa-en") else {"keep": 0.5})}),
                   ("reconstruct-next-layer", {})] for c in CRITERIA + ["wanda"]}
    recipes["spectral-seq"] = recipes["spectral"]
    recipes["svd-bc"] = SVD_BC
    if key == "lenet":
        recipes["dalr-bc"] = DALR_BC
    run(key, model, provider, recipes)

if not only or "mnist_extdata" in only:
    model = load_model(f"{SHARED}/models/mnist_extdata/mnist.onnx")
    target = open_samples(f"{SHARED}/data/digits/usps_test.npz", model,
                          preprocess=Preprocess(mean=(0.5,), std=(0.5,))).subset(np.arange(200))
    provider = StatsProvider({"target": target}, batch_size=50, folds=2, progress=False)
    run("mnist_extdata", model, provider, {
        "spectral": SPECTRAL,
        "svd-bc": SVD_BC,
        "dalr-bc": DALR_BC})

if not only or "resnet20" in only:
    model = load_model(f"{SHARED}/models/resnet20_cifar10.onnx")
    pre = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    target = open_samples(f"{SHARED}/data/cifar10/cifar10_test_jpeg.npz", model, preprocess=pre)
    target = target.subset(np.random.default_rng(0).permutation(10000)[:300])
    provider = StatsProvider({"target": target}, batch_size=50, folds=2, progress=False)
    run("resnet20", model, provider, {
        "spectral": SPECTRAL,
        "spectral-flops": [("select-nodes", {"criterion": "spectral", "flops": 0.5}), ("reconstruct-next-layer", {})],
        "dalr-bc": DALR_BC})

if not only or "mobilenetv2" in only:
    model = load_model(f"{SHARED}/models/mobilenetv2_imagenet_fp32.onnx")
    pre = Preprocess(resize=256, center_crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    target = open_samples(f"{SHARED}/data/imagenet_samples", model, preprocess=pre).subset(np.arange(48))
    provider = StatsProvider({"target": target}, batch_size=16, folds=2, progress=False)
    run("mobilenetv2", model, provider, {
        "spectral": SPECTRAL,
        "dalr-bc": DALR_BC})

if not only or "minilm" in only:
    model = load_model(f"{SHARED}/models/minilm_l3_paraphrase.onnx")
    sst = dict(np.load(f"{SHARED}/data/text/sst2_test.npz"))
    calib = {k: v[:48, :40] for k, v in sst.items() if k in ("input_ids", "attention_mask")}
    provider = StatsProvider({"target": open_samples(calib, model)}, batch_size=16, folds=2, progress=False)
    ffn = tuple(f"/model/model.0/auto_model/encoder/layer.{i}/intermediate/dense/MatMul" for i in range(3))
    run("minilm", model, provider, {
        "ffn-spectral": [("select-nodes", {"criterion": "spectral", "fraction": 0.5, "groups": ffn}),
                         ("reconstruct-next-layer", {})]})
