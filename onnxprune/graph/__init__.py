"""Graph analysis and editing: what can be compressed, and the primitives that rewrite it.

- ``index``: stable node names (given once on load) and ``GraphIndex`` lookups.
- ``shapes``: the one shape-inference engine (ONNX inference on a light copy).
- ``layers``: linear layers (Conv / Gemm / MatMul as y = W x + b) a low-rank split can replace.
- ``groups``: channel groups pruned together, and the structure registry
  (``onnxprune/structures/`` adds last-axis units and attention heads).
- ``prune``: the rewrite that removes a group's channels and folds A_J into its consumers.
"""
