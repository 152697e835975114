"""Development tools of this repository (benchmarks, their baselines, the profiler, the GPU bundle): not part of the installed package.

Run from the repository root: ``python -m tools.bench``, ``python -m tools.gpu_bundle`` (the Makefile does).
"""
