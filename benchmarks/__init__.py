"""The fastrpb benchmark suite: ``python -m benchmarks --help``.

Every comparison is measured side by side, interleaved (A B A B ...), in one run and
reported as a ratio, because a shared machine drifts. See ``docs/performance.md``.
"""
