r"""Task weights from representation-level gradients (MGDA-UB style).

For a shared-bottom model, ``z = f(theta_sh, x)`` of shape ``(B, H)`` and
task losses ``l_i(z, theta_i)``, the per-task gradients with respect to
*all* shared parameters cost ``T`` backward passes through the encoder and
``T`` parameter-sized buffers. Sener & Koltun (NeurIPS 2018, arXiv
1810.04650, "MGDA-UB") observe that

.. math:: \nabla_{\theta_{sh}} l_i = J_z^\top \nabla_z l_i,
   \qquad J_z = \partial z / \partial \theta_{sh},

so the Gram matrix of the shared-parameter gradients is
:math:`K_{ij} = (\nabla_z l_i)^\top J_z J_z^\top (\nabla_z l_j)`. Replacing
it by the Gram matrix of the *representation* gradients
:math:`\nabla_z l_i` (``T x B x H``, computed by backpropagating through the
heads only) is exact when :math:`J_z J_z^\top \propto I` and otherwise
bounded by :math:`\|J_z\|^2` (MGDA-UB's upper-bound argument); for a
scale-invariant weighting (MGDA, GradCraft, UPGrad, ...) the constant does
not matter.

:func:`representation_value_and_grad` therefore

1. runs the model forward once (encoder, then heads);
2. computes the stacked representation gradients :math:`\nabla_z l_i` (a
   batched backward pass through the heads only);
3. gets task weights ``w`` from the method's weighting
   (:func:`gradcraft_jax.task_weights`);
4. backpropagates the single scalar :math:`\sum_i w_i l_i` (weights held
   constant) through the whole model: one backward pass.

The result is one parameter gradient, to be fed to a plain optax optimizer.
Task-specific head parameters get only their own task's gradient, scaled by
its weight, as in any weighted-sum method. The update is *not* identical to
applying the transform to the full per-task parameter gradients (whose
output is :math:`\sum_i w'_i g_i` with weights from the parameter Gram):
the weights are computed from the representation Gram instead.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gradcraft_jax.weighting import task_weights, weighting_of

__all__ = ["representation_value_and_grad"]


def representation_value_and_grad(
  encoder_fn: Callable[..., Any],
  heads_fn: Callable[..., jax.Array],
  tx: Any,
) -> Callable[..., tuple[jax.Array, Any, jax.Array, Any]]:
  r"""Weighted multi-task gradient from representation-level task weights.

  Args:
    encoder_fn: ``encoder_fn(params, *args) -> z``, the shared part (``z``
      any pytree of arrays, typically ``(B, H)``).
    heads_fn: ``heads_fn(params, z, *args) -> (T,)`` task losses (the
      task-specific part; it may read any entries of ``params``).
    tx: a method of the library that weights the tasks (e.g.
      ``gradcraft()``, ``mgda()``, ``mean()``, or one built by
      :func:`gradcraft_jax.inject_hyperparams`), not an ``optax.chain`` of
      it, or its :class:`~gradcraft_jax.Weighting`; its state is the
      ``state`` argument below (``tx.init(params)``).

  Returns:
    ``fn(params, state, *args, task_losses=None, **extra_args) ->
    (losses, grads, weights, new_state)`` where ``losses`` is ``(T,)``,
    ``grads`` (like ``params``) is the gradient of
    :math:`\sum_i w_i l_i` with the weights held constant, ``weights`` is
    ``(T,)`` and ``new_state`` is ``tx``'s new state. ``extra_args`` go to the
    weighting like an update's extra arguments; the losses are passed as
    ``task_losses`` (override with ``task_losses=``). Jittable.

  Raises:
    TypeError: at construction, if ``tx`` has no task weights.
    ValueError: if ``heads_fn`` does not return a 1-D vector of losses.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gradcraft_jax as gc
    >>> enc = lambda p, x: x @ p["w"]
    >>> heads = lambda p, z, x: jnp.stack([jnp.mean(z[:, 0] ** 2),
    ...                                    jnp.mean((z[:, 1] - 1.) ** 2)])
    >>> fn = representation_value_and_grad(enc, heads, gc.mgda())
    >>> params = {"w": jnp.eye(2)}
    >>> losses, grads, w, _ = fn(params, optax.EmptyState(), jnp.eye(2))
    >>> grads["w"].shape, w.shape
    ((2, 2), (2,))

  References:
    Sener and Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018
  """

  weighting = weighting_of(tx, "representation_value_and_grad")

  def fn(params, state, *args, task_losses=None, **extra_args):
    z, encoder_vjp = jax.vjp(lambda p: encoder_fn(p, *args), params)
    losses, heads_vjp = jax.vjp(lambda p, zz: heads_fn(p, zz, *args), params, z)
    if jnp.ndim(losses) != 1:
      raise ValueError(
        "representation_value_and_grad: heads_fn must return a 1-D vector "
        f"of task losses, got shape {jnp.shape(losses)}"
      )
    t = losses.shape[0]
    # Per-task gradients w.r.t. z only (the unused parameter cotangents of
    # the heads are dead code under jit).
    eye = jnp.eye(t, dtype=losses.dtype)
    z_grads = jax.vmap(lambda c: heads_vjp(c)[1])(eye)
    weights, new_state = task_weights(
      weighting,
      z_grads,
      state,
      task_losses=losses if task_losses is None else task_losses,
      **extra_args,
    )
    weights = jax.lax.stop_gradient(weights).astype(losses.dtype)
    # One backward pass of sum_i w_i l_i through heads and encoder.
    head_grads, z_cot = heads_vjp(weights)
    (encoder_grads,) = encoder_vjp(z_cot)
    grads = jax.tree_util.tree_map(jnp.add, head_grads, encoder_grads)
    return losses, grads, weights, new_state

  return fn
