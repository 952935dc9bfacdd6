"""Which learning rate distils a student that is *near* the original (what `compress --finetune` trains).

The student: ResNet-20 planned to 70 % of the MACs (`onnxprune compress ... --calib-size 1000 --flops 0.7`,
79.30 % held out against 80.84 %). The splits are `compress --finetune`'s with a fifth of the
calibration part as the checkpoint fold (`compress_samples(..., checkpoint_fraction=0.2)`): 4000
images train, 1000 pick the best epoch, the 5000 held-out images score. One distillation per
(epochs, lr), no early stop. Writes bench/results/finetune_lr.md (about 6 minutes here).

    python bench/finetune_lr.py [--runs 5:1e-3,10:5e-4,10:2e-4]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, SHARED, machine, markdown_table

MODEL = SHARED / "models" / "resnet20_cifar10.onnx"
DATA = SHARED / "data" / "cifar10" / "cifar10_test_jpeg.npz"
PREPROCESS = "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"


def main(argv=None) -> None:
    import onnx

    from onnxprune.api import as_model, compress_samples
    from onnxprune.pipeline import Recipe
    from onnxprune.train.distill import TrainConfig, finetune
    from onnxprune.validation import validate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="5:1e-3,10:5e-4,10:2e-4", help="EPOCHS:LR,...")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    runs = [(int(e), float(lr)) for e, lr in (run.split(":") for run in args.runs.split(","))]
    original = as_model(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        student_file = Path(tmp) / "r20_70.onnx"
        command = (["onnxprune", "compress", str(MODEL), "--target-data", str(DATA)] + shlex.split(PREPROCESS)
                   + ["--calib-size", "1000", "--flops", "0.7", "--no-latency", "-q", "-o", str(student_file)])
        subprocess.run(command, check=True, capture_output=True)
        student = onnx.load(str(student_file))
    recipe = Recipe(passes=(), preprocess={"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
                    calib_size=1000, plan={"max_drop": 1.0})
    _, held_out, _, train, fold, _ = compress_samples(original, recipe, str(DATA), checkpoint_fraction=0.2)
    untrained = validate(original, student, held_out, measure_latency=False, progress=False)
    rows = [["untrained", "-", "-", "-", f"{100 * untrained.accuracy_candidate:.2f}",
             f"{untrained.accuracy_drop:.2f} ± {untrained.accuracy_drop_se:.2f}", "-"]]
    for epochs, lr in runs:
        started = time.perf_counter()
        tuned, report = finetune(student, original, train, val_samples=fold,
                                 config=TrainConfig(epochs=epochs, lr=lr, patience=None, progress=False))
        v = validate(original, tuned, held_out, measure_latency=False, progress=False)
        agreement = " ".join(f"{row['val_agreement']:.3f}" for row in report["curve"])
        rows.append([epochs, f"{lr:g}", report["best_epoch"], agreement, f"{100 * v.accuracy_candidate:.2f}",
                     f"{v.accuracy_drop:.2f} ± {v.accuracy_drop_se:.2f}", f"{time.perf_counter() - started:.0f}"])
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Distillation learning rate for a student near the original", "",
        (f"`python bench/finetune_lr.py {shlex.join(argv)}` on {machine()}, "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Student: `{shlex.join(command[:2])} "
         f"resnet20_cifar10.onnx ... {PREPROCESS} --calib-size 1000 --flops 0.7`; distilled on "
         f"{len(train)} training images, best epoch (epoch 0 included) by top-1 agreement with the original on "
         f"a fold of {len(fold)} calibration-part images that neither calibrate nor train; scored on the "
         f"{len(held_out)} held-out images (original {100 * untrained.accuracy_reference:.2f} %). No early stop."),
        "",
        markdown_table(["epochs", "lr", "best epoch", "fold agreement per epoch", "held-out top-1 %",
                        "held-out drop", "seconds"], rows), ""])
    (RESULTS / "finetune_lr.md").write_text(text)
    print(f"wrote {RESULTS / 'finetune_lr.md'}")


if __name__ == "__main__":
    main()
