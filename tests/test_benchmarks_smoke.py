"""Smoke runs of the benchmark scripts with ``--quick`` (in a subprocess)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [
  "bench_gradcraft.py",
  "bench_scaling.py",
  "bench_representation.py",
  "bench_train_step.py",
  "bench_recsys_step.py",
  "dense_gram_accuracy.py",
]
# Smoke runs of a subset where a script loops over methods (each compiles its
# own steps): one method of each path kind (GradCraft's extra columns, a Gram
# method torchjd also has, a loss-only method).
EXTRA = {
  "bench_train_step.py": ["--methods", "gradcraft", "upgrad", "nmt"],
  "bench_recsys_step.py": ["--methods", "gradcraft", "upgrad"],
}

# Scripts whose PyTorch/torchjd columns are skipped with --no-torch.
TORCH_OPTIONAL = {"bench_recsys_step.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick(script):
  path = os.path.join(ROOT, "benchmarks", script)
  if not os.path.exists(path):
    pytest.skip(f"{script} not present")
  extra = list(EXTRA.get(script, []))
  if script in TORCH_OPTIONAL and not all(
    importlib.util.find_spec(m) for m in ("torch", "torchjd")
  ):
    extra.append("--no-torch")  # the JAX paths alone
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, path, "--quick", *extra],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "|" in proc.stdout  # printed a Markdown table
