"""The performance benchmark suite: ``python -m benchmarks`` (``make bench``).

Each comparison runs side by side in one run, alternating the pair (A, B, A, B,
...) and reporting medians; results go to ``benchmarks/RESULTS.md``.
"""
