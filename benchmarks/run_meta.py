"""What a benchmark's result file records about its run: the command, the
date (UTC), the commit of the working tree (marked when it has uncommitted
changes to tracked files) and the machine (CPU model, cores, OS, JAX
version and backend).

This is a plain module used by the benchmarks (``sys.path`` must include
``benchmarks/``); it is not part of the ``gradcraft_jax`` package.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*cmd) -> str:
  try:
    out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else ""
  except (OSError, subprocess.SubprocessError):
    return ""


def commit() -> str:
  """The short commit hash, with ``(uncommitted changes)`` when tracked files differ."""
  c = _git("rev-parse", "--short=12", "HEAD") or "unknown"
  if _git("status", "--porcelain", "--untracked-files=no"):
    c += " (uncommitted changes)"
  return c


def cpu_name() -> str:
  """The CPU model (``/proc/cpuinfo``), or what ``platform`` knows."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return cpu


def bench_machine(torch: bool = True) -> str:
  """The machine line of the timing benchmarks: CPU, cores, OS, Python, JAX
  and, with ``torch``, the PyTorch and torchjd versions and PyTorch's threads."""
  import jax

  line = (
    f"{cpu_name()}, {os.cpu_count()} CPU cores visible, {platform.system()} "
    f"{platform.release()}, Python {platform.python_version()}; jax {jax.__version__} "
    f"({jax.default_backend()})"
  )
  if not torch:
    return line + "; PyTorch not run (--no-torch)"
  import importlib.metadata

  import torch as th

  return (
    f"{line}, torch {th.__version__} ({th.get_num_threads()} threads), "
    f"torchjd {importlib.metadata.version('torchjd')}"
  )


def machine() -> str:
  import jax

  cpu = cpu_name()
  dev = jax.devices()[0]
  return (
    f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
    f"jax {jax.__version__} on {dev.platform} ({dev.device_kind})"
  )


def metadata(script: str, argv) -> dict:
  """``{"command", "date", "commit", "machine"}`` of this run of ``script``."""
  return {
    "command": f"python {script} " + shlex.join(list(argv)),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit(),
    "machine": machine(),
  }
