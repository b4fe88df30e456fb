r"""Wrappers for method transforms: shared-only crafting, skipping, accumulation.

The method transforms of the library take *stacked* per-task gradients (every
leaf has a leading task axis ``T``) and return a parameter-shaped update.
optax's own wrappers assume that input and output have the shape of the
parameters, so some of them cannot wrap a chain that starts with a method:

* ``optax.apply_if_finite`` returns zeros shaped like its *input* when it
  rejects a step (the stacked shape, not the parameters'): use
  :func:`apply_if_finite`, same interface and state;
* ``optax.MultiSteps`` keeps accumulators shaped like the *parameters* and
  calls the inner update on them: use :class:`MultiSteps`, which accumulates
  the stacked gradients and the task losses and crafts once per ``k``
  micro-batches.

For running a method on the shared parameters only (as the GradCraft paper
describes) while task-specific parameters get their own task's gradient,
use :func:`shared_only` (with :func:`label_by_path` to build the mask) and
:func:`task_sum`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcraft_jax._stacked import num_tasks as _num_tasks
from gradcraft_jax._stacked import sum_over_tasks
from gradcraft_jax.methods._common import check_num_tasks

__all__ = [
  "ApplyIfFiniteState",
  "MultiSteps",
  "MultiStepsState",
  "SharedOnlyState",
  "apply_if_finite",
  "label_by_path",
  "shared_only",
  "task_sum",
]


# --------------------------------------------------------------------- task_sum


def task_sum() -> optax.GradientTransformationExtraArgs:
  r"""Per-task sum: :math:`\sum_i g_i` over the task axis of every leaf.

  For task-specific parameters (a tower used by task ``i`` only) the
  stacked gradient is zero in every row but row ``i``, so the sum gives each
  tower leaf exactly its own task's gradient (:func:`~gradcraft_jax.mean`
  would divide it by ``T``). Stateless; accepts and ignores extra arguments
  (``task_losses``, ...); an empty tree is returned unchanged.

  Returns:
    An optax transformation mapping stacked per-task gradients (leaves of
    shape ``(T, ...)``) to their sum over the task axis (same dtypes,
    accumulated in at least float32).

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = task_sum()
    >>> upd, _ = tx.update({"tower": jnp.array([[1., 2.], [0., 0.]])}, tx.init(None))
    >>> upd["tower"]
    Array([1., 2.], dtype=float32)
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not jax.tree_util.tree_leaves(updates):
      return updates, state
    _num_tasks(updates)  # one consistent task axis, or a clear error

    def total(leaf):
      acc = jnp.result_type(jnp.float32, leaf.dtype)
      return sum_over_tasks(leaf, acc).astype(leaf.dtype)

    return jax.tree_util.tree_map(total, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------- label_by_path


def label_by_path(
  params: Any,
  shared: Callable[[str], bool] | str | list[str] | tuple[str, ...],
  *,
  labels: tuple[Any, Any] | None = None,
) -> Any:
  """Labels the leaves of ``params`` as shared or task-specific by key path.

  Args:
    params: the parameters (or any pytree with their structure; arrays or
      ``jax.ShapeDtypeStruct`` leaves).
    shared: which leaves are shared. Either a callable on the leaf's key path
      string (``jax.tree_util.keystr``, e.g. ``"['encoder']['kernel']"``)
      returning a bool, or a regular expression (or a list of them) matched
      with ``re.search`` against that string.
    labels: ``None`` for a pytree of bools (``True`` = shared), the mask
      :func:`shared_only` and ``optax.masked`` take; or a pair
      ``(shared_label, task_label)`` for the labels ``optax.partition`` takes.

  Returns:
    A pytree like ``params`` of Python bools (or of the two labels).

  Examples:
    >>> params = {"bottom": {"w": 0}, "tower_0": {"w": 0}, "tower_1": {"w": 0}}
    >>> label_by_path(params, lambda path: "tower" not in path)
    {'bottom': {'w': True}, 'tower_0': {'w': False}, 'tower_1': {'w': False}}
    >>> label_by_path(params, r"bottom", labels=("shared", "task"))
    {'bottom': {'w': 'shared'}, 'tower_0': {'w': 'task'}, 'tower_1': {'w': 'task'}}
  """
  if isinstance(shared, str):
    shared = [shared]
  if isinstance(shared, (list, tuple)):
    patterns = [re.compile(p) for p in shared]
    if not patterns:
      raise ValueError("label_by_path: give at least one pattern for the shared leaves")
    is_shared = lambda path: any(p.search(path) for p in patterns)
  elif callable(shared):
    is_shared = shared
  else:
    raise TypeError(
      "label_by_path: shared must be a callable on the key path string, a regular "
      f"expression or a list of them, got {type(shared).__name__}"
    )

  def label(path, leaf):
    del leaf
    flag = is_shared(jax.tree_util.keystr(path))
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(
        f"label_by_path: shared({jax.tree_util.keystr(path)!r}) returned "
        f"{type(flag).__name__}, expected a Python bool"
      )
    if labels is None:
      return bool(flag)
    return labels[0] if flag else labels[1]

  return jax.tree_util.tree_map_with_path(label, params)


# ------------------------------------------------------------------ shared_only


@jax.tree_util.register_pytree_node_class
class _StaticMask:
  """The flattened shared mask, kept in the state as static structure (no
  array leaves): it survives ``jit``, checkpoints and ``tree_map``."""

  def __init__(self, flags: tuple[bool, ...]):
    self.flags = tuple(bool(f) for f in flags)

  def tree_flatten(self):
    return (), self.flags

  @classmethod
  def tree_unflatten(cls, aux, children):
    del children
    return cls(aux)

  def __repr__(self):
    return f"_StaticMask({self.flags})"

  def __eq__(self, other):
    return isinstance(other, _StaticMask) and other.flags == self.flags

  def __hash__(self):
    return hash(self.flags)


class SharedOnlyState(NamedTuple):
  """State of :func:`shared_only`.

  Attributes:
    inner_state: the method's state.
    mask: the shared mask evaluated on the parameters at ``init`` (static
      structure, no arrays).
  """

  inner_state: Any
  mask: _StaticMask


def _resolve_mask(shared_mask, params, caller):
  mask = shared_mask(params) if callable(shared_mask) else shared_mask
  # a prefix of params (e.g. {"bottom": True, "towers": False}) is broadcast
  try:
    full = jax.tree_util.tree_map(
      lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub), mask, params
    )
  except ValueError as e:
    raise ValueError(
      f"{caller}: the shared mask must be a pytree of bools with the structure of the "
      f"parameters (or a prefix of it): {e}"
    ) from e
  flags = jax.tree_util.tree_leaves(full)
  for f in flags:
    if not isinstance(f, (bool, np.bool_)):
      raise TypeError(
        f"{caller}: the shared mask must hold Python bools known at init (evaluate it "
        f"on the parameters' paths or shapes, not their values), got {type(f).__name__}"
      )
  return tuple(bool(f) for f in flags)


