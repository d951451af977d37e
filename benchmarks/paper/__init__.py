"""Reproduce the FastRPB paper's claims at small scale, offline, with this library's code.

``python -m benchmarks.paper`` trains softmax, linear (elu+1) and linear (SIKF)
attention, each with and without FastRPB, plus softmax with the same table as a
logits bias, on Fashion-MNIST (pixels) and generated ListOps, for several seeds, and
writes ``results.json``, ``results.md`` and ``curves.png``. See ``docs/experiments.md``.
"""
