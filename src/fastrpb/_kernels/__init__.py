"""The attention kernels, one module per mode of computation.

``fastrpb.attention`` validates the arguments, resolves the namespace and calls these;
``fastrpb.parallel`` calls them on each rank's block. They take the namespace ``xp``
and arrays already checked and cast to the compute dtype, and check nothing.

- ``common``: masks, the normaliser, the causal product, the features of a block;
- ``noncausal``: ``phi(Q) (phi(K)^T V)``;
- ``causal``: chunks, blocks of chunks, the exclusive prefix of chunk states, the
  compensated normaliser of signed features;
- ``exponential``: the exponential maps' frame (log-features, offsets folded into the
  queries), non-causal and causal;
- ``recurrent``: one token of causal attention (decoding);
- ``packed``: packed sequences (``cu_seqlens``);
- ``rpb``: the FastRPB term added to an output.

The dense float64 references they are tested against live in ``backends_tests/oracles.py``.
"""