def shared_only(
  method: optax.GradientTransformation,
  shared_mask: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``method`` on the shared leaves only; task-specific leaves get
  :func:`task_sum`.

  The GradCraft paper (and most multi-task papers) describe the method on
  the shared parameters :math:`\theta_s`: the Gram matrix, the weights and
  the crafted update are computed from the shared leaves only, and each
  task's tower is trained with its own task's gradient. This transform does
  exactly that: the method sees the stacked gradients of the leaves where
  the mask is ``True``; the other leaves get the sum over the task axis,
  which for a tower used by task ``i`` only is task ``i``'s gradient.

  The mask is evaluated once, on the *parameters* at ``init`` (not on the
  stacked updates, whose leaves have an extra task axis), and kept in the
  state as static structure.

  Args:
    method: a method transform of the library (``gradcraft()``, ``mgda()``,
      ...), or any transform over stacked gradients.
    shared_mask: a pytree of Python bools with the structure of the
      parameters (or a prefix of it), ``True`` for shared leaves; or a
      callable ``params -> mask`` evaluated on the parameters at ``init``
      (see :func:`label_by_path`).

  Returns:
    An optax transformation over stacked per-task gradients; extra arguments
    (``task_losses``, ...) are passed to ``method``. With no shared leaf the
    method is not called and its state is unchanged.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import gradcraft_jax as gj
    >>> params = {"bottom": jnp.zeros(2), "tower": jnp.zeros(1)}
    >>> tx = shared_only(gj.mean(), lambda p: gj.label_by_path(p, "bottom"))
    >>> stacked = {"bottom": jnp.array([[2., 0.], [0., 4.]]),
    ...            "tower": jnp.array([[3.], [0.]])}
    >>> upd, _ = tx.update(stacked, tx.init(params))
    >>> upd["bottom"], upd["tower"]
    (Array([1., 2.], dtype=float32), Array([3.], dtype=float32))
  """
  caller = "shared_only"
  if not callable(getattr(method, "update", None)) or not callable(getattr(method, "init", None)):
    raise TypeError(f"{caller}: method must be an optax transform, got {type(method).__name__}")
  method = optax.with_extra_args_support(method)
  summing = task_sum()

  def split(tree, flags):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if len(leaves) != len(flags):
      raise ValueError(
        f"{caller}: the updates have {len(leaves)} leaves but the shared mask built at "
        f"init from the parameters has {len(flags)}; pass updates with the structure "
        "of the parameters"
      )
    shared = [x if f else None for x, f in zip(leaves, flags)]
    task = [None if f else x for x, f in zip(leaves, flags)]
    return shared, task, treedef

  def init_fn(params):
    flags = _resolve_mask(shared_mask, params, caller)
    shared, _, _ = split(params, flags)
    return SharedOnlyState(method.init(shared), _StaticMask(flags))

  def update_fn(updates, state, params=None, **extra_args):
    flags = state.mask.flags
    shared, task, treedef = split(updates, flags)
    shared_params = None if params is None else split(params, flags)[0]
    if any(flags) and jax.tree_util.tree_leaves(shared):
      shared_out, inner = method.update(shared, state.inner_state, shared_params, **extra_args)
    else:
      shared_out, inner = shared, state.inner_state
    task_out, _ = summing.update(task, optax.EmptyState())
    out = [s if f else t for s, t, f in zip(shared_out, task_out, flags)]
    return jax.tree_util.tree_unflatten(treedef, out), SharedOnlyState(inner, state.mask)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------- apply_if_finite


class ApplyIfFiniteState(NamedTuple):
  """State of :func:`apply_if_finite` (the fields of optax's).

  Attributes:
    notfinite_count: consecutive non-finite steps so far (reset by a finite
      one).
    last_finite: whether the last step was finite.
    total_notfinite: non-finite steps in total.
    inner_state: the wrapped chain's state.
  """

  notfinite_count: Any
  last_finite: Any
  total_notfinite: Any
  inner_state: Any


def _tree_finite(tree) -> jax.Array:
  ok = jnp.array(True)
  for leaf in jax.tree_util.tree_leaves(tree):
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(leaf))
  return ok


def apply_if_finite(
  inner: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
  r"""Skips steps whose stacked gradients, losses or update are not finite.

  ``optax.apply_if_finite`` with the same interface and state
  (:class:`ApplyIfFiniteState`: ``notfinite_count``, ``last_finite``,
  ``total_notfinite``, ``inner_state``), for chains whose *input* has a task
  axis (``optax.chain(method, optimizer)``); optax's returns zeros shaped like
  its input when it skips, which a chain starting with a method cannot use.

  A step is *finite* when the stacked gradients, the ``task_losses`` (when
  given) and the inner chain's update are all finite (optax checks its input
  only; the update is checked too, so that a chain that overflows on finite
  input is skipped rather than applied). On a non-finite step
  the update is zeros shaped like the inner chain's output (the parameters)
  and *every* inner state is kept (the method's and the optimizer's), unless
  more than ``max_consecutive_errors`` steps in a row were non-finite: then,
  as in optax, the inner update is applied anyway.

  Args:
    inner: the chain to wrap, typically ``optax.chain(method, optimizer)``.
    max_consecutive_errors: how many non-finite steps in a row are skipped
      (a non-negative int).

  Returns:
    An optax transformation with ``update(stacked, state, params=None,
    **extra_args)``; extra arguments are passed to ``inner``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import gradcraft_jax as gj
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = apply_if_finite(optax.chain(gj.gradcraft(), optax.sgd(1.0)), 3)
    >>> state = tx.init(params)
    >>> bad = {"w": jnp.array([[jnp.nan, 1.], [0., 1.]])}
    >>> upd, state = tx.update(bad, state, params)
    >>> upd["w"], int(state.notfinite_count)
    (Array([0., 0.], dtype=float32), 1)
  """
  if isinstance(max_consecutive_errors, (bool, np.bool_)) or not isinstance(
    max_consecutive_errors, (int, np.integer)
  ):
    raise ValueError(
      f"apply_if_finite: max_consecutive_errors must be a non-negative int, got "
      f"{max_consecutive_errors!r}"
    )
  if max_consecutive_errors < 0:
    raise ValueError(
      f"apply_if_finite: max_consecutive_errors must be >= 0, got {max_consecutive_errors}"
    )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return ApplyIfFiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.array(True, jnp.bool_),
      total_notfinite=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    finite = _tree_finite(updates) & _tree_finite(new_updates)
    if extra_args.get("task_losses") is not None:
      finite = finite & _tree_finite(extra_args["task_losses"])
    notfinite_count = jnp.where(
      finite, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count)
    )
    apply = finite | (notfinite_count > max_consecutive_errors)
    out_updates, inner_state = jax.lax.cond(
      apply,
      lambda: (new_updates, new_inner),
      lambda: (jax.tree_util.tree_map(jnp.zeros_like, new_updates), state.inner_state),
    )
    return out_updates, ApplyIfFiniteState(
      notfinite_count=notfinite_count,
      last_finite=finite,
      total_notfinite=jnp.where(
        finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)
      ),
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------- MultiSteps


class MultiStepsState(NamedTuple):
  """State of :class:`MultiSteps`.

  Attributes:
    mini_step: micro-batches accumulated so far in this step (``0..k-1``).
    gradient_step: inner updates made so far.
    inner_opt_state: the wrapped chain's state.
    acc_grads: running mean of the stacked gradients (leaves ``(T, ...)``).
    acc_losses: running mean of the task losses, ``(T,)`` (zeros when no
      losses are passed).
  """

  mini_step: Any
  gradient_step: Any
  inner_opt_state: Any
  acc_grads: Any
  acc_losses: Any


class MultiSteps:
  r"""Gradient accumulation for chains that start with a method transform.

  ``optax.MultiSteps`` with the same interface (``init``, ``update``,
  ``gradient_transformation()``, ``has_updated``, ``inner_opt``) for chains
  whose input has a task axis. It accumulates the *stacked* per-task
  gradients and the ``task_losses`` over ``k`` micro-batches and calls the
  inner chain once per ``k``, on their means, so a method crafts the
  gradients of the large batch:

  * gradients: the mean over the ``k`` micro-batches (for micro-batches of
    equal size and mean-reduced losses, the large batch's gradients);
  * ``task_losses``: the mean over the ``k`` micro-batches (the large batch's
    mean losses);
  * any other extra argument: the one passed with the ``k``-th micro-batch.

  Mid steps return zeros shaped like the inner chain's output (the
  parameters) and leave the inner state unchanged; the inner chain is
  evaluated in a ``lax.cond`` branch taken only on the ``k``-th micro-batch.
  (``optax.MultiSteps`` keeps parameter-shaped accumulators, which a chain
  starting with a method cannot consume.)

  Args:
    opt: the chain to wrap, typically ``optax.chain(method, optimizer)``.
    every_k_schedule: ``k``, an int, or a callable ``gradient_step -> k``.
    num_tasks: the task count ``T`` (keyword-only, required): the
      accumulators have the stacked shape ``(T, ...)`` and are created at
      ``init`` from the parameters.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import gradcraft_jax as gj
    >>> params = {"w": jnp.zeros(2)}
    >>> ms = MultiSteps(optax.chain(gj.mean(), optax.sgd(1.0)), 2, num_tasks=2)
    >>> state = ms.init(params)
    >>> upd, state = ms.update({"w": jnp.array([[2., 0.], [0., 0.]])}, state, params)
    >>> upd["w"], bool(ms.has_updated(state))
    (Array([0., 0.], dtype=float32), False)
    >>> upd, state = ms.update({"w": jnp.array([[0., 0.], [0., 2.]])}, state, params)
    >>> upd["w"], bool(ms.has_updated(state))  # mean of [[1, 0], [0, 1]]
    (Array([-0.5, -0.5], dtype=float32), True)
  """

  def __init__(
    self,
    opt: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    *,
    num_tasks: int | None = None,
  ):
    if num_tasks is None:
      raise ValueError(
        "MultiSteps: pass num_tasks=T; the accumulators hold stacked per-task "
        "gradients of shape (T, ...)"
      )
    check_num_tasks(num_tasks, "MultiSteps")
    if not callable(every_k_schedule):
      if isinstance(every_k_schedule, (bool, np.bool_)) or not isinstance(
        every_k_schedule, (int, np.integer)
      ):
        raise ValueError(
          f"MultiSteps: every_k_schedule must be a positive int or a callable, got "
          f"{every_k_schedule!r}"
        )
      if every_k_schedule < 1:
        raise ValueError(f"MultiSteps: every_k_schedule must be >= 1, got {every_k_schedule}")
      k = int(every_k_schedule)
      schedule: Callable[[jax.Array], jax.Array | int] = lambda step: k
    else:
      schedule = every_k_schedule
    self._opt = optax.with_extra_args_support(opt)
    self._every_k_schedule = schedule
    self._num_tasks = int(num_tasks)

  @property
  def inner_opt(self):
    return self._opt

  def init(self, params: Any) -> MultiStepsState:
    t = self._num_tasks
    return MultiStepsState(
      mini_step=jnp.zeros([], jnp.int32),
      gradient_step=jnp.zeros([], jnp.int32),
      inner_opt_state=self._opt.init(params),
      acc_grads=jax.tree_util.tree_map(
        lambda p: jnp.zeros((t, *jnp.shape(p)), jnp.result_type(p)), params
      ),
      acc_losses=jnp.zeros((t,), jnp.float32),
    )

  def update(self, updates, state: MultiStepsState, params=None, **extra_args):
    """Accumulates one micro-batch; every ``k``-th call runs the inner chain."""
    t = _num_tasks(updates) if jax.tree_util.tree_leaves(updates) else self._num_tasks
    if t != self._num_tasks:
      raise ValueError(
        f"MultiSteps: built for num_tasks={self._num_tasks} but the stacked gradients "
        f"have {t} tasks on their leading axis"
      )
    k = self._every_k_schedule(state.gradient_step)
    n = state.mini_step
    mean = lambda new, acc: acc + (new.astype(acc.dtype) - acc) / (n + 1).astype(acc.dtype)
    try:
      acc_grads = jax.tree_util.tree_map(
        lambda g, a: mean(g, a).astype(a.dtype), updates, state.acc_grads
      )
    except ValueError as e:
      raise ValueError(
        "MultiSteps: the stacked gradients do not have the structure of the parameters "
        f"given to init: {e}"
      ) from e
    losses = extra_args.pop("task_losses", None)
    has_losses = losses is not None
    if has_losses:
      losses = jnp.asarray(losses)
      if losses.shape != (self._num_tasks,):
        raise ValueError(
          f"MultiSteps: task_losses has shape {losses.shape}, expected ({self._num_tasks},)"
        )
      acc_losses = mean(losses, state.acc_losses)
    else:
      acc_losses = state.acc_losses
    emit = n == (k - 1)
    loss_args = {"task_losses": acc_losses} if has_losses else {}

    def final(acc_grads, inner_state):
      return self._opt.update(acc_grads, inner_state, params, **loss_args, **extra_args)

    out_shape, _ = jax.eval_shape(final, acc_grads, state.inner_opt_state)

    def mid(acc_grads, inner_state):
      del acc_grads
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
      return zeros, inner_state

    new_updates, inner_state = jax.lax.cond(emit, final, mid, acc_grads, state.inner_opt_state)
    reset = lambda a: jnp.where(emit, jnp.zeros_like(a), a)
    new_state = MultiStepsState(
      mini_step=jnp.where(emit, 0, optax.safe_increment(n)).astype(jnp.int32),
      gradient_step=jnp.where(
        emit, optax.safe_increment(state.gradient_step), state.gradient_step
      ).astype(jnp.int32),
      inner_opt_state=inner_state,
      acc_grads=jax.tree_util.tree_map(reset, acc_grads),
      acc_losses=reset(acc_losses),
    )
    return new_updates, new_state

  def has_updated(self, state: MultiStepsState) -> jax.Array:
    """Whether the last call ran the inner chain (as ``optax.MultiSteps``)."""
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """The wrapper as an ``optax.GradientTransformationExtraArgs``."""
    return optax.GradientTransformationExtraArgs(init=self.init, update=self.update)
