"""Smoke runs of the benchmark scripts with ``--quick`` (in a subprocess)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Smoke runs of a subset where a script loops over methods and models (each
# compiles its own steps): one method of each path kind (GradCraft's extra
# columns, a Gram method torchjd also has, a loss-only method), one model.
TRAIN_STEP_METHODS = ["--models", "mlp", "--methods", "gradcraft", "upgrad", "nmt"]
RUNS = [
  pytest.param("bench_gradcraft.py", [], id="bench_gradcraft.py"),
  pytest.param("bench_scaling.py", [], id="bench_scaling.py"),
  pytest.param("bench_representation.py", [], id="bench_representation.py"),
  # The train-step benchmark times PyTorch and torchjd next to the library
  # (optional packages); without them it runs with --no-torch.
  pytest.param(
    "bench_train_step.py", TRAIN_STEP_METHODS, id="bench_train_step.py", marks=pytest.mark.extras
  ),
  pytest.param(
    "bench_train_step.py",
    [*TRAIN_STEP_METHODS, "--no-torch"],
    id="bench_train_step.py--no-torch",
  ),
  # One model: the three share the benchmark's code, and tests/test_recsys_models.py
  # checks each model's lean step against jax.jacrev.
  pytest.param(
    "bench_recsys_step.py",
    ["--models", "mmoe", "--methods", "gradcraft"],
    id="bench_recsys_step.py",
  ),
  pytest.param("dense_gram_accuracy.py", [], id="dense_gram_accuracy.py"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", RUNS)
def test_benchmark_quick(script, extra):
  path = os.path.join(ROOT, "benchmarks", script)
  if not os.path.exists(path):
    pytest.skip(f"{script} not present")
  if script == "bench_train_step.py":
    if "--no-torch" in extra:
      if importlib.util.find_spec("torch") and importlib.util.find_spec("torchjd"):
        pytest.skip("torch and torchjd are installed: the run with them covers this one")
    else:
      pytest.importorskip("torch")
      pytest.importorskip("torchjd")
  if script == "bench_recsys_step.py" and not all(
    importlib.util.find_spec(m) for m in ("torch", "torchjd")
  ):
    extra = [*extra, "--no-torch"]  # the JAX paths alone
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, path, "--quick", *extra],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "|" in proc.stdout  # printed a Markdown table
