"""Sharded-update check, run in a subprocess with 8 simulated CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before
JAX initialises, so ``tests/test_sharding.py`` runs this file with
``python tests/_sharded_check.py`` in a fresh interpreter. For every
multi-task transform exported by ``gradcraft_jax`` (discovered at run time),
with parameters sharded ``P('fsdp')`` and stacked gradients
``P(None, 'fsdp')`` over an 8-device mesh, it checks that

* the jitted update equals the single-device result (allclose);
* the update keeps the parameters' sharding;
* no collective in the compiled HLO moves anything larger than ``T x T``
  (only the Gram matrix and scalars cross devices).

Prints one ``OK name`` / ``SKIP name: why`` line per transform and exits
non-zero on any failure.
"""

import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import gradcraft_jax

T = 4
COLLECTIVE = re.compile(
    r"= (\S+?) (all-reduce|all-gather|reduce-scatter|collective-permute|"
    r"all-to-all)(?:-start)?\(")
# Candidate factories with extra construction kwargs (num_tasks is added
# when the factory accepts it).
CANDIDATES = ["gradcraft", "mean", "mgda", "pcgrad", "pcgrad_plus", "gradvac",
              "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dbmtl",
              "uncertainty_weighting", "uncertainty", "dwa", "imtl", "nmt"]


def _build(factory):
  for kwargs in ({}, {"num_tasks": T}):
    try:
      tx = factory(**kwargs)
    except (TypeError, ValueError):
      continue
    if isinstance(tx, optax.GradientTransformation):
      return tx
  return None


def _elements(shape_str):
  dims = re.findall(r"\[([0-9,]*)\]", shape_str)
  total = 0
  for d in dims:
    n = 1
    for x in filter(None, d.split(",")):
      n *= int(x)
    total += n
  return total


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(64, 24)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=(T,) + p.shape), jnp.float32),
      params)
  # A shared direction with conflicting signs so projections are active.
  grads["w"] = grads["w"].at[1].add(-2 * grads["w"][0])
  losses = jnp.asarray(rng.uniform(0.5, 2.0, size=(T,)), jnp.float32)
  p_shard = jax.tree_util.tree_map(
      lambda p: NamedSharding(mesh, P("fsdp")), params)
  g_shard = jax.tree_util.tree_map(
      lambda p: NamedSharding(mesh, P(None, "fsdp")), grads)
  sparams = jax.device_put(params, p_shard)
  sgrads = jax.device_put(grads, g_shard)
  slosses = jax.device_put(losses, NamedSharding(mesh, P()))

  failures = []
  for name in CANDIDATES:
    factory = getattr(gradcraft_jax, name, None)
    if factory is None or not callable(factory):
      continue
    tx = _build(factory)
    if tx is None:
      print(f"SKIP {name}: could not construct")
      continue

    def step(g, p, l, tx=tx):
      state = tx.init(p)
      upd, _ = tx.update(g, state, p, task_losses=l)
      return upd

    try:
      ref = jax.jit(step)(grads, params, losses)
      fn = jax.jit(step, out_shardings=None)
      out = fn(sgrads, sparams, slosses)
      hlo = fn.lower(sgrads, sparams, slosses).compile().as_text()
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"{name}: raised {type(e).__name__}: {e}")
      continue
    for k in params:
      if not np.allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-4,
                         atol=1e-5):
        failures.append(f"{name}: sharded result differs on {k}")
      if not out[k].sharding.is_equivalent_to(sparams[k].sharding,
                                              params[k].ndim):
        failures.append(f"{name}: output {k} has sharding "
                        f"{out[k].sharding}, params have "
                        f"{sparams[k].sharding}")
    big = [(op, shp) for shp, op in COLLECTIVE.findall(hlo)
           if _elements(shp) > T * T]
    if big:
      failures.append(f"{name}: gradient-sized collectives {big}")
    print(f"OK {name}" if not any(f.startswith(name + ":") for f in failures)
          else f"FAIL {name}")
  for f in failures:
    print("FAILURE", f)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
