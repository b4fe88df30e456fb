"""Sharded (FSDP-style) updates on 8 simulated CPU devices.

The checks live in ``tests/_sharded_check.py`` and run in a subprocess:
``--xla_force_host_platform_device_count=8`` must be set before JAX starts,
while the rest of the suite runs with one device in this process.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_sharded_updates_match_and_only_gram_crosses_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_check.py")],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "OK gradcraft" in proc.stdout, proc.stdout
