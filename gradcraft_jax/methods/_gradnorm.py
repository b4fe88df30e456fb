r"""GradNorm: gradient normalisation (Chen et al., ICML 2018)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from gradcraft_jax._stacked import accumulation_dtype
from gradcraft_jax.methods._common import check_hyperparameter, check_num_tasks
from gradcraft_jax.weighting import Method, Weighting, from_weighting

__all__ = ["gradnorm", "gradnorm_weights", "gradnorm_step", "GradNormState"]


class GradNormState(NamedTuple):
  """State of :func:`gradnorm`.

  Attributes:
    count: int32 number of updates, saturating at 1.
    weights: ``(T,)`` the learned task weights (start at 1, sum ``T``).
    initial_losses: ``(T,)`` the losses of the first update, :math:`L_i(0)`.
  """

  count: jax.Array  # type: ignore[assignment]  # a public field name, shadows tuple.count
  weights: jax.Array
  initial_losses: jax.Array


def gradnorm_weights(weights: jax.Array) -> jax.Array:
  """The weights of this update: the learned weights as they stand (the
  update of step ``t`` uses :math:`w(t)`; :func:`gradnorm_step` gives
  :math:`w(t+1)`).

  Args:
    weights: ``(T,)`` learned weights :math:`w(t)`.

  Returns:
    ``weights``, unchanged.

  Examples:
    >>> import jax.numpy as jnp
    >>> gradnorm_weights(jnp.array([0.5, 1.5])).tolist()
    [0.5, 1.5]

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks <https://proceedings.mlr.press/v80/chen18a/chen18a.pdf>`_, ICML 2018
  """
  return weights


def gradnorm_step(
  gram: jax.Array,
  weights: jax.Array,
  task_losses: jax.Array,
  initial_losses: jax.Array,
  *,
  alpha,
  lr,
) -> jax.Array:
  r"""One GradNorm step on the task weights (Algorithm 1 of the paper).

  With :math:`n_i = \|\nabla_W l_i\| = \sqrt{K_{ii}}` (``gram`` the Gram
  matrix of the chosen layer ``W``; only its diagonal is read),

  .. math::
     G_i = w_i n_i, \quad \bar G = \tfrac1T \sum_i G_i, \quad
     \tilde L_i = \frac{l_i}{L_i(0)}, \quad r_i = \frac{\tilde L_i}
     {\tfrac1T \sum_j \tilde L_j},

  the loss :math:`L_{\text{grad}} = \sum_i |G_i - \bar G\, r_i^\alpha|` with
  the target :math:`\bar G r_i^\alpha` held constant has gradient
  :math:`\partial L_{\text{grad}} / \partial w_i = \mathrm{sign}(G_i - \bar
  G r_i^\alpha)\, n_i`. One SGD step of size ``lr`` on ``w``, then
  :math:`w \leftarrow T w / \sum_j w_j`. Weights are kept non-negative (a
  weight pushed below 0 is set to 0; if all are 0 they restart at 1). A
  zero initial loss gives :math:`\tilde L_i = 1`; negative ratios are
  clamped to 0.

  Args:
    gram: ``(T, T)`` Gram matrix of the chosen layer's task gradients.
    weights: ``(T,)`` current weights :math:`w(t)`.
    task_losses: ``(T,)`` losses :math:`l`.
    initial_losses: ``(T,)`` first losses :math:`L(0)`.
    alpha: asymmetry :math:`\alpha \ge 0`.
    lr: step size ``>= 0``.

  Returns:
    ``(T,)`` the next weights, non-negative, summing to ``T``.

  Examples:
    >>> import jax.numpy as jnp
    >>> # norms (3, 1), equal training rates: target 2 for both, so
    >>> # w = (1 - 0.1 * 3, 1 + 0.1 * 1) = (0.7, 1.1), rescaled to sum 2
    >>> w = gradnorm_step(jnp.diag(jnp.array([9., 1.])), jnp.ones(2), jnp.ones(2),
    ...                   jnp.ones(2), alpha=1.5, lr=0.1)
    >>> [round(float(x), 4) for x in w]
    [0.7778, 1.2222]

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks <https://proceedings.mlr.press/v80/chen18a/chen18a.pdf>`_, ICML 2018
  """
  t = weights.shape[0]
  dtype = weights.dtype
  n = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0)).astype(dtype)
  g = weights * n
  g_bar = jnp.mean(g)
  ratio = jnp.where(
    initial_losses != 0, task_losses / jnp.where(initial_losses != 0, initial_losses, 1.0), 1.0
  )
  ratio = jnp.clip(ratio, 0.0)
  mean_ratio = jnp.mean(ratio)
  r = jnp.where(mean_ratio > 0, ratio / jnp.where(mean_ratio > 0, mean_ratio, 1.0), 1.0)
  target = g_bar * r ** jnp.asarray(alpha, dtype)
  grad = jnp.sign(g - target) * n
  new = jnp.clip(weights - jnp.asarray(lr, dtype) * grad, 0.0)
  total = jnp.sum(new)
  return jnp.where(total > 0, t * new / jnp.where(total > 0, total, 1.0), jnp.ones_like(new))


def gradnorm(
  alpha: float = 1.5,
  lr: float = 1e-2,
  *,
  num_tasks: int,
  leaves: Callable[[str], bool] | None = None,
) -> Method:
  r"""GradNorm: learns task weights that equalise the tasks' training rates.

  Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization
  for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018
  (arXiv:1711.02257). The update is :math:`\sum_i w_i g_i` with the learned
  weights :math:`w(t)` (start at 1, sum ``T``: the sum of the gradients at
  the start), after which :math:`w` takes one step of
  :func:`gradnorm_step`: the weighted gradient norms
  :math:`w_i \|\nabla_W l_i\|` on a chosen layer ``W`` are pulled towards
  their mean times :math:`r_i^\alpha`, the task's relative inverse training
  rate (:math:`\tilde L_i = l_i / L_i(0)` over its mean; :math:`L(0)` the
  losses of the first update), with asymmetry ``alpha``.

  **The layer** ``W``: the paper uses the last shared layer, because its
  norms are cheap. Here ``leaves`` selects it: a predicate on a leaf's key
  path (``jax.tree_util.keystr``, e.g. ``lambda p: "shared_out" in p``);
  the weighting reads the diagonal of the Gram matrix of the selected
  leaves only (``Weighting.gram_leaves``), so the Gram pass reads only
  those leaves. ``leaves=None`` uses every parameter (the norms of the full
  task gradients). A predicate that selects nothing raises ``ValueError``
  at the first update. Weights of queries without stacked gradients
  (:func:`~gradcraft_jax.task_weights` with ``gram=``) cannot be formed for
  a leaf subset and raise ``ValueError``.

  Differences from the paper, written down: the weights take a plain SGD
  step of size ``lr`` (the paper updates them with the network's optimizer;
  LibMTL parametrises them as ``T softmax(logits)`` and uses the network's
  optimizer), and they are kept non-negative. ``lr`` acts on gradient
  norms, so it must suit their scale.

  Cost: the Gram diagonal of the chosen leaves (one read of them; none of
  the other parameters' gradients are read for the weights), plus the
  weighted sum; state: ``2 T + 1`` numbers. Order-free; weights sum to ``T``.

  Args:
    alpha: asymmetry :math:`\alpha \ge 0` (paper and LibMTL: 1.5;
      injectable).
    lr: step size ``>= 0`` of the weights (injectable).
    num_tasks: the task count ``T``.
    leaves: key-path predicate selecting the layer ``W``, or ``None``.

  Returns:
    An optax transformation whose ``update`` needs ``task_losses=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = gradnorm(alpha=1.5, lr=0.1, num_tasks=2, leaves=lambda p: "shared" in p)
    >>> g = {"head": jnp.ones((2, 3)), "shared": jnp.array([[3., 0.], [0., 1.]])}
    >>> state = tx.init(None)
    >>> upd, state = tx.update(g, state, task_losses=jnp.array([1., 1.]))
    >>> upd["shared"]  # weights 1 at the first update
    Array([3., 1.], dtype=float32)
    >>> # norms (3, 1), mean 2: w = (1 - 0.1 * 3, 1 + 0.1 * 1), rescaled to sum 2
    >>> [round(float(x), 4) for x in state.weights]
    [0.7778, 1.2222]

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks <https://proceedings.mlr.press/v80/chen18a/chen18a.pdf>`_, ICML 2018
  """
  check_hyperparameter("alpha", alpha, low=0.0, method="gradnorm")
  check_hyperparameter("lr", lr, low=0.0, method="gradnorm")
  check_num_tasks(num_tasks, "gradnorm", required=True)
  if leaves is not None and not callable(leaves):
    raise ValueError(
      "gradnorm: leaves must be a predicate on a leaf's key path (a callable "
      f"taking a str), or None; got {leaves!r}"
    )

  def init_fn(params):
    dtype = accumulation_dtype(params) if jax.tree_util.tree_leaves(params) else jnp.float32
    return GradNormState(
      count=jnp.zeros((), jnp.int32),
      weights=jnp.ones((num_tasks,), dtype),
      initial_losses=jnp.zeros((num_tasks,), dtype),
    )

  def weights_fn(gram, state, losses, **extra_args):
    del extra_args
    dtype = state.weights.dtype
    losses = losses.astype(dtype)
    initial = jnp.where(state.count >= 1, state.initial_losses, losses)
    w = gradnorm_weights(state.weights)
    new_w = gradnorm_step(gram.astype(dtype), state.weights, losses, initial, alpha=alpha, lr=lr)
    new_state = GradNormState(
      count=jnp.minimum(state.count + 1, 1).astype(jnp.int32),
      weights=new_w.astype(dtype),
      initial_losses=initial.astype(dtype),
    )
    return w, new_state

  return from_weighting(
    Weighting(
      init_fn,
      weights_fn,
      name="gradnorm",
      needs_losses=True,
      num_tasks=num_tasks,
      gram_leaves=leaves,
    )
  )
