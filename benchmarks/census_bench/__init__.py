"""The Census-Income benchmark harness, in four parts.

* :mod:`census_bench.methods`: which methods run (enumerated from
  ``gradcraft_jax.methods.__all__``, so a method added to the library is
  benchmarked without touching this code), and how each is built (whole
  model, or shared parameters only via :func:`gradcraft_jax.shared_only`).
* :mod:`census_bench.training`: data on device, the jitted per-task
  gradient step with its conflict diagnostics, the training loop with early
  stopping on validation, and one runner per kind of entry (a library
  method, GradCraft with injected ``tau``/``eps``, single-task models, NMT).
* :mod:`census_bench.report`: per-task AUC, AV-A, RI-A, the paired
  comparison against equal weighting, the conflict diagnostics; Markdown and
  CSV tables.
* :mod:`census_bench.plots`: the figures.

The command-line entry point is ``benchmarks/census_benchmark.py``.
"""
