r"""The shared core: Gram matrix -> task weights -> one weighted sum.

Every method of the library is a :class:`Weighting` turned into an optax
transform by :func:`from_weighting`. Given stacked per-task gradients
``G`` (every leaf has a leading task axis ``T``) an update is three steps:

1. ``K = gram_matrix(G)``: the ``(T, T)`` Gram matrix
   :math:`K_{ij} = \langle g_i, g_j \rangle` (one read of ``G``; skipped for
   weightings with ``needs_gram=False`` such as :func:`~gradcraft_jax.mean`,
   NMT, DWA or uncertainty weighting);
2. ``w, state = weighting.weights(K, state, task_losses, num_tasks=T,
   **extra_args)``: ``(T,)`` task weights, ``O(T^3)`` work independent of the
   number of parameters;
3. ``weighted_sum(G, w)`` :math:`= \sum_i w_i g_i` (a second read of ``G``).

Nothing of size ``T x T x parameters`` is ever formed. Because every method
is a weighting, the weights can be computed without the stacked gradients
(from a Gram matrix formed in any other way): :func:`task_weights` asks any
method transform for them, also through ``optax.inject_hyperparams``, and the
lean training step (:func:`gradcraft_jax.combined_value_and_grad`) and the
representation-level gradients are built on it.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from gradcraft_jax._stacked import (
  accumulation_dtype,
  gram_matrix,
  is_concrete_number,
  num_tasks,
  select_leaves,
  weighted_sum_checked,
)

__all__ = [
  "Weighting",
  "WeightsQuery",
  "from_weighting",
  "task_weights",
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
      Queries then need the stacked gradients or a ``gram_fn`` accepting a
      ``leaves`` keyword, not a precomputed Gram matrix.
    delegates: for wrappers of another method (e.g. CR-MOGM). The core then
      computes nothing itself (``needs_gram`` and ``needs_losses`` must be
      false): ``weights`` receives ``gram=None``, the task losses as given
      (or ``None``), and the keyword ``query``, a :class:`WeightsQuery` (the
      stacked gradients, or the query received) to pass on with
      :func:`query_weights`; the wrapper keeps its own state finite.

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
  delegates: bool = False

  def __post_init__(self):
    if self.delegates and (self.needs_gram or self.needs_losses):
      raise ValueError(
        f"{self.name}: a delegating weighting reads neither the Gram matrix nor "
        "the losses itself (needs_gram=False, needs_losses=False)"
      )


@jax.tree_util.register_pytree_node_class
class WeightsQuery:
  """Asks a method transform for its weights instead of its update.

  Passed as the ``updates`` argument of a method's ``update``, it makes the
  transform return ``(weights, new_state)`` (weights of shape ``(T,)``)
  instead of ``(combined_update, new_state)``. Because it travels as the
  updates, it passes through optax wrappers that hand their updates and
  extra arguments to the inner transform unchanged and return its output
  (``optax.inject_hyperparams``, ``optax.inject_stateful_hyperparams``), so
  the weighting stays reachable through them. Use :func:`task_weights`
  rather than building queries by hand.

  Attributes:
    num_tasks: the task count ``T`` (static).
    stacked: stacked per-task gradients, or ``None``.
    gram: a ``(T, T)`` Gram matrix, or ``None``.
    gram_fn: a zero-argument callable returning the Gram matrix, called only
      if the weighting needs it (static), or ``None``.
  """

  def __init__(
    self,
    num_tasks: int,
    *,
    stacked: Any = None,
    gram: Any = None,
    gram_fn: Callable[[], Any] | None = None,
  ):
    self.num_tasks = num_tasks
    self.stacked = stacked
    self.gram = gram
    self.gram_fn = gram_fn

  def tree_flatten(self):
    return (self.stacked, self.gram), (self.num_tasks, self.gram_fn)

  @classmethod
  def tree_unflatten(cls, aux, children):
    stacked, gram = children
    return cls(aux[0], stacked=stacked, gram=gram, gram_fn=aux[1])

  def resolve_gram(self, leaves: Callable[[str], bool] | None = None) -> jax.Array:
    """The Gram matrix: given, computed by ``gram_fn``, or from ``stacked``.

    With ``leaves`` (a key-path predicate, see :attr:`Weighting.gram_leaves`)
    the Gram matrix of the selected leaves of ``stacked``, or
    ``gram_fn(leaves=leaves)``.
    """
    if leaves is not None:
      if self.stacked is not None and jax.tree_util.tree_leaves(self.stacked):
        return gram_matrix(select_leaves(self.stacked, leaves))
      if self.gram_fn is not None and "leaves" in inspect.signature(self.gram_fn).parameters:
        return self.gram_fn(leaves=leaves)
      raise ValueError(
        "this method reads the Gram matrix of a subset of the parameter leaves: "
        "give the stacked gradients (or a gram_fn accepting leaves=), not a "
        "precomputed Gram matrix"
      )
    if self.gram is not None:
      return jnp.asarray(self.gram)
    if self.gram_fn is not None:
      return self.gram_fn()
    if self.stacked is not None:
      return gram_matrix(self.stacked)
    raise ValueError(
      "WeightsQuery holds no Gram matrix, gram_fn or stacked "
      "gradients, but the method needs the Gram matrix"
    )


class _WeightsAnswer:
  """The weights returned for a :class:`WeightsQuery` (tags the answer).

  Deliberately *not* a pytree: an optax transform chained after a method
  (``optax.chain(method, optax.sgd(lr))``) cannot map over it silently, so
  only the method's own answer (passed through unchanged by wrappers such as
  ``optax.inject_hyperparams``) reaches :func:`task_weights`.
  """

  def __init__(self, weights):
    self.weights = weights


def keep_state_unless(ok, new_state, state):
  """``new_state`` where ``ok`` (a boolean scalar), else the previous ``state``
  (the core's rule for non-finite input; also used by the lean step)."""
  return jax.tree_util.tree_map(
    lambda new, old: jnp.where(ok, new, old).astype(jnp.result_type(new)), new_state, state
  )


def _all_finite(*arrays) -> jax.Array:
  ok = jnp.array(True)
  for a in arrays:
    if a is not None:
      ok = ok & jnp.all(jnp.isfinite(a))
  return ok


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


def _weights_and_state(
  w: Weighting, t: int, get_gram, task_losses, dtype, state, extra_args, query=None
):
  """Step 2 of every method, with the guarantees of the core.

  * the task count is checked against the one the method was built for;
  * the losses are checked when the method needs them;
  * when what the weighting reads (Gram matrix, losses) is not finite, the
    previous state is kept and the weights are NaN, so the update is visibly
    non-finite (``apply_if_finite`` skips it) and no state is poisoned.
  """
  if w.num_tasks is not None and is_concrete_number(w.num_tasks) and t != int(w.num_tasks):
    raise ValueError(
      f"{w.name}: built for num_tasks={w.num_tasks} but the stacked "
      f"gradients have {t} tasks on their leading axis"
    )
  if w.delegates:
    losses = None if task_losses is None else jnp.asarray(task_losses)
    weights, new_state = w.weights(None, state, losses, num_tasks=t, query=query, **extra_args)
    weights = jnp.asarray(weights)
    if weights.shape != (t,):
      raise ValueError(
        f"{w.name}: the weighting returned weights of shape {weights.shape}, expected ({t},)"
      )
    return weights, new_state
  losses = _check_losses(w, task_losses, t, dtype)
  gram = get_gram() if w.needs_gram else None
  weights, new_state = w.weights(gram, state, losses, num_tasks=t, **extra_args)
  weights = jnp.asarray(weights)
  if weights.shape != (t,):
    raise ValueError(
      f"{w.name}: the weighting returned weights of shape {weights.shape}, expected ({t},)"
    )
  finite = _all_finite(gram, losses)
  weights = jnp.where(finite, weights, jnp.nan).astype(weights.dtype)
  new_state = keep_state_unless(finite, new_state, state)
  return weights, new_state


def from_weighting(weighting: Weighting, *args, **kwargs) -> optax.GradientTransformationExtraArgs:
  """Turns a :class:`Weighting` into an optax transform over stacked gradients.

  Args:
    weighting: the method.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose
    ``update(stacked, state, params=None, *, task_losses=None,
    **extra_args)`` takes stacked per-task gradients (leading axis ``T`` on
    every leaf) and returns ``sum_i w_i g_i``, a pytree like the parameters
    in the input dtypes (accumulated in at least float32). An empty tree is
    returned unchanged with the state. When the Gram matrix or the losses
    are not finite the update is non-finite and the state is unchanged.

  The legacy form ``from_weighting(init_fn, weights_fn, *, name,
  needs_losses=False, needs_gram=True, expected_tasks=None)`` with
  ``weights_fn(gram, state, losses, extra_args_dict)`` still works and warns.
  """
  if not isinstance(weighting, Weighting):
    weighting = _legacy_weighting(weighting, *args, **kwargs)
  elif args or kwargs:
    raise TypeError("from_weighting(weighting) takes a Weighting only")
  w = weighting

  def update_fn(updates, state, params=None, *, task_losses=None, **extra_args):
    del params
    if isinstance(updates, WeightsQuery):
      if updates.num_tasks is None:  # "are you a method?" (see check_method)
        return _WeightsAnswer(None), state
      weights, new_state = _weights_and_state(
        w,
        updates.num_tasks,
        lambda: updates.resolve_gram(w.gram_leaves),
        task_losses,
        _query_dtype(updates, task_losses),
        state,
        extra_args,
        query=updates,
      )
      return _WeightsAnswer(weights), new_state
    if not jax.tree_util.tree_leaves(updates):
      return updates, state  # an empty group (optax.masked, partition)
    t = num_tasks(updates)
    weights, new_state = _weights_and_state(
      w,
      t,
      lambda: gram_matrix(select_leaves(updates, w.gram_leaves, w.name)),
      task_losses,
      accumulation_dtype(updates),
      state,
      extra_args,
      query=WeightsQuery(t, stacked=updates) if w.delegates else None,
    )
    # Gradients the weighting does not read (loss-only methods, RLW) may be
    # non-finite too: then the update is, and the state is kept as well. The
    # check is one reduction over the combined update (1/T of the input),
    # or free in the CPU kernel's pass.
    combined, ok = weighted_sum_checked(updates, weights)
    new_state = keep_state_unless(ok, new_state, state)
    return combined, new_state

  return optax.GradientTransformationExtraArgs(w.init, update_fn)


def _query_dtype(query: WeightsQuery, task_losses):
  leaves = jax.tree_util.tree_leaves((query.stacked, query.gram, task_losses))
  return accumulation_dtype(leaves) if leaves else jnp.float32


def _legacy_weighting(
  init_fn,
  weights_fn,
  *,
  name: str,
  needs_losses: bool = False,
  needs_gram: bool = True,
  expected_tasks: int | None = None,
) -> Weighting:
  warnings.warn(
    "from_weighting(init_fn, weights_fn, ...) is deprecated: build a "
    "gradcraft_jax.Weighting(init, weights, name=...) whose weights take "
    "(gram, state, losses, *, num_tasks, **extra_args), and pass it to "
    "from_weighting",
    DeprecationWarning,
    stacklevel=3,
  )

  def weights(gram, state, losses, *, num_tasks, **extra_args):
    del num_tasks
    return weights_fn(gram, state, losses, extra_args)

  return Weighting(
    init_fn,
    weights,
    name=name,
    needs_gram=needs_gram,
    needs_losses=needs_losses,
    num_tasks=expected_tasks,
  )


_NOT_A_METHOD = (
  "{fn} needs a method transform of gradcraft_jax (what gradcraft(), mgda(), "
  "mean(), nmt(...) or from_weighting(...) return, optionally wrapped in "
  "optax.inject_hyperparams or optax.inject_stateful_hyperparams), got {what}"
  ". An optax.chain, apply_if_finite or MultiSteps around it, or a "
  "plain optax optimizer, has no task weights: pass the method itself and "
  "chain the optimizer after it"
)


def task_weights(
  tx: optax.GradientTransformation,
  stacked: Any,
  state: Any,
  *,
  task_losses: Any = None,
  gram: Any = None,
  num_tasks_hint: int | None = None,
  _caller: str = "task_weights",
  **extra_args,
) -> tuple[jax.Array, Any]:
  """The task weights a method transform would use, and its new state.

  Every method's update is ``sum_i w_i g_i``; this returns ``w`` without
  forming the weighted sum, e.g. to weight the task losses of a single
  backward pass (:func:`gradcraft_jax.combined_value_and_grad`,
  :func:`gradcraft_jax.representation_value_and_grad`).

  Args:
    tx: a method transform of the library (every factory such as
      ``gradcraft()``, ``mgda()``, ``mean()``, ``nmt(...)``, or
      :func:`from_weighting`), possibly wrapped in
      ``optax.inject_hyperparams``; not an ``optax.chain``.
    stacked: stacked per-task gradients (leading axis ``T``) of any pytree
      structure (the weights depend on them only through their Gram matrix),
      or ``None`` when ``gram`` is given.
    state: ``tx``'s state.
    task_losses: ``(T,)`` losses, for methods that need them.
    gram: optionally the ``(T, T)`` Gram matrix, used instead of
      ``stacked``.
    num_tasks_hint: ``T`` when neither ``stacked`` nor ``gram`` gives it.
    **extra_args: passed on like ``update``'s extra arguments.

  Returns:
    ``(weights, new_state)`` with ``weights`` of shape ``(T,)``.

  Raises:
    TypeError: if ``tx`` is not a method transform of the library.

  >>> import jax.numpy as jnp, optax
  >>> import gradcraft_jax as gj
  >>> tx = optax.inject_hyperparams(gj.gradcraft)(tau=0.0, eps=0.0)
  >>> k = jnp.array([[1.0, -0.5], [-0.5, 1.0]])
  >>> w, _ = task_weights(tx, None, tx.init(None), gram=k)
  >>> w
  Array([0.75, 0.75], dtype=float32)
  """
  if stacked is not None and jax.tree_util.tree_leaves(stacked):
    t = num_tasks(stacked)
  elif gram is not None:
    t = int(jnp.shape(gram)[0])
  elif task_losses is not None:
    t = int(jnp.shape(task_losses)[0])
  elif num_tasks_hint is not None:
    t = int(num_tasks_hint)
  else:
    raise ValueError(
      f"{_caller}: give stacked gradients, a Gram matrix, the "
      "task losses or num_tasks_hint to fix T"
    )
  return _ask(
    tx, WeightsQuery(t, stacked=stacked, gram=gram), state, task_losses, extra_args, _caller
  )


def _ask(tx, query: WeightsQuery, state, task_losses, extra_args, caller):
  update = getattr(tx, "update", None)
  if not callable(update):
    raise TypeError(_NOT_A_METHOD.format(fn=caller, what=type(tx).__name__))
  try:
    answer, new_state = update(query, state, None, task_losses=task_losses, **extra_args)
  except Exception as e:
    # Not a method (an optax.chain or optimizer mapping over the query or the
    # answer), or a method rejecting its input (re-raised unchanged).
    check_method(tx, caller)
    raise e
  if not isinstance(answer, _WeightsAnswer):
    raise TypeError(_NOT_A_METHOD.format(fn=caller, what=type(tx).__name__))
  return answer.weights, new_state


def check_method(tx: Any, caller: str) -> None:
  """Raises ``TypeError`` unless ``tx`` is a method transform of the library
  (possibly wrapped in ``optax.inject_hyperparams``). Nothing is computed: the
  transform is asked to identify itself on an abstract evaluation."""
  answers = []

  def probe(state):
    answers.append(tx.update(WeightsQuery(None), state, None)[0])
    return jnp.zeros(())

  try:
    state = tx.init({"p": jnp.zeros((1,), jnp.float32)})  # tiny, concrete
    jax.eval_shape(probe, state)
    ok = bool(answers) and isinstance(answers[0], _WeightsAnswer)
  except Exception:  # noqa: BLE001 - any failure means "not a method"
    ok = False
  if not ok:
    raise TypeError(_NOT_A_METHOD.format(fn=caller, what=type(tx).__name__))


def query_weights(
  tx,
  state,
  *,
  num_tasks: int,
  gram_fn=None,
  gram=None,
  stacked=None,
  task_losses=None,
  caller: str,
  **extra_args,
):
  """Internal: :func:`task_weights` with a lazily computed Gram matrix."""
  return _ask(
    tx,
    WeightsQuery(num_tasks, stacked=stacked, gram=gram, gram_fn=gram_fn),
    state,
    task_losses,
    extra_args,
    caller,
  )


_MOVED = {
  "check_hyperparameter": "internal (gradcraft_jax.methods._common)",
  "empty_init": "internal; use lambda params: optax.EmptyState()",
  "gram_scale": "internal (gradcraft_jax.methods._common)",
  "normalize_gram": "internal (gradcraft_jax.methods._common)",
  "pinv_psd": "gradcraft_jax.pinv_psd",
}


def __getattr__(name):  # deprecation path for names moved out in 0.2
  if name in _MOVED:
    warnings.warn(
      f"gradcraft_jax.weighting.{name} moved: {_MOVED[name]}", DeprecationWarning, stacklevel=2
    )
    from gradcraft_jax.methods import _common

    return getattr(_common, name)
  if name == "WeightsFn":
    return Callable[..., tuple[jax.Array, Any]]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
