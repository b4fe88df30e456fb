"""Stacked per-task gradient pytrees: validation, Gram matrix, weighted sum.

A *stacked* gradient pytree has the structure of the parameters, and every
leaf carries a leading task axis of size ``T``: leaf ``p`` of shape ``s``
becomes a leaf of shape ``(T, *s)`` whose row ``i`` is ``d l_i / d p``.

Every Gram-based method in this package is three steps over such a tree:

1. ``K = gram_matrix(G)``: the ``T x T`` matrix ``K_ij = <g_i, g_j>`` summed
   over all leaves (one read of ``G``);
2. a *weighting* that maps ``K`` (plus losses and state for some methods) to
   one weight per task, ``w in R^T`` (``O(T^3)`` work, independent of the
   number of parameters);
3. ``weighted_sum(G, w) = sum_i w_i g_i`` (a second read of ``G``).

Nothing of size ``T x T x d`` is ever formed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcraft_jax import _cpu_gram

__all__ = [
  "accumulation_dtype",
  "cross_gram",
  "gram_matrix",
  "num_tasks",
  "select_leaves",
  "weighted_sum",
]

# Elements (T * columns) per block of the blocked CPU Gram contraction: a
# (T, B) float32 block of ~192 KiB stays in L2 cache while it is multiplied
# with itself.
_GRAM_BLOCK_ELEMS = 49152
_GRAM_BLOCK_MIN = 1024
_GRAM_BLOCK_MAX = 16384
# Up to this many tasks the weighted sum is one fused elementwise pass.
_UNROLL_MAX_TASKS = 64
# Leaves with at least this many elements per task use the CPU kernel's
# multi-threaded weighted sum (below it, the call overhead dominates).
_KERNEL_SUM_MIN = 1 << 16


def sum_over_tasks(leaf: jax.Array, dtype=None) -> jax.Array:
  """``leaf.sum(axis=0)`` over the task axis, in ``dtype`` (default the
  leaf's), as one fused elementwise pass: an in-order chain of row
  additions for up to ``_UNROLL_MAX_TASKS`` tasks (XLA:CPU runs a reduction
  over the major axis orders of magnitude slower), ``jnp.sum`` beyond."""
  dtype = leaf.dtype if dtype is None else dtype
  t = leaf.shape[0]
  if t == 0 or t > _UNROLL_MAX_TASKS:
    return jnp.sum(leaf.astype(dtype), axis=0)
  out = leaf[0].astype(dtype)
  for i in range(1, t):
    out = out + leaf[i].astype(dtype)
  return out


def kernel_pass(*leaves: jax.Array) -> bool:
  """Whether a pass over these ``(T, ...)`` leaves takes a CPU kernel of
  :mod:`gradcraft_jax._cpu_gram` (weighted sum, GradDrop, ExcessMTL): every
  leaf float32, at least ``_KERNEL_SUM_MIN`` elements per task (below it the
  call overhead dominates), one device and the kernel built. The kernel
  itself is still chosen per platform while lowering
  (``lax.platform_dependent``)."""
  t = leaves[0].shape[0]
  n = leaves[0].size // t if t else 0
  return (
    n >= _KERNEL_SUM_MIN
    and all(leaf.dtype == jnp.float32 for leaf in leaves)
    and jax.device_count() == 1
    and _cpu_gram.available()
  )


def finite_probe(x: jax.Array) -> jax.Array:
  """The kernels' finiteness probe in XLA (their off-CPU fallback): a
  ``(1,)`` array, 0 when every element of ``x`` is finite, NaN otherwise."""
  return jnp.where(jnp.all(jnp.isfinite(x)), 0.0, jnp.nan).reshape(1)


def _fused_sum(flat, w, t, acc):
  out = w[0] * flat[0].astype(acc)
  for i in range(1, t):
    out = out + w[i] * flat[i].astype(acc)
  return out


_NO_TASK_AXIS_HINT = (
  ". The method was probably given parameter-shaped arrays instead of stacked "
  "per-task gradients (leaves of shape (T, *param_shape)): optax.MultiSteps and "
  "optax.apply_if_finite call their inner chain on parameter-shaped zeros, so they "
  "cannot wrap a chain that starts with a method; use gradcraft_jax.MultiSteps("
  "chain, k, num_tasks=T) and gradcraft_jax.apply_if_finite(chain, n) instead, or "
  "check that the gradients come from gradcraft_jax.per_task_value_and_grad"
)


def num_tasks(stacked: Any) -> int:
  """Returns the task count ``T`` shared by every leaf of a stacked pytree.

  Args:
    stacked: a pytree whose leaves all have a leading task axis.

  Returns:
    ``T``, the size of the leading axis.

  Raises:
    ValueError: if the tree has no leaves, a leaf is a scalar, or two leaves
      disagree on ``T``; the message names the offending leaf.
    TypeError: if a leaf is complex (the methods' Gram matrices and
      weightings are defined for real gradients; store a complex parameter
      as its real and imaginary parts); the message names the leaf.

  >>> import jax.numpy as jnp
  >>> num_tasks({"w": jnp.zeros((3, 4, 5)), "b": jnp.zeros((3, 5))})
  3
  """
  leaves = jax.tree_util.tree_leaves_with_path(stacked)
  if not leaves:
    raise ValueError(
      "stacked gradients have no leaves; expected a pytree whose leaves have a leading task axis"
    )
  first_path, first = leaves[0]
  for path, leaf in leaves:
    if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
      raise TypeError(
        f"leaf {jax.tree_util.keystr(path) or '<root>'} is complex ({jnp.result_type(leaf)}); "
        "stacked per-task gradients must be real (store a complex parameter as its real "
        "and imaginary parts)"
      )
    if jnp.ndim(leaf) == 0:
      raise ValueError(
        f"leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every "
        "leaf of stacked per-task gradients needs a leading task axis" + _NO_TASK_AXIS_HINT
      )
  t = jnp.shape(first)[0]
  for path, leaf in leaves:
    if jnp.shape(leaf)[0] != t:
      raise ValueError(
        f"inconsistent task axis: leaf {jax.tree_util.keystr(path)} has "
        f"leading dimension {jnp.shape(leaf)[0]} but leaf "
        f"{jax.tree_util.keystr(first_path) or '<root>'} has {t}" + _NO_TASK_AXIS_HINT
      )
  return int(t)


def accumulation_dtype(stacked: Any) -> jnp.dtype:
  """The dtype Gram matrices and weights are computed in: float32 at least.

  float64 leaves (with ``jax_enable_x64``) give float64; bf16/fp16/fp32 give
  float32. ``float0`` leaves (the gradients of integer parameters) are
  ignored.
  """
  dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(stacked) if not _is_float0(x)]
  return jnp.result_type(jnp.float32, *dtypes)


def _is_float0(x) -> bool:
  """The gradient of an integer or boolean parameter (``jax.dtypes.float0``:
  no values, always zero)."""
  return getattr(x, "dtype", None) == jax.dtypes.float0


def _block_size(t: int) -> int:
  """Columns per block: the largest power of two with ``t * B`` at most
  ``_GRAM_BLOCK_ELEMS``, clipped to ``[_GRAM_BLOCK_MIN, _GRAM_BLOCK_MAX]``."""
  b = _GRAM_BLOCK_MAX
  while b > _GRAM_BLOCK_MIN and t * b > _GRAM_BLOCK_ELEMS:
    b //= 2
  return b


def _self_gram(x: jax.Array, acc_dtype) -> jax.Array:
  """``(T, m) -> (T, T)`` accumulated in ``acc_dtype``.

  16-bit float inputs are contracted as they are with
  ``preferred_element_type=acc_dtype`` (float32 products and sums, no
  float32 copy of ``x``); other inputs are cast first (a no-op for float32).
  """
  if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2):
    x = x.astype(acc_dtype)
  return jax.lax.dot_general(
    x,
    x,
    (((1,), (1,)), ((), ())),
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=acc_dtype,
  )


def _leaf_gram_blocked(flat: jax.Array, acc_dtype) -> jax.Array:
  """Blocked ``flat @ flat.T`` for XLA:CPU.

  XLA:CPU runs a ``(T, n) @ (n, T)`` product with tiny ``T`` and huge ``n``
  far below memory bandwidth (about 15x a streaming pass over the leaf at
  ``T = 6``). A ``fori_loop`` over cache-sized ``(T, B)`` column blocks
  reads the leaf once and runs each small product from L2 cache (about
  2-4x a streaming pass at ``T = 6``; compute-bound: ``T^2`` multiply-adds
  per column). Used for leaves already in ``acc_dtype`` only.
  """
  t, n = flat.shape
  bs = _block_size(t)
  nblocks, tail = divmod(n, bs)
  out = jnp.zeros((t, t), acc_dtype)
  if nblocks > 1:

    def body(j, acc):
      x = jax.lax.dynamic_slice_in_dim(flat, j * bs, bs, axis=1)
      return acc + _self_gram(x, acc_dtype)

    out = jax.lax.fori_loop(0, nblocks, body, out)
  elif nblocks == 1:
    out = _self_gram(flat[:, :bs], acc_dtype)
  if tail:
    out = out + _self_gram(flat[:, nblocks * bs :], acc_dtype)
  return out


def _explicit_replicated(x: jax.Array):
  """A replicated ``NamedSharding`` on ``x``'s mesh when ``x`` carries an
  explicit sharding (a mesh with ``AxisType.Explicit`` axes, the default of
  ``jax.make_mesh``); ``None`` otherwise (Auto/Manual meshes, no mesh)."""
  try:
    sharding = jax.typeof(x).sharding
  except (AttributeError, TypeError):
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True):
    return None
  if not getattr(mesh, "explicit_axes", ()):
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _leaf_gram(leaf: jax.Array, acc_dtype) -> jax.Array:
  """``(T, ...)`` leaf -> ``(T, T)`` Gram block in ``acc_dtype``.

  * GPU/TPU, and CPU with several devices: one ``dot_general`` contracting
    every non-task axis. cuBLAS/TPU matmuls split the long contraction
    themselves, and the SPMD partitioner turns a contraction over a sharded
    axis into local products plus one all-reduce of the ``T x T`` result
    (the blocked loop below would make it all-gather the leaf).
  * single-device CPU, float32 and bfloat16 leaves accumulated in float32:
    the compiled kernel of :mod:`gradcraft_jax._cpu_gram` when it is built
    (the usual case);
  * other single-device CPU cases: the blocked loop of
    :func:`_leaf_gram_blocked`.

  The choice is made while lowering (``lax.platform_dependent``) and from
  the process's device count, never from data.
  """
  t = leaf.shape[0]
  replicated = _explicit_replicated(leaf)
  if replicated is not None:
    # Explicit sharding (``jax.make_mesh`` default axis types): contract
    # every non-task axis in place (no reshape of sharded axes) and ask for
    # a replicated ``T x T`` result, i.e. local products plus one
    # all-reduce of ``T x T``.
    x = leaf
    if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2):
      x = x.astype(acc_dtype)
    axes = tuple(range(1, x.ndim))
    return jax.lax.dot_general(
      x,
      x,
      ((axes, axes), ((), ())),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=acc_dtype,
      out_sharding=replicated,
    )
  flat = leaf.reshape(t, -1)
  if (
    jax.device_count() == 1
    and jnp.dtype(acc_dtype) == jnp.float32
    and _cpu_gram.supports(flat.dtype)
    and _cpu_gram.available()
  ):
    # The compiled CPU kernel (float32 and bfloat16 leaves, float32 result;
    # a tree with float64 leaves accumulates everything in float64 below):
    # one read of the leaf, vectorised over parameters, on XLA's intra-op
    # thread pool.
    return jax.lax.platform_dependent(
      flat, cpu=_cpu_gram.gram, default=lambda x: _self_gram(x, acc_dtype)
    )
  if flat.shape[1] <= _block_size(t) or jax.device_count() > 1 or flat.dtype != acc_dtype:
    # 16-bit leaves: XLA:CPU would widen a 16-bit loop operand to a float32
    # copy of the whole leaf, so they always take the single contraction.
    return _self_gram(flat, acc_dtype)
  return jax.lax.platform_dependent(
    flat, cpu=lambda x: _leaf_gram_blocked(x, acc_dtype), default=lambda x: _self_gram(x, acc_dtype)
  )


def gram_matrix(stacked: Any) -> jax.Array:
  r"""Gram matrix of stacked per-task gradients.

  .. math:: K_{ij} = \langle g_i, g_j \rangle = \sum_{\text{leaves}}
     \sum_p G_{i,p} G_{j,p}

  Args:
    stacked: pytree whose leaves have shape ``(T, ...)``; ``float0`` leaves
      (the gradients of integer parameters, as ``jax.vjp`` returns them)
      count as zero.

  Returns:
    ``(T, T)`` symmetric positive semi-definite matrix in
    :func:`accumulation_dtype` (float32 for bf16/fp16/fp32 inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> g = {"a": jnp.array([[1., 0.], [1., 1.]]), "b": jnp.array([[2.], [0.]])}
    >>> gram_matrix(g)
    Array([[5., 1.],
           [1., 2.]], dtype=float32)
  """
  t = num_tasks(stacked)
  acc = accumulation_dtype(stacked)
  grams = [_leaf_gram(x, acc) for x in jax.tree_util.tree_leaves(stacked) if not _is_float0(x)]
  k = sum(grams[1:], grams[0]) if grams else jnp.zeros((t, t), acc)
  return 0.5 * (k + k.T)


def select_leaves(stacked: Any, predicate, name: str = "method") -> list:
  """The leaves of ``stacked`` whose key path (``jax.tree_util.keystr``,
  e.g. ``"['shared']['kernel']"``) satisfies ``predicate``; all leaves when
  ``predicate`` is ``None``.

  Raises:
    ValueError: if no leaf is selected (the message lists the key paths).

  >>> import jax.numpy as jnp
  >>> g = {"head": jnp.ones((2, 3)), "shared": jnp.ones((2, 4))}
  >>> [x.shape for x in select_leaves(g, lambda path: "shared" in path)]
  [(2, 4)]
  """
  pairs = jax.tree_util.tree_leaves_with_path(stacked)
  if predicate is None:
    return [leaf for _, leaf in pairs]
  chosen = [leaf for path, leaf in pairs if predicate(jax.tree_util.keystr(path))]
  if not chosen:
    paths = [jax.tree_util.keystr(path) for path, _ in pairs]
    raise ValueError(
      f"{name}: the leaf selection matches none of the gradient leaves; their key paths are {paths}"
    )
  return chosen


def weighted_sum(stacked: Any, weights: jax.Array) -> Any:
  r"""Combines stacked per-task gradients: ``sum_i weights[i] * g_i``.

  Args:
    stacked: pytree whose leaves have shape ``(T, ...)``.
    weights: ``(T,)`` weights.

  Returns:
    A pytree like the parameters (task axis removed), each leaf in its input
    dtype; the sum is accumulated in at least float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> weighted_sum({"a": jnp.array([[1., 2.], [3., 4.]])}, jnp.array([0.5, 1.]))
    {'a': Array([3.5, 5. ], dtype=float32)}
  """
  return weighted_sum_checked(stacked, weights)[0]


def weighted_sum_checked(stacked: Any, weights: jax.Array) -> tuple[Any, jax.Array]:
  """:func:`weighted_sum` and whether every element of the result is finite
  (a boolean scalar): on the CPU kernel's path the check comes from the same
  pass, elsewhere from one reduction over the result that XLA fuses."""
  t = num_tasks(stacked)
  weights = jnp.asarray(weights)
  if weights.shape != (t,):
    raise ValueError(f"weights have shape {weights.shape}; expected ({t},)")
  ok = jnp.array(True)

  def combine(leaf):
    nonlocal ok
    if _is_float0(leaf):  # the gradient of an integer parameter: no values
      return np.zeros(leaf.shape[1:], jax.dtypes.float0)
    acc = jnp.result_type(jnp.float32, leaf.dtype)
    w = weights.astype(acc)
    if kernel_pass(leaf):
      # The compiled CPU kernel: the same ordered float32 sum as the fused
      # loop below, with the columns split over XLA's intra-op thread pool
      # (XLA:CPU runs that loop on one core), and the finiteness probe.
      flat = leaf.reshape(t, -1)

      def fallback(x, v):
        out = _fused_sum(x, v, t, acc)
        return out, finite_probe(out)

      out, probe = jax.lax.platform_dependent(flat, w, cpu=_cpu_gram.weighted_sum, default=fallback)
      ok = ok & (probe[0] == 0.0)
      return out.reshape(leaf.shape[1:])
    if t <= _UNROLL_MAX_TASKS:
      # One fused elementwise pass: reads each task row once, casts inside
      # the fusion (no float32 copy of a bf16 leaf), writes the output once,
      # and keeps the leaf's sharding. (``jnp.sum(w[:, None] * leaf, 0)``
      # reduces over the major axis, which XLA:CPU runs thousands of times
      # slower.)
      out = _fused_sum(leaf, w, t, acc)
    else:
      out = jax.lax.dot_general(
        w,
        leaf.astype(acc),
        (((0,), (0,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=acc,
      )
    out = out.astype(leaf.dtype)
    ok = ok & jnp.all(jnp.isfinite(out))
    return out

  return jax.tree_util.tree_map(combine, stacked), ok


def same_treedef(treedef_1: Any, treedef_2: Any) -> bool:
  """Whether two tree structures (``jax.tree_util.PyTreeDef``) are equal.

  Typed ``Any``: jaxlib ships no type stubs for ``PyTreeDef``, so a type
  checker cannot compare two of them.

  Examples:
    >>> import jax
    >>> same_treedef(jax.tree_util.tree_structure({"a": 1}), jax.tree_util.tree_structure({"a": 2}))
    True
    >>> same_treedef(jax.tree_util.tree_structure({"a": 1}), jax.tree_util.tree_structure([1]))
    False
  """
  return bool(treedef_1 == treedef_2)


def is_concrete_number(x: Any) -> bool:
  """True for scalars whose value is known at trace time.

  Python and NumPy scalars, 0-d NumPy arrays and 0-d concrete (non-traced)
  JAX arrays, such as the values ``optax.inject_hyperparams`` passes to a
  factory inside ``init``.
  """
  if isinstance(x, (bool, int, float, np.number)):
    return True
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return True
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    return x.ndim == 0
  return False


def cross_gram(stacked_1: Any, stacked_2: Any) -> jax.Array:
  r"""The cross Gram matrix :math:`(K_{12})_{ij} = \langle g^{(1)}_i,
  g^{(2)}_j\rangle` of two stacked gradient pytrees of the same structure.

  Not symmetric in general. One read of each tree; accumulated in at least
  float32 (float64 for float64 leaves).

  Args:
    stacked_1: stacked per-task gradients of the first batch (leading
      axis ``T``).
    stacked_2: those of an independent second batch (same structure and
      shapes).

  Returns:
    ``(T, T)`` matrix.

  Examples:
    >>> import jax.numpy as jnp
    >>> a = {"w": jnp.array([[1., 0.], [0., 1.]])}
    >>> b = {"w": jnp.array([[2., 1.], [0., 3.]])}
    >>> cross_gram(a, b)
    Array([[2., 0.],
           [1., 3.]], dtype=float32)
  """
  leaves_1, tree_1 = jax.tree_util.tree_flatten(stacked_1)
  leaves_2, tree_2 = jax.tree_util.tree_flatten(stacked_2)
  if not same_treedef(tree_1, tree_2):
    raise ValueError(
      "cross_gram: the second batch's stacked gradients have another tree structure "
      f"({tree_2}) than the first ({tree_1})"
    )
  t1, t2 = num_tasks(stacked_1), num_tasks(stacked_2)
  if t1 != t2:
    raise ValueError(f"cross_gram: the batches have {t1} and {t2} tasks")
  acc = accumulation_dtype((leaves_1, leaves_2))
  out = jnp.zeros((t1, t1), acc)
  for a, b in zip(leaves_1, leaves_2):
    if a.shape != b.shape:
      raise ValueError(f"cross_gram: leaf shapes differ between the batches: {a.shape}, {b.shape}")
    replicated = _explicit_replicated(a)
    if replicated is not None:
      # explicit-sharding meshes: contract the non-task axes in place and
      # ask for a replicated (T, T) result (local products + one all-reduce),
      # as gram_matrix does
      axes = tuple(range(1, a.ndim))
      out = out + jax.lax.dot_general(
        a,
        b,
        ((axes, axes), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=acc,
        out_sharding=replicated,
      )
      continue
    out = out + jax.lax.dot_general(
      a.reshape(t1, -1),
      b.reshape(t1, -1),
      (((1,), (1,)), ((), ())),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=acc,
    )
  return out
