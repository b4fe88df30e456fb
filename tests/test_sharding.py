"""Sharded updates and training steps on 8 simulated CPU devices.

The checks live in ``tests/_sharded_check.py`` and run in one subprocess
(the cases share its compiled functions):
``--xla_force_host_platform_device_count=8`` must be set before JAX starts,
while the rest of the suite runs with one device in this process.

* ``fsdp``: FSDP-sharded stacked gradients on an Auto-axes mesh (every
  transform: equals single device, keeps sharding, only ``T x T`` crosses
  devices);
* ``explicit``: the same on ``jax.make_mesh`` (Explicit axes by default);
* ``data``: data-parallel training steps (per-task gradients + transform +
  Adam in one jit) equal single-device steps;
* ``2d``: a ``('data', 'fsdp')`` mesh combining both.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


CASES = ("fsdp", "explicit", "data", "2d")


@pytest.mark.slow
def test_sharded():
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, os.path.join(HERE, "_sharded_check.py"), *CASES],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for case in CASES:
    for name in ("gradcraft", "mean", "nmt"):
      assert f"OK {case} {name}" in proc.stdout, proc.stdout
