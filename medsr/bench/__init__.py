"""Benchmarks of the engines against the eager PyTorch reference (``medsr-bench``). Uses torch for FLOP counts, GEMM
ceilings and the reference; never imported by the engine."""
