"""Running a benchmark script's ``--quick`` smoke run in a subprocess."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(script: str, out, *extra: str) -> subprocess.CompletedProcess:
  """``python <script> --quick --out <out> [extra...]`` from the repository
  root on the CPU backend; asserts a zero exit status (with the output's
  tail)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, script, "--quick", "--out", str(out), *extra],
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
    env=env,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc
