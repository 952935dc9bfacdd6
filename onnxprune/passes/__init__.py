"""Graph-rewriting passes; importing this package registers them all."""

from onnxprune.passes import (  # noqa: F401  (registration)
                                   bias_compensate,
                                   correct_drift,
                                   low_rank_split,
                                   reconstruct_next_layer,
                                   select_nodes,
)
from onnxprune.passes.base import (
                                   REGISTRY,
                                   Approximation,
                                   Pass,
                                   PassContext,
                                   PassResult,
                                   Selection,
                                   check_order,
                                   options_to_dict,
                                   register,
)

__all__ = ["REGISTRY", "Approximation", "Pass", "PassContext", "PassResult", "Selection", "check_order",
           "options_to_dict", "register"]
