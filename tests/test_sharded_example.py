"""``examples/sharded_training.py --quick`` on 8 simulated CPU devices."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_sharded_training_quick():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "examples", "sharded_training.py"), "--quick"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "mesh: {'data': 4, 'fsdp': 2} over 8 cpu" in proc.stdout, proc.stdout
  assert "'fsdp'" in proc.stdout  # the largest parameter is FSDP-sharded
  aucs = [float(x) for x in re.findall(r"val AUC \w+: ([0-9.]+)", proc.stdout)]
  assert len(aucs) == 3, proc.stdout
  # 40 quick steps already separate the classes (chance is 0.5)
  assert all(a > 0.7 for a in aucs), aucs
