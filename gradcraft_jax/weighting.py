r"""The shared core: Gram matrix -> task weights -> one weighted sum.

Every Gram-or-loss method of the library is a :class:`Weighting`, a public
object, turned into an optax transform by :func:`from_weighting`. Given
stacked per-task gradients ``G`` (every leaf has a leading task axis ``T``)
an update is three steps:

1. ``K = gram_matrix(G)``: the ``(T, T)`` Gram matrix
   :math:`K_{ij} = \langle g_i, g_j \rangle` (one read of ``G``; skipped for
   weightings with ``needs_gram=False`` such as :func:`~gradcraft_jax.mean`,
   NMT, DWA or uncertainty weighting);
2. ``w, state = weighting.weights(K, state, task_losses, num_tasks=T,
   **extra_args)``: ``(T,)`` task weights, ``O(T^3)`` work independent of the
   number of parameters;
3. ``weighted_sum(G, w)`` :math:`= \sum_i w_i g_i` (a second read of ``G``).

Nothing of size ``T x T x parameters`` is ever formed. The transform a
method's factory returns (a :class:`Method`) carries its weighting as the
attribute ``weighting``, so the weights can also be computed without the
stacked gradients, from a Gram matrix formed in any other way:
:func:`task_weights`, the lean training step
(:func:`gradcraft_jax.combined_value_and_grad`), representation-level
gradients and CR-MOGM read ``method.weighting`` directly. Hyperparameter
schedules go through :func:`inject_hyperparams`, which wraps a method
factory like ``optax.inject_hyperparams`` and keeps the weighting reachable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from gradcraft_jax._guards import all_finite, keep_state_unless
from gradcraft_jax._stacked import (
  accumulation_dtype,
  cross_gram,
  gram_matrix,
  is_concrete_number,
  num_tasks,
  select_leaves,
  weighted_sum_checked,
)

__all__ = [
  "CoordinatewiseMethod",
  "Method",
  "Weighting",
  "from_weighting",
  "inject_hyperparams",
  "task_weights",
  "weighting_of",
]


@dataclasses.dataclass(frozen=True)
class Weighting:
  r"""A multi-task method: how the Gram matrix (or the losses) become weights.

  Attributes:
    init: ``params -> state``, the method's state (``optax.EmptyState()``
      for stateless methods). ``params`` has no task axis; stateful methods
      take the task count from a ``num_tasks`` factory argument.
    weights: ``weights(gram, state, task_losses, *, num_tasks, **extra_args)
      -> (w, new_state)``. ``gram`` is the ``(T, T)`` Gram matrix of the
      stacked gradients (``None`` when ``needs_gram`` is false),
      ``task_losses`` the ``(T,)`` losses in the accumulation dtype (``None``
      when ``needs_losses`` is false), ``num_tasks`` the Python int ``T``,
      and ``extra_args`` the update's other keyword arguments (unknown ones
      must be accepted and ignored). Returns ``(T,)`` weights ``w``: the
      update is :math:`\sum_i w_i g_i`.
    name: the method's name, used in error messages.
    needs_gram: whether ``weights`` reads the Gram matrix. When false no Gram
      pass is made, and the lean training step needs one backward pass.
    needs_losses: whether ``update`` requires the keyword ``task_losses``.
    num_tasks: the task count the method was built for, or ``None`` for any;
      updates with another ``T`` raise ``ValueError``.
    gram_leaves: ``None`` (the Gram matrix sums over every leaf), or a
      predicate on a leaf's key path (``jax.tree_util.keystr``, e.g.
      ``"['shared']['kernel']"``): the Gram matrix the weighting reads sums
      over the selected leaves only (e.g. GradNorm's chosen shared layer).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> def inverse_norm(gram, state, losses, *, num_tasks, **extra_args):
    ...   return 1.0 / jnp.sqrt(jnp.diagonal(gram)), state
    >>> w = Weighting(lambda params: optax.EmptyState(), inverse_norm,
    ...               name="inverse_norm")
    >>> tx = from_weighting(w)
    >>> upd, _ = tx.update({"p": jnp.array([[3., 4.], [0., 2.]])}, tx.init(None))
    >>> upd["p"]
    Array([0.6, 1.8], dtype=float32)
  """

  init: Callable[[Any], Any]
  weights: Callable[..., tuple[jax.Array, Any]]
  _: dataclasses.KW_ONLY
  name: str = "weighting"
  needs_gram: bool = True
  needs_losses: bool = False
  num_tasks: int | None = None
  gram_leaves: Callable[[str], bool] | None = None


class Method(optax.GradientTransformationExtraArgs):
  """An optax transform over stacked gradients that carries its weighting.

  Every method factory of the library returns one. It is an
  ``optax.GradientTransformationExtraArgs`` (chain it, wrap it, shard it as
  any optax transform) whose ``update(stacked, state, params=None, *,
  task_losses=None, stacked_2=None, **extra_args)`` returns
  :math:`\\sum_i w_i g_i`, and whose attribute ``weighting`` is the
  :class:`Weighting` that gives ``w``: what :func:`task_weights`, the lean
  step and CR-MOGM read. ``init`` is the weighting's ``init``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradcraft_jax as gj
    >>> tx = gj.mean()
    >>> tx, isinstance(tx, gj.Method), tx.weighting.needs_gram
    (Method(mean), True, False)
    >>> upd, _ = tx.update({"w": jnp.array([[1., 2.], [3., 0.]])}, tx.init(None))
    >>> upd["w"].tolist()
    [2.0, 1.0]
  """

  weighting: Weighting

  def __new__(cls, init, update, weighting: Weighting):
    self = super().__new__(cls, init, update)
    object.__setattr__(self, "weighting", weighting)
    return self

  def __getnewargs__(self):
    return (self.init, self.update, self.weighting)

  kind = "weighting"

  def __repr__(self):
    return f"Method({self.weighting.name})"


class CoordinatewiseMethod(optax.GradientTransformationExtraArgs):
  """A multi-task transform outside the Gram -> weights -> sum core.

  Trimmed mean and GradDrop combine the stacked gradients coordinate by
  coordinate, and MoCo and ExcessMTL keep per-parameter state of the
  gradients: their update is not :math:`\\sum_i w_i g_i` for one weight
  vector, so they have no :class:`Weighting` and need the stacked gradients
  (:func:`~gradcraft_jax.per_task_value_and_grad`). :func:`task_weights`,
  the lean step and representation-level gradients refuse them with that
  reason. Otherwise an ordinary ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradcraft_jax as gj
    >>> tx = gj.trimmed_mean(1)
    >>> isinstance(tx, gj.CoordinatewiseMethod), tx.kind
    (True, 'coordinate-wise')
    >>> g = {"w": jnp.array([[1., 9.], [2., -7.], [100., 0.]])}
    >>> tx.update(g, tx.init(None))[0]["w"].tolist()  # the median of each column
    [2.0, 0.0]
    >>> try:
    ...   gj.weighting_of(tx)
    ... except TypeError:
    ...   print("no task weights")
    no task weights
  """

  kind = "coordinate-wise"


def _check_losses(w: Weighting, task_losses, t: int, dtype):
  if not w.needs_losses:
    return None
  if task_losses is None:
    raise ValueError(
      f"{w.name} needs the per-task losses: call "
      f"update(updates, state, params, task_losses=losses) with a ({t},) "
      "array"
    )
  losses = jnp.asarray(task_losses)
  if losses.shape != (t,):
    raise ValueError(
      f"{w.name}: task_losses has shape {losses.shape}, expected ({t},) to "
      "match the task axis of the stacked gradients"
    )
  return losses.astype(dtype)


def weigh(
  w: Weighting,
  state: Any,
  *,
  num_tasks: int,
  gram_fn: Callable[..., jax.Array],
  task_losses: Any,
  dtype: Any,
  extra_args: dict,
) -> tuple[jax.Array, Any]:
  """Step 2 of every method, with the guarantees of the core.

  * the task count is checked against the one the method was built for;
  * the losses are checked when the method needs them;
  * ``gram_fn(leaves)`` is called only when the weighting reads the Gram
    matrix (``leaves``: its ``gram_leaves`` predicate, or ``None``);
  * when what the weighting reads (Gram matrix, losses) is not finite, the
    previous state is kept and the weights are NaN, so the update is visibly
    non-finite (``apply_if_finite`` skips it) and no state is poisoned.
  """
  t = num_tasks
  if w.num_tasks is not None and is_concrete_number(w.num_tasks) and t != int(w.num_tasks):
    raise ValueError(
      f"{w.name}: built for num_tasks={w.num_tasks} but the stacked "
      f"gradients have {t} tasks on their leading axis"
    )
  losses = _check_losses(w, task_losses, t, dtype)
  gram = gram_fn(w.gram_leaves) if w.needs_gram else None
  weights, new_state = w.weights(gram, state, losses, num_tasks=t, **extra_args)
  weights = jnp.asarray(weights)
  if weights.shape != (t,):
    raise ValueError(
      f"{w.name}: the weighting returned weights of shape {weights.shape}, expected ({t},)"
    )
  finite = all_finite(gram, losses)
  weights = jnp.where(finite, weights, jnp.nan).astype(weights.dtype)
  return weights, keep_state_unless(finite, new_state, state)


def _with_cross_gram(stacked, stacked_2, extra_args: dict) -> dict:
  """Methods that read two independent mini-batches (MoDo, SDMGrad) read
  the keyword ``cross_gram``; ``stacked_2=`` forms it from the second
  batch's stacked gradients."""
  if stacked_2 is not None and extra_args.get("cross_gram") is None:
    if stacked is None or not jax.tree_util.tree_leaves(stacked):
      raise ValueError(
        "stacked_2= needs the first batch's stacked gradients too; pass cross_gram= instead"
      )
    extra_args = {**extra_args, "cross_gram": cross_gram(stacked, stacked_2)}
  return extra_args


def from_weighting(weighting: Weighting) -> Method:
  """Turns a :class:`Weighting` into an optax transform over stacked gradients.

  Args:
    weighting: the method.

  Returns:
    A :class:`Method` (an ``optax.GradientTransformationExtraArgs``) whose
    ``update(stacked, state, params=None, *, task_losses=None,
    stacked_2=None, **extra_args)`` takes stacked per-task gradients
    (leading axis ``T`` on every leaf) and returns ``sum_i w_i g_i``, a
    pytree like the parameters in the input dtypes (accumulated in at least
    float32). An empty tree is returned unchanged with the state. When the
    Gram matrix, the losses or the combined update are not finite the
    update is non-finite and the state is unchanged. ``stacked_2``: the
    stacked gradients of a second, independent mini-batch, for methods that
    read their cross Gram matrix (``cross_gram``). Its ``weighting``
    attribute is ``weighting``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> w = Weighting(lambda p: optax.EmptyState(),
    ...               lambda gram, s, l, *, num_tasks, **kw: (jnp.ones(num_tasks), s),
    ...               name="sum", needs_gram=False)
    >>> tx = from_weighting(w)
    >>> tx.weighting.name
    'sum'
    >>> tx.update({"p": jnp.array([[1., 2.], [3., 4.]])}, tx.init(None))[0]["p"]
    Array([4., 6.], dtype=float32)
  """
  if not isinstance(weighting, Weighting):
    raise TypeError(f"from_weighting takes a gradcraft_jax.Weighting, got {type(weighting)}")
  w = weighting

  def update_fn(updates, state, params=None, *, task_losses=None, stacked_2=None, **extra_args):
    del params
    if not jax.tree_util.tree_leaves(updates):
      return updates, state  # an empty group (optax.masked, partition)
    extra_args = _with_cross_gram(updates, stacked_2, extra_args)
    weights, new_state = weigh(
      w,
      state,
      num_tasks=num_tasks(updates),
      gram_fn=lambda leaves: gram_matrix(select_leaves(updates, leaves, w.name)),
      task_losses=task_losses,
      dtype=accumulation_dtype(updates),
      extra_args=extra_args,
    )
    # Gradients the weighting does not read (loss-only methods, RLW) may be
    # non-finite too: then the update is, and the state is kept as well. The
    # check is one reduction over the combined update (1/T of the input),
    # or free in the CPU kernel's pass.
    combined, ok = weighted_sum_checked(updates, weights)
    return combined, keep_state_unless(ok, new_state, state)

  return Method(w.init, update_fn, w)


_NOT_A_METHOD = (
  "{fn} needs a method of gradcraft_jax that weights the tasks (what gradcraft(), "
  "mgda(), mean(), nmt(...) or from_weighting(...) return, also through "
  "gradcraft_jax.inject_hyperparams), or its Weighting; got {what}. "
  "{hint}"
)


def weighting_of(method: Any, caller: str = "weighting_of") -> Weighting:
  """The :class:`Weighting` of a method transform (or the weighting itself).

  Raises:
    TypeError: with the reason, for anything else: an ``optax.chain`` or a
      wrapper around the method (pass the method itself and chain the
      optimizer after it), a method wrapped in ``optax.inject_hyperparams``
      (use :func:`inject_hyperparams`), or a coordinate-wise transform
      (trimmed mean, GradDrop, MoCo, ExcessMTL), which has no task weights.

  Examples:
    >>> import gradcraft_jax as gj
    >>> weighting_of(gj.mgda()).name
    'mgda'
  """
  if isinstance(method, Weighting):
    return method
  w = getattr(method, "weighting", None)
  if isinstance(w, Weighting):
    return w
  kind = getattr(method, "kind", None)
  if kind == "coordinate-wise":
    hint = (
      "It combines the stacked gradients coordinate by coordinate (or keeps per-parameter "
      "state), so it has no task weights: use it on the stacked gradients of "
      "per_task_value_and_grad."
    )
  elif isinstance(method, optax.GradientTransformation):
    hint = (
      "A plain optax transform, an optax.chain or a wrapper (apply_if_finite, MultiSteps, "
      "optax.inject_hyperparams) hides the weighting: pass the method itself, chain the "
      "optimizer after the combined gradient, and schedule hyperparameters with "
      "gradcraft_jax.inject_hyperparams."
    )
  else:
    hint = ""
  raise TypeError(_NOT_A_METHOD.format(fn=caller, what=type(method).__name__, hint=hint).strip())


def task_weights(
  method: Any,
  stacked: Any,
  state: Any,
  *,
  task_losses: Any = None,
  gram: Any = None,
  num_tasks: int | None = None,
  stacked_2: Any = None,
  **extra_args,
) -> tuple[jax.Array, Any]:
  """The task weights a method would use, and its new state.

  Every method's update is ``sum_i w_i g_i``; this returns ``w`` without
  forming the weighted sum, e.g. to weight the task losses of a single
  backward pass (:func:`gradcraft_jax.combined_value_and_grad`,
  :func:`gradcraft_jax.representation_value_and_grad`).

  Args:
    method: a method of the library (what ``gradcraft()``, ``mgda()``,
      ``mean()``, ``nmt(...)``, :func:`from_weighting` or
      :func:`inject_hyperparams` return) or its :class:`Weighting`.
    stacked: stacked per-task gradients (leading axis ``T``) of any pytree
      structure (the weights depend on them only through their Gram matrix),
      or ``None`` when ``gram`` is given.
    state: the method's state.
    task_losses: ``(T,)`` losses, for methods that need them.
    gram: optionally the ``(T, T)`` Gram matrix, used instead of
      ``stacked``.
    num_tasks: ``T`` when neither ``stacked``, ``gram`` nor the losses give
      it.
    stacked_2: a second batch's stacked gradients (MoDo, SDMGrad).
    **extra_args: passed on like ``update``'s extra arguments.

  Returns:
    ``(weights, new_state)`` with ``weights`` of shape ``(T,)``.

  Raises:
    TypeError: if ``method`` has no task weights (see :func:`weighting_of`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradcraft_jax as gj
    >>> tx = gj.inject_hyperparams(gj.gradcraft)(tau=0.0, eps=0.0)
    >>> k = jnp.array([[1.0, -0.5], [-0.5, 1.0]])
    >>> w, _ = task_weights(tx, None, tx.init(None), gram=k)
    >>> w
    Array([0.75, 0.75], dtype=float32)
  """
  w = weighting_of(method, "task_weights")
  has_stacked = stacked is not None and bool(jax.tree_util.tree_leaves(stacked))
  if has_stacked:
    t = _num_tasks_of(stacked)
  elif gram is not None:
    t = int(jnp.shape(gram)[0])
  elif task_losses is not None:
    t = int(jnp.shape(task_losses)[0])
  elif num_tasks is not None:
    t = int(num_tasks)
  else:
    raise ValueError(
      "task_weights: give stacked gradients, a Gram matrix, the task losses or num_tasks to fix T"
    )
  extra_args = _with_cross_gram(stacked if has_stacked else None, stacked_2, extra_args)

  def gram_fn(leaves):
    if leaves is not None:
      if not has_stacked:
        raise ValueError(
          f"{w.name} reads the Gram matrix of a subset of the parameter leaves: give "
          "the stacked gradients, not a precomputed Gram matrix"
        )
      return gram_matrix(select_leaves(stacked, leaves, w.name))
    if gram is not None:
      return jnp.asarray(gram)
    if has_stacked:
      return gram_matrix(stacked)
    raise ValueError(f"{w.name} reads the Gram matrix: give the stacked gradients or gram=")

  leaves = jax.tree_util.tree_leaves((stacked, gram, task_losses))
  return weigh(
    w,
    state,
    num_tasks=t,
    gram_fn=gram_fn,
    task_losses=task_losses,
    dtype=accumulation_dtype(leaves) if leaves else jnp.float32,
    extra_args=extra_args,
  )


_num_tasks_of = num_tasks


def inject_hyperparams(
  factory: Callable[..., Method],
  static_args: str | Iterable[str] = (),
  hyperparam_dtype: Any = None,
) -> Callable[..., Method]:
  """``optax.inject_hyperparams`` for method factories: schedules for a
  method's hyperparameters, with the weighting still reachable.

  ``inject_hyperparams(gj.gradcraft)(tau=schedule, eps=0.1)`` is a
  :class:`Method` whose state is optax's ``InjectStatefulHyperparamsState``
  (``state.hyperparams["tau"]`` holds the current value; numeric values can
  be changed in the state, callables are schedules of the update count, as
  in optax). Its update and its weighting give the same weights, so it works
  on the stacked path, with :func:`task_weights`, in the lean training step
  and inside CR-MOGM. (``optax.inject_hyperparams(gj.gradcraft)`` also works
  on the stacked path, but hides the weighting from the lean step.)

  Args:
    factory: a method factory of the library (``gradcraft``, ``mgda``, ...,
      or any function returning a :class:`Method`).
    static_args: names of callable arguments that are not schedules.
    hyperparam_dtype: the dtype of float hyperparameters (default: the
      parameters' highest float dtype, as in optax).

  Returns:
    A function taking the factory's arguments (numbers, arrays or
    schedules) and returning a :class:`Method`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import gradcraft_jax as gj
    >>> tx = gj.inject_hyperparams(gj.gradcraft)(tau=optax.linear_schedule(0., 1., 10), eps=0.)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> g = {"w": jnp.array([[1., 0.], [0., 2.]])}
    >>> for _ in range(2):
    ...   _, state = tx.update(g, state)
    >>> round(float(state.hyperparams["tau"]), 4)  # the value of the second update
    0.1
  """

  @functools.wraps(factory)  # optax reads the factory's signature
  def as_transform(*args, **kwargs):
    w = weighting_of(factory(*args, **kwargs), "inject_hyperparams")

    def update(gram, state, params=None, *, task_losses=None, num_tasks, **extra_args):
      del params
      return w.weights(gram, state, task_losses, num_tasks=num_tasks, **extra_args)

    return optax.GradientTransformationExtraArgs(w.init, update)

  injected = optax.inject_hyperparams(as_transform, static_args, hyperparam_dtype)
  static = {static_args} if isinstance(static_args, str) else set(static_args)

  @functools.wraps(factory)
  def wrapped(*args, **kwargs) -> Method:
    inner = injected(*args, **kwargs)

    def initial(name, value):  # the value at count 0, for the weighting's flags
      if name in static or not callable(value):
        return value
      if hasattr(value, "init"):  # a stateful schedule
        return value(value.init())
      return value(0)

    probe = weighting_of(
      factory(*[initial(None, a) for a in args], **{k: initial(k, v) for k, v in kwargs.items()}),
      "inject_hyperparams",
    )

    def weights_fn(gram, state, losses, *, num_tasks, **extra_args):
      return inner.update(gram, state, None, task_losses=losses, num_tasks=num_tasks, **extra_args)

    return from_weighting(
      Weighting(
        inner.init,
        weights_fn,
        name=probe.name,
        needs_gram=probe.needs_gram,
        needs_losses=probe.needs_losses,
        num_tasks=probe.num_tasks,
        gram_leaves=probe.gram_leaves,
      )
    )

  return wrapped
