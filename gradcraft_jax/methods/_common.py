"""Helpers shared by the methods: validation, Gram normalisation, linear
algebra (internal; ``pinv_psd`` is re-exported by :mod:`gradcraft_jax.methods`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcraft_jax._stacked import is_concrete_number


def check_num_tasks(num_tasks: Any, method: str, *, required: bool = False) -> None:
  """Validates a ``num_tasks`` factory argument: a positive int.

  Python and NumPy integers and concrete 0-d integer arrays (what
  ``optax.inject_hyperparams`` passes to the factory) are accepted; bools,
  floats and non-positive values raise ``ValueError``. Traced values (inside
  an injected ``update``) cannot be checked and are let through.
  """
  if num_tasks is None:
    if required:
      raise ValueError(f"{method}: the state holds per-task arrays; pass num_tasks=T")
    return
  if isinstance(num_tasks, jax.core.Tracer):
    return
  bad = ValueError(f"{method}: num_tasks must be a positive int, got {num_tasks!r}")
  if isinstance(num_tasks, (bool, np.bool_)):
    raise bad
  if isinstance(num_tasks, (np.ndarray, jax.Array)):
    if num_tasks.ndim != 0 or not jnp.issubdtype(num_tasks.dtype, jnp.integer):
      raise bad
    num_tasks = int(num_tasks)
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise bad


def check_int(
  name: str, value: Any, *, low: int | None = None, method: str = "", allow_array: bool = False
) -> None:
  """Validates an integer factory argument (iteration counts, seeds): a
  Python or NumPy int (not a bool or float), ``>= low`` if given. With
  ``allow_array`` 0-d integer arrays are accepted too (and tracers let
  through), as ``optax.inject_hyperparams`` passes them (e.g. seeds)."""
  prefix = f"{method}: " if method else ""
  if allow_array and isinstance(value, jax.core.Tracer):
    return
  if allow_array and isinstance(value, (np.ndarray, jax.Array)):
    if value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
      value = int(value)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{prefix}{name} must be an int, got {value!r}")
  if low is not None and value < low:
    raise ValueError(f"{prefix}{name} must be an int >= {low}, got {value!r}")


def check_flag(name: str, value: Any, *, method: str = "") -> None:
  """Validates a boolean factory argument: ``True`` or ``False``."""
  if not isinstance(value, (bool, np.bool_)):
    prefix = f"{method}: " if method else ""
    raise ValueError(
      f"{prefix}{name} must be True or False, got {value!r} (under "
      f"optax.inject_hyperparams, list it in static_args)"
    )


def task_permutations(key: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
  """Splits ``key`` and draws one random order of ``range(T)`` per task.

  Returns:
    ``(new_key, perms)`` with ``perms`` of shape ``(T, T)``, row ``i`` a
    permutation used as the visiting order of task ``i``.
  """
  key, sub = jax.random.split(key)
  keys = jax.random.split(sub, t)
  perms = jax.vmap(lambda k: jax.random.permutation(k, t))(keys)
  return key, perms


def check_hyperparameter(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  method: str = "",
) -> None:
  """Raises ``ValueError`` when a concrete hyperparameter is out of range.

  Arrays and tracers (for instance from ``optax.inject_hyperparams``) are not
  checked: their values are not known at construction.
  """
  prefix = f"{method}: " if method else ""
  if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
    raise ValueError(f"{prefix}{name} must be a number, got {value!r}")
  if not is_concrete_number(value):
    return
  v = float(value)
  if not np.isfinite(v):
    raise ValueError(f"{prefix}{name} must be finite, got {value!r}")
  if low is not None and (v < low or (low_open and v == low)):
    rel = ">" if low_open else ">="
    raise ValueError(f"{prefix}{name} must be {rel} {low}, got {value!r}")
  if high is not None and (v > high or (high_open and v == high)):
    rel = "<" if high_open else "<="
    raise ValueError(f"{prefix}{name} must be {rel} {high}, got {value!r}")


def gram_scale(gram: jax.Array) -> jax.Array:
  """``max_i K_ii``, or 1 when the diagonal is all zero."""
  top = jnp.max(jnp.clip(jnp.diagonal(gram), 0.0))
  return jnp.where(top > 0, top, 1.0)


def normalize_gram(gram: jax.Array) -> jax.Array:
  """``K / max_i K_ii`` (unchanged when the diagonal is all zero).

  For weightings that are invariant to a global scale of the gradients this
  keeps float32 arithmetic in range for gradients from 1e-10 to 1e10. A
  non-finite Gram stays non-finite.
  """
  return gram / gram_scale(gram)


def pinv_psd(a: jax.Array, rcond: float | None = None) -> jax.Array:
  """Moore-Penrose pseudo-inverse of a symmetric PSD matrix via ``eigh``.

  Eigenvalues below ``rcond * max|eigenvalue|`` (default ``10 * n * eps``)
  are treated as zero, which gives the minimum-norm solution of singular
  systems and maps all-zero rows/columns (masked-out tasks) to zero.
  Works on batches with ``jax.vmap``.

  Args:
    a: ``(n, n)`` symmetric positive semi-definite matrix.
    rcond: relative cutoff of the eigenvalues.

  Returns:
    ``(n, n)`` pseudo-inverse of ``a``.

  Examples:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[2., 0.], [0., 0.]])
    >>> p = pinv_psd(a)
    >>> bool(jnp.allclose(p, jnp.array([[0.5, 0.], [0., 0.]])))
    True
    >>> bool(jnp.allclose(a @ p @ a, a)), bool(jnp.allclose(p @ a @ p, p))
    (True, True)
  """
  n = a.shape[-1]
  if rcond is None:
    rcond = 10 * n * float(jnp.finfo(a.dtype).eps)
  evals, evecs = jnp.linalg.eigh(0.5 * (a + a.T))
  cutoff = rcond * jnp.max(jnp.abs(evals))
  keep = evals > cutoff
  inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
  return (evecs * inv) @ evecs.T


def empty_init(params: Any) -> optax.EmptyState:
  """``init_fn`` of stateless methods."""
  del params
  return optax.EmptyState()


def magnitude_scale(norms: jax.Array, tau) -> jax.Array:
  """Magnitude factors ``s_i = tau * max_j n_j / n_i + 1 - tau``.

  A task with ``n_i = 0`` gets ``s_i = 1`` (its gradient is zero in the
  paper's setting, so any finite factor leaves it zero).
  """
  top = jnp.max(norms)
  pos = norms > 0
  ratio = jnp.where(pos, top / jnp.where(pos, norms, 1.0), 0.0)
  return jnp.where(pos, tau * ratio + (1.0 - tau), 1.0)
