"""Co-Prune (Chen, Wang, Pan, IJCAI 2019): cooperative unstructured pruning across domains.

Two networks of one architecture train at once: the source network (W_s) on labelled source
samples and the target network (W_t, fine-tuned on the target beforehand) on labelled target
samples. Every iteration recomputes the masks from the current weights (paper eqs. 1-5):

    M_s = top-k(|W_s|)                             (the source mask, from its own weights)
    M_t = top-k(alpha |W_s| + (1 - alpha) |W_t|)   (the cooperative target mask)

The forward pass uses W * M; the backward pass hands the dense gradient to W (straight-through
estimator, eq. 9), so pruned weights keep learning and may return. alpha decreases in stages
(default 0.7, 0.5, 0.3); a stage trains until its optimum: Adam at ``lr``, lr / 10 after
``patience`` epochs without a lower target training loss, and the stage ends when lr falls below
``min_lr`` (or after ``max_epochs`` epochs, our cap for a CPU budget). ``alphas=(0,)`` per stage
is target-only magnitude pruning with the same training (the paper's DNS-like baseline); the source
network is then not trained, since it cannot change the target mask.

Masks cover the multiplicative weights of Conv/Gemm/MatMul (not biases). ``keep`` is met either
with one global threshold over all masked weights (``allocation="global"``, default) or by every
layer keeping that fraction (``"layer"``); ``layer_keep`` fixes chosen layers' ratios. The
checkpoint is picked on a held-out fold of the target training samples (accuracy of the masked
target network), never on evaluation data. The result is unstructured sparsity: the target graph
with the pruned weights at zero, no faster on dense runtimes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import DataError, ModelError, RecipeError, UsageError
from onnxprune.train import require_torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CoPruneConfig:
    keep: float
    alphas: tuple[float, ...] = (0.7, 0.5, 0.3)
    allocation: str = "global"  # "global": one threshold over all masked weights; "layer": each layer keeps `keep`
    layer_keep: tuple[tuple[str, float], ...] = ()
    fusion: str = "abs"  # "abs": alpha |W_s| + (1 - alpha) |W_t|; "signed": |alpha W_s + (1 - alpha) W_t| (paper eq. 4)
    lr: float = 1e-3
    min_lr: float = 1e-6
    patience: int = 3
    max_epochs: int = 30  # per stage
    batch_size: int = 64
    val_fraction: float = 0.1
    seed: int = 0
    threads: int = 1
    progress: bool = True

    def __post_init__(self):
        def number(value) -> bool:      # a real number, not a string or a bool (NaN fails the range checks)
            return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)

        if not (number(self.keep) and 0 < self.keep <= 1):
            raise RecipeError("--keep", f"must be in (0, 1], not {self.keep!r}")
        if not isinstance(self.alphas, (tuple, list)) or not self.alphas or \
                any(not (number(a) and 0 <= a <= 1) for a in self.alphas):
            raise RecipeError("--alpha", f"must be a tuple of fractions in [0, 1], one per stage, not {self.alphas!r}")
        if self.fusion not in ("abs", "signed"):
            raise RecipeError("--fusion", f"must be 'abs' or 'signed', not {self.fusion!r}")
        if self.allocation not in ("global", "layer"):
            raise RecipeError("--allocation", f"must be 'global' or 'layer', not {self.allocation!r}")
        for name, value in self.layer_keep:
            if not (number(value) and 0 < value <= 1):
                raise RecipeError("--layer-keep", f"{name}: keep must be in (0, 1], not {value!r}")
        for field, value in (("max_epochs", self.max_epochs), ("patience", self.patience),
                             ("batch_size", self.batch_size), ("threads", self.threads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(f"--{field.replace('_', '-')}", f"must be an integer >= 1, not {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RecipeError("--seed", f"must be an integer >= 0, not {self.seed!r}")
        for field, value in (("lr", self.lr), ("min_lr", self.min_lr)):
            if not (number(value) and math.isfinite(value) and value > 0):
                raise RecipeError(f"--{field.replace('_', '-')}", f"must be a finite number > 0, not {value!r}")
        if not (number(self.val_fraction) and 0 < self.val_fraction < 1):
            raise RecipeError("--val-fraction", f"must be between 0 and 1, not {self.val_fraction!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def keep_counts(sizes: dict[str, int], config: CoPruneConfig) -> dict[str, int] | int:
    """Weights to keep per layer ({name: k}) for "layer" allocation, or the global total (int)."""
    fixed = dict(config.layer_keep)
    unknown = sorted(set(fixed) - set(sizes))
    if unknown:
        raise RecipeError("--layer-keep", f"no masked weight named {', '.join(unknown)}",
                          f"masked weights: {', '.join(sorted(sizes))}")
    if config.allocation == "layer" or fixed:
        counts = {name: max(1, round(fixed.get(name, config.keep) * n)) for name, n in sizes.items()}
        if config.allocation == "global":  # fixed layers as given, the rest share one threshold
            free = {k: v for k, v in sizes.items() if k not in fixed}
            budget, taken = round(config.keep * sum(sizes.values())), sum(counts[k] for k in fixed)
            total = budget - taken
            if free and total < len(free):   # the free layers would keep fewer than one weight each
                raise UsageError(f"--layer-keep keeps {taken:,} weights in {', '.join(fixed)}, which leaves "
                                 f"{max(total, 0):,} of the {budget:,} that --keep {config.keep:g} allows for the "
                                 f"{len(free)} other layers ({', '.join(free)})",
                                 "lower the --layer-keep ratios or raise --keep (or name every layer)")
            return {**{k: counts[k] for k in fixed}, "__global__": max(len(free), total)}
        return counts
    return max(1, round(config.keep * sum(sizes.values())))


def masks_from(torch, importance: dict[str, Any], counts) -> dict[str, Any]:
    """0/1 masks keeping the largest importances: exactly k per layer, or k in total (global).

    ``counts``: {name: k} per layer, an int (one global threshold over all layers), or a dict with
    a "__global__" entry for the layers it does not name.
    """
    masks = {}
    if isinstance(counts, dict):
        per_layer = {k: v for k, v in counts.items() if k != "__global__"}
        shared = [k for k in importance if k not in per_layer] if "__global__" in counts else []
    else:
        per_layer, shared = {}, list(importance)
    for name, k in per_layer.items():
        imp = importance[name].reshape(-1)
        m = torch.zeros_like(imp)
        m[torch.topk(imp, min(k, imp.numel()), sorted=False).indices] = 1.0
        masks[name] = m.reshape(importance[name].shape)
    if shared:
        total = counts if not isinstance(counts, dict) else counts["__global__"]
        flat = torch.cat([importance[k].reshape(-1) for k in shared])
        m = torch.zeros_like(flat)
        m[torch.topk(flat, min(total, flat.numel()), sorted=False).indices] = 1.0
        start = 0
        for name in shared:
            n = importance[name].numel()
            masks[name] = m[start:start + n].reshape(importance[name].shape)
            start += n
    return masks


def cooperative_masks(torch, w_s: dict, w_t: dict, alpha: float, counts, fusion: str = "abs") -> tuple[dict, dict]:
    """(M_s, M_t): the source mask from |W_s|; the target mask from alpha |W_s| + (1 - alpha) |W_t|
    (``fusion="abs"``) or from |alpha W_s + (1 - alpha) W_t| (``"signed"``, the paper's eq. 4: a weight whose
    fine-tuning flipped its sign scores lower)."""
    with torch.no_grad():
        m_s = masks_from(torch, {k: w.abs() for k, w in w_s.items()}, counts)
        if fusion == "signed":
            fused = {k: (alpha * w_s[k] + (1 - alpha) * w_t[k]).abs() for k in w_t}
        else:
            fused = {k: alpha * w_s[k].abs() + (1 - alpha) * w_t[k].abs() for k in w_t}
        m_t = masks_from(torch, fused, counts)
    return m_s, m_t


def coprune(source: onnx.ModelProto, target: onnx.ModelProto, source_samples, target_samples, *,
            config: CoPruneConfig, model_names: tuple[str, str] = ("source", "target")
            ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Co-Prune ``target`` with the help of ``source``; returns (pruned target, report).
    ``model_names``: what errors call the two models (their files)."""
    torch = require_torch()
    from onnxprune.train.convert import to_onnx, to_torch, verify
    from onnxprune.plan.suffix import fixed_batch_of
    from onnxprune.embedding import measured_output, output_kind
    from onnxprune.train.distill import check_fold, _progress, fill_indices, fold_size, load_arrays

    started = time.perf_counter()
    for samples, flag in ((source_samples, "--source-data"), (target_samples, "--target-data")):
        if samples.labels is None:
            raise DataError(flag, f"{samples.name} has no labels; Co-Prune trains both networks on labels",
                            "use labelled samples (a y array or class folders)")
    check_fold(target_samples, config.val_fraction, needs="Co-Prune", hint="lower --val-fraction or train on more samples")
    previous = torch.get_num_threads()
    previous_rng = torch.random.get_rng_state()        # the caller's random stream goes on after training
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    try:
        net_s, net_t = to_torch(source, name=model_names[0]), to_torch(target, name=model_names[1])
        shape_s, shape_t = ({k: tuple(net.weight(k).shape) for k in net.maskable} for net in (net_s, net_t))
        if shape_s != shape_t:
            differ = [f"{k} {list(shape_s[k]) if k in shape_s else 'missing'} against "
                      f"{list(shape_t[k]) if k in shape_t else 'missing'}"
                      for k in sorted(set(shape_s) | set(shape_t)) if shape_s.get(k) != shape_t.get(k)]
            raise ModelError(model_names[0], f"does not have the architecture of the target model {model_names[1]}: "
                             f"its Conv/Gemm/MatMul weights differ ({'; '.join(differ[:3])}"
                             f"{f'; {len(differ) - 3} more' if len(differ) > 3 else ''})",
                             "Co-Prune needs the target fine-tuned from the source (one network, two domains)")
        names = list(net_t.maskable)
        if not names:
            raise ModelError(model_names[1], "has no Conv/Gemm/MatMul weight to prune")
        fixed = fixed_batch_of(target)   # a fixed batch dimension: every batch has exactly that many samples
        if fixed is not None and fixed != config.batch_size:
            log.info("--target-model takes batches of %d samples only: training in batches of %d", fixed, fixed)
            config = dataclasses.replace(config, batch_size=fixed)
        xs, ys = load_arrays(source_samples), source_samples.labels.astype(np.int64)
        xt, yt = load_arrays(target_samples), target_samples.labels.astype(np.int64)
        verify(target, net_t, {k: v[:8] for k, v in xt.items()})
        rng = np.random.default_rng(config.seed)
        n = len(yt)
        order = rng.permutation(n)
        n_val = fold_size(n, config.val_fraction)
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        sizes = {k: net_t.weight(k).numel() for k in names}
        counts = keep_counts(sizes, config)
        train_source = any(a > 0 for a in config.alphas)
        opt_t = torch.optim.Adam(net_t.parameters(), lr=config.lr)
        opt_s = torch.optim.Adam(net_s.parameters(), lr=config.lr) if train_source else None
        src_order = rng.permutation(len(ys))
        src_pos = 0

        # the output validation measures (class scores), the source's by its own fixed batch (else the target's)
        head_t, head_s = ([o.name for o in m.graph.output].index(measured_output(m)) for m in (target, source))
        fixed_s = fixed_batch_of(source) or fixed

        def head(net, arrays, idx, at=head_t, size=fixed):
            """``net``'s output ``at`` on the samples ``idx``; a fixed-batch model (``size``) runs full
            batches of that size (the last sample repeated, the copies' outputs cut off)."""
            if size is not None and len(idx) > size:
                return torch.cat([head(net, arrays, idx[i:i + size], at, size) for i in range(0, len(idx), size)])
            full = fill_indices(idx, size)
            return net(**{k: torch.from_numpy(v[full]) for k, v in arrays.items()})[at][:len(idx)]

        with torch.no_grad():
            probe = head(net_t, xt, np.arange(min(2, n)))
        if output_kind(target) != "classes" or probe.ndim != 2 or not probe.is_floating_point():
            raise ModelError(model_names[1], f"has no classifier output to train on labels: its output "
                             f"{target.graph.output[head_t].name!r} is {str(probe.dtype).removeprefix('torch.')} "
                             f"[{', '.join(['N'] + [str(d) for d in probe.shape[1:]])}]"
                             + (", an embedding" if output_kind(target) == "embedding" else "")
                             + ", not class scores [N, classes]",
                             "Co-Prune trains both networks with cross-entropy on labels: give classifiers")

        def accuracy(net, arrays, labels, idx) -> float:
            correct = 0
            with torch.no_grad():
                for start in range(0, len(idx), fixed or 256):
                    i = idx[start:start + (fixed or 256)]
                    pred = head(net, arrays, i).argmax(1).numpy()
                    correct += int((pred == labels[i]).sum())
            return correct / max(len(idx), 1)

        def update_masks(alpha):
            w_s = {k: net_s.weight(k).detach() for k in names}
            w_t = {k: net_t.weight(k).detach() for k in names}
            if not train_source:  # alpha 0: the target mask alone; the source network is idle
                net_t.masks = masks_from(torch, {k: w.abs() for k, w in w_t.items()}, counts)
                return net_t.masks
            m_s, m_t = cooperative_masks(torch, w_s, w_t, alpha, counts, config.fusion)
            net_s.masks, net_t.masks = m_s, m_t
            return m_t

        curve: list[dict] = []
        update_masks(config.alphas[0])
        best = {"val_accuracy": accuracy(net_t, xt, yt, val_idx), "epoch": 0, "stage": 0, "alpha": config.alphas[0],
                "state": copy.deepcopy(net_t.state_dict()), "mask": {k: v.clone() for k, v in net_t.masks.items()}}
        curve.append({"epoch": 0, "stage": 0, "alpha": config.alphas[0], "lr": config.lr, "train_loss": None,
                      "val_accuracy": best["val_accuracy"]})
        bar = _progress(config.progress)
        epoch = 0
        diverged = None  # the epoch in which a loss or a weight became NaN or inf
        warnings: list[str] = []
        for stage, alpha in enumerate(config.alphas, start=1):
            if diverged is not None:
                break
            lr = config.lr
            for opt in (opt_t, opt_s):
                if opt is not None:
                    for g in opt.param_groups:
                        g["lr"] = lr
            best_loss, stale, stage_epochs = float("inf"), 0, 0
            while lr >= config.min_lr and stage_epochs < config.max_epochs:
                epoch += 1
                stage_epochs += 1
                perm = rng.permutation(train_idx)
                running, seen = 0.0, 0
                batches = [perm[i:i + config.batch_size] for i in range(0, len(perm), config.batch_size)]
                for idx in bar(batches, desc=f"stage {stage} (alpha {alpha:g}) epoch {stage_epochs}"):
                    update_masks(alpha)
                    out = head(net_t, xt, idx)
                    loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(yt[idx]))
                    if not torch.isfinite(loss):
                        diverged = epoch
                        break
                    opt_t.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_t.step()
                    running += float(loss.detach()) * len(idx)
                    seen += len(idx)
                    if train_source:
                        if src_pos + len(idx) > len(src_order):
                            src_order, src_pos = rng.permutation(len(ys)), 0
                        j = np.sort(src_order[src_pos:src_pos + len(idx)])
                        src_pos += len(idx)
                        out_s = head(net_s, xs, j, head_s, fixed_s)
                        loss_s = torch.nn.functional.cross_entropy(out_s, torch.from_numpy(ys[j]))
                        if not torch.isfinite(loss_s):
                            diverged = epoch
                            break
                        opt_s.zero_grad(set_to_none=True)
                        loss_s.backward()
                        opt_s.step()
                nets = (net_t, net_s) if train_source else (net_t,)
                if diverged is not None or not all(bool(torch.isfinite(p).all()) for net in nets
                                                   for p in net.parameters()):
                    diverged = epoch   # the best checkpoint so far (or the dense target's mask) is kept
                    warnings.append(f"training diverged in epoch {epoch} (a loss or weight became NaN or inf; --lr "
                                    f"{config.lr:g} may be too high): kept stage {best['stage']}, epoch "
                                    f"{best['epoch']}")
                    log.warning("%s", warnings[-1])
                    break
                update_masks(alpha)
                train_loss = running / max(seen, 1)
                val = accuracy(net_t, xt, yt, val_idx)
                curve.append({"epoch": epoch, "stage": stage, "alpha": alpha, "lr": lr, "train_loss": train_loss,
                              "val_accuracy": val})
                log.info("stage %d alpha %g epoch %d: loss %.4f, held-out accuracy %.4f, lr %g",
                         stage, alpha, epoch, train_loss, val, lr)
                if val > best["val_accuracy"]:
                    best = {"val_accuracy": val, "epoch": epoch, "stage": stage, "alpha": alpha,
                            "state": copy.deepcopy(net_t.state_dict()),
                            "mask": {k: v.clone() for k, v in net_t.masks.items()}}
                if train_loss < best_loss - 1e-6:
                    best_loss, stale = train_loss, 0
                else:
                    stale += 1
                    if stale >= config.patience:
                        lr, stale = lr / 10, 0
                        for opt in (opt_t, opt_s):
                            if opt is not None:
                                for g in opt.param_groups:
                                    g["lr"] = lr
        net_t.load_state_dict(best["state"])
        masks = {k: v.numpy().astype(np.float32) for k, v in best["mask"].items()}
        pruned = to_onnx(net_t, masks=masks)
        net_t.masks = {}
        with torch.no_grad():
            for k, m in masks.items():
                net_t.weight(k).mul_(torch.from_numpy(m))
        verify(pruned, net_t, {k: v[:8] for k, v in xt.items()})
        layers = []
        for k in names:
            kept = int(masks[k].sum())
            layers.append({"weight": k, "size": sizes[k], "kept": kept, "keep": kept / sizes[k]})
        report = {
            "method": (f"co-prune ({config.fusion} fusion)" if train_source
                       else "target-only magnitude (alpha 0)"),
            "config": config.to_dict(),
            "source_samples": len(ys), "target_train_samples": len(train_idx),
            "target_val_samples": len(val_idx),
            "layers": layers,
            "masked_weights": int(sum(sizes.values())),
            "kept_weights": int(sum(layer["kept"] for layer in layers)),
            "curve": curve,
            "best": {k: best[k] for k in ("epoch", "stage", "alpha", "val_accuracy")},
            "diverged": diverged,
            "warnings": warnings,
            "seconds": time.perf_counter() - started,
            "note": "unstructured sparsity: the pruned weights are zeros in dense tensors; dense runtimes "
                    "(onnxruntime CPU included) run no faster and the file is no smaller unless compressed",
        }
        return pruned, report
    finally:
        torch.set_num_threads(previous)
        torch.random.set_rng_state(previous_rng)


def nonzero_parameters(model: onnx.ModelProto) -> int:
    from onnx import numpy_helper

    return int(sum(np.count_nonzero(numpy_helper.to_array(t)) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)))
