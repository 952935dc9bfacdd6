"""reconstruct-next-layer: drop the unselected channels and compensate their consumers.

Before:  producer(W: C rows) -> per-channel ops -> phi (C) -> consumer(M: .. x C)
After:   producer(W_J)       -> per-channel ops -> phi_J   -> consumer(M A_J)

    A_J = S_FJ (S_JJ + ridge)^-1     (C x |J|), S = E[phi phi^T] on the target set

so that phi ~= A_J phi_J in the least-squares sense: exact when the removed channels are
dead or copies of kept ones. A Conv consumer gets M[:, :, h, w] A_J at every tap; through a
Flatten of [C, H, W] the columns of each spatial position are mapped alike. With
``reconstruct=False`` the consumer only loses the removed columns (the no-reconstruction
baseline).
"""

from __future__ import annotations

import dataclasses

import onnx

from onnxprune import linalg
from onnxprune.model import count_parameters, remove_unused_initializers
from onnxprune.passes.base import Pass, PassContext, PassResult, register
from onnxprune.passes.channels import prune_channels


@dataclasses.dataclass(frozen=True)
class ReconstructOptions:
    """reconstruct: compensate consumers with A_J (default) or just drop columns."""

    reconstruct: bool = True
    ridge: float = 1e-6               # relative to trace(S_JJ) / |J|

    def __post_init__(self):
        if self.ridge < 0:
            raise ValueError(f"ridge={self.ridge} must be >= 0")


@register
class ReconstructNextLayer(Pass):
    """Producer keeps rows J; consumers get M A_J with A_J = S_FJ (S_JJ + ridge)^-1.

    Applies the selections select-nodes recorded; statistics are the ones the selection used
    (one-shot: all from the original graph; sequential: re-gathered on the partly pruned graph).
    """

    name = "reconstruct-next-layer"
    Options = ReconstructOptions

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        pending = {name: s for name, s in ctx.selections.items() if not s["applied"]}
        rows = []
        for name, selection in pending.items():
            group, keep = selection["group"], selection["keep"]
            before = count_parameters(model)
            matrix = None
            if self.options.reconstruct and len(keep) < group.channels:
                matrix = linalg.reconstruction_matrix(selection["sigma"], keep, ridge=self.options.ridge)
            if len(keep) < group.channels:
                prune_channels(model, group, keep, matrix)
            selection["applied"] = True
            rows.append({"group": name, "channels": group.channels, "kept": int(len(keep)),
                         "params_before": before, "params_after": count_parameters(model),
                         "retention": selection["retention"], "criterion": selection["criterion"],
                         "reconstructed": matrix is not None})
        remove_unused_initializers(model)
        return PassResult(changed=bool(rows), report={"pruned": rows})
