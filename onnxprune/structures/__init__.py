"""Structures: analyses that find coupled channel groups of one kind, one module each.

``onnxprune.graph.groups.find_channel_groups`` asks every registered structure (``graph.groups.structures()``)
for its groups: "channels" (axis 1 of CNN and MLP activations) lives in ``graph/groups.py``; every
module of this package registers one more with ``@graph.groups.register_structure(name)`` and is
imported when the registry is first read. A group says which axis its channels live on
(``ChannelGroup.axis``); select-nodes, reconstruct-next-layer and the planner treat every
group alike, and ``graph/prune.prune_channels`` rewrites them.
"""
