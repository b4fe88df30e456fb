"""Sharded multi-task training on every device: Census-Income, GradCraft, Adam.

A Flax NNX ``SharedBottom`` model (``benchmarks/mtl_models.py``) is trained on
a ``('data', 'fsdp')`` mesh over all devices: the batch is sharded over
``'data'``, every parameter over ``'fsdp'`` along its largest divisible axis,
so the per-task gradients, the GradCraft update and the Adam moments are
sharded the same way; only the ``T x T`` Gram matrix crosses devices. On one
CPU, simulate 8 devices::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python examples/sharded_training.py --quick

Multi-host (``--distributed`` calls ``jax.distributed.initialize()``): the
same code, each host feeding its rows of every global batch through
``jax.make_array_from_process_local_data`` (:func:`shard_batch`); see
``docs/scaling.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gradcraft_jax
from gradcraft_jax.datasets import load_census_income

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import mtl_models  # noqa: E402  pylint: disable=g-import-not-at-top


def make_mesh(fsdp: int | None = None) -> jax.sharding.Mesh:
  """A ``('data', 'fsdp')`` mesh over all devices (``fsdp`` defaults to 2
  when the device count is even, else 1)."""
  n = jax.device_count()
  if fsdp is None:
    fsdp = 2 if n % 2 == 0 and n > 1 else 1
  if n % fsdp:
    raise ValueError(f"--fsdp {fsdp} does not divide {n} devices")
  return jax.make_mesh(
    (n // fsdp, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto)
  )


def param_spec(shape, fsdp_size: int) -> P:
  """``'fsdp'`` on the largest axis divisible by the axis size; else
  replicated."""
  if fsdp_size > 1:
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for a in axes:
      if shape[a] % fsdp_size == 0 and shape[a] >= fsdp_size:
        spec = [None] * len(shape)
        spec[a] = "fsdp"
        return P(*spec)
  return P()


def shard_batch(batch: dict, mesh) -> dict:
  """Places a (host-local) batch with its leading axis over ``'data'``."""
  sharding = NamedSharding(mesh, P("data"))
  if jax.process_count() > 1:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
  return jax.device_put(batch, sharding)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--max-rows", type=int, default=None)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=1024)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--fsdp", type=int, default=None)
  ap.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
  args = ap.parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()
  if args.quick:
    args.max_rows = args.max_rows or 6000
    args.steps, args.batch_size, args.lr = 40, 256, 3e-3

  mesh = make_mesh(args.fsdp)
  n_data = mesh.shape["data"]
  if args.batch_size % n_data:
    raise ValueError(f"batch size {args.batch_size} is not divisible by the data axis ({n_data})")
  data = load_census_income(max_rows=args.max_rows)
  model = mtl_models.SharedBottom(
    data.cardinalities, data.num_numeric, data.num_tasks, rngs=nnx.Rngs(0)
  )
  graphdef, params = nnx.split(model)
  loss_fn = mtl_models.make_loss_fn(graphdef)

  p_shardings = jax.tree_util.tree_map(
    lambda x: NamedSharding(mesh, param_spec(x.shape, mesh.shape["fsdp"])), params
  )
  params = jax.device_put(params, p_shardings)
  tx = optax.chain(gradcraft_jax.gradcraft(), optax.adam(args.lr))
  opt_state = tx.init(params)
  grad_fn = gradcraft_jax.per_task_value_and_grad(loss_fn)

  @jax.jit
  def step(params, opt_state, batch):
    losses, grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
    params = optax.apply_updates(params, updates)
    params = jax.lax.with_sharding_constraint(params, p_shardings)  # keep the FSDP layout
    return params, opt_state, losses

  train = data.train.as_dict()
  n = data.train.num_examples
  rng = np.random.default_rng(0)
  # each host feeds its own slice of every global batch
  local = args.batch_size // jax.process_count()
  start = time.perf_counter()
  for i in range(args.steps):
    rows = rng.choice(n, size=args.batch_size, replace=False)
    rows = rows[jax.process_index() * local : (jax.process_index() + 1) * local]
    batch = shard_batch({k: v[rows] for k, v in train.items()}, mesh)
    params, opt_state, losses = step(params, opt_state, batch)
    if i % max(1, args.steps // 5) == 0 or i == args.steps - 1:
      print(f"step {i:5d}  losses " + " ".join(f"{x:.4f}" for x in np.asarray(losses)))
  jax.block_until_ready(params)
  elapsed = time.perf_counter() - start

  aucs = mtl_models.evaluate_auc(nnx.merge(graphdef, params), data.val)
  print(
    f"mesh: {dict(mesh.shape)} over {jax.device_count()} "
    f"{jax.default_backend()} device(s), {jax.process_count()} process(es)"
  )
  kernel = max(jax.tree_util.tree_leaves(params), key=lambda x: x.size)
  print(f"largest parameter {kernel.shape}: {kernel.sharding.spec}")
  print(f"{args.steps} steps in {elapsed:.1f} s")
  for name, a in zip(data.task_names, aucs):
    print(f"val AUC {name}: {a:.4f}")
  return aucs


if __name__ == "__main__":
  main()
