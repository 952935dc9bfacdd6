"""wanda: structured Wanda, ||W_:j|| * ||x_j|| per channel.

Wanda (Sun et al. 2023) scores a weight by |W_ij| ||x_j||_2, the weight times the norm of
the input it multiplies over the calibration rows. For a whole channel j of a group the
weights that multiply x_j are the consumers' columns for j, so the channel's score is

    score_j = ||W_:j||_2 * ||x_j||_2,   ||x_j||_2^2 = sum over calibration rows of x_j^2
                                                    = rows * S_jj,  S = E[phi phi^T] at the site

with W_:j every consumer column of channel j (all kernel taps of a Conv consumer, all
spatial positions behind a Flatten, all consumers of the group). onnxsim's
``apply_structured_wanda_pruning`` uses the producer's row (the channel's filter) for the
weight term instead; the consumer column is the weight Wanda's product is about. The
highest scores are kept; counts come from select-nodes (fraction or a global keep/flops
budget over the fraction of channels), and reconstruct-next-layer compensates the
consumers from S as for every criterion.
"""

from __future__ import annotations

import numpy as np

from onnxprune.criteria import Criterion, register, site_request
from onnxprune.graph.index import GraphIndex


def consumer_column_norms(model, group) -> np.ndarray:
    """||W_:j||_2 over every consumer weight entry that multiplies channel j, (C,)."""
    c = group.channels
    squares = np.zeros(c)
    index = GraphIndex(model)
    for consumer in group.consumers:
        w = np.moveaxis(index.array(consumer.weight).astype(np.float64), consumer.axis, 0)
        # channel j owns rows j*spatial .. (j+1)*spatial - 1 of the moved axis (channel-major)
        squares += np.square(w.reshape(c, -1)).sum(axis=1)
    return np.sqrt(squares)


@register
class Wanda(Criterion):
    """Structured Wanda: channels with the largest ||consumer column|| * ||activation|| are kept."""

    name = "wanda"

    def score(self, model, group, views):
        site = views["target"].moments(site_request(group), "target")
        sigma = site.second_moment
        activation = np.sqrt(np.maximum(np.diag(sigma), 0.0) * site.count)
        scores = consumer_column_norms(model, group) * activation
        return {"sigma": sigma, "ranking": None, "order": np.argsort(-scores, kind="stable"), "wanda": scores}
