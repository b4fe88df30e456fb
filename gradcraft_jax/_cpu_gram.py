"""The compiled CPU Gram kernel (``csrc/gram_cpu.cc``), an XLA FFI call.

XLA:CPU runs ``dot_general`` of a ``(T, n)`` matrix with itself far from
memory bandwidth when ``T`` is small and ``n`` is large: its matmul kernels
vectorise over ``T``. The kernel built from ``csrc/gram_cpu.cc`` at install
time vectorises over ``n`` instead, reads every element once, splits the
columns over XLA's intra-op thread pool and accumulates in float64 (see the
source for the details). It takes float32 and bfloat16 ``(T, n)`` matrices
and returns the float32 ``(T, T)`` Gram matrix.

The kernel is optional. :func:`available` is False when it was not built (no
C++ compiler at install time, or a platform it does not support), when it
fails its self-test against NumPy on first use, or when the environment
variable ``GRADCRAFT_JAX_CPU_KERNEL`` is ``0``; :mod:`gradcraft_jax._stacked`
then uses its pure-XLA blocked loop. Either way the result is the same Gram
matrix up to float32 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "available",
  "supports",
  "gram",
  "weighted_sum",
  "graddrop",
  "excess_pass",
  "keep_if",
]

_TARGETS = {
  jnp.dtype(jnp.float32): ("gradcraft_jax_gram_f32", "GradcraftGramF32"),
  jnp.dtype(jnp.bfloat16): ("gradcraft_jax_gram_bf16", "GradcraftGramBf16"),
}
_WSUM_TARGET = ("gradcraft_jax_wsum_f32", "GradcraftWeightedSumF32")
_DROP_TARGET = ("gradcraft_jax_graddrop_f32", "GradcraftGradDropF32")
_EXCESS_TARGET = ("gradcraft_jax_excess_f32", "GradcraftExcessF32")
_KEEP_TARGET = ("gradcraft_jax_keep_if", "GradcraftKeepIfFinite")
_ELEMENTWISE = (_DROP_TARGET, _EXCESS_TARGET, _KEEP_TARGET)
ENV_VAR = "GRADCRAFT_JAX_CPU_KERNEL"


def _library_path() -> str | None:
  try:
    spec = importlib.util.find_spec("gradcraft_jax._gram_cpu")
  except (ImportError, ValueError):
    return None
  return None if spec is None else spec.origin


def _ffi_gram(flat: jax.Array) -> jax.Array:
  t = flat.shape[0]
  name = _TARGETS[jnp.dtype(flat.dtype)][0]
  return jax.ffi.ffi_call(
    name, jax.ShapeDtypeStruct((t, t), jnp.float32), vmap_method="sequential"
  )(flat)


@jax.custom_jvp
def gram(flat: jax.Array) -> jax.Array:
  """``flat @ flat.T`` in float32 for a float32/bfloat16 ``(T, n)`` matrix.

  Only valid on CPU and when :func:`available` is True. Differentiable
  (forward and reverse mode, through a ``dot_general`` tangent rule) and
  batchable (``vmap`` runs the batch sequentially).
  """
  return _ffi_gram(flat)


@gram.defjvp
def _gram_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  k = gram(x)
  half = jax.lax.dot_general(
    dx,
    x,
    (((1,), (1,)), ((), ())),
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )
  return k, half + half.T


def _ffi_weighted_sum(flat: jax.Array, w: jax.Array):
  return jax.ffi.ffi_call(
    _WSUM_TARGET[0],
    (
      jax.ShapeDtypeStruct(flat.shape[1:], jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32),
    ),
    vmap_method="sequential",
  )(flat, w)


@jax.custom_jvp
def weighted_sum(flat: jax.Array, w: jax.Array):
  """``(w @ flat, probe)`` for a float32 ``(T, n)`` matrix and float32
  ``(T,)`` weights: the sum over the tasks in order in float32, the columns
  split over XLA's intra-op thread pool, and a ``(1,)`` probe that is 0 when
  every output is finite and NaN otherwise (computed in the same pass). Only
  valid on CPU when :func:`available`. Differentiable (a ``dot_general``
  tangent rule; the probe's tangent is 0) and batchable."""
  return _ffi_weighted_sum(flat, w)


@weighted_sum.defjvp
def _weighted_sum_jvp(primals, tangents):
  (x, w), (dx, dw) = primals, tangents
  hi = jax.lax.Precision.HIGHEST
  dims = (((0,), (0,)), ((), ()))
  tangent = jax.lax.dot_general(w, dx, dims, precision=hi) + jax.lax.dot_general(
    dw, x, dims, precision=hi
  )
  out, probe = weighted_sum(x, w)
  return (out, probe), (tangent, jnp.zeros_like(probe))


def graddrop(flat: jax.Array, u: jax.Array, leak: jax.Array):
  """GradDrop's combination of a float32 ``(T, n)`` matrix with float32
  thresholds ``u`` ``(n,)`` and leaks ``(T,)``: ``(out (n,), probe (1,))``,
  the probe 0 when every input element is finite and NaN otherwise. One
  read of ``flat`` (see ``csrc/gram_cpu.cc``). CPU only, when
  :func:`available`; not differentiable (GradDrop's masks are piecewise
  constant)."""
  n = flat.shape[1]
  return jax.ffi.ffi_call(
    _DROP_TARGET[0],
    (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)),
    vmap_method="sequential",
  )(flat, u, leak)


def excess_pass(g: jax.Array, s: jax.Array):
  """ExcessMTL's pass over float32 ``(T, n)`` gradients ``g`` and squared
  sums ``s``: ``(s + g**2, excess (T,), probe (1,))`` with
  ``excess_i = sum_k g_ik^2 / sqrt(s_new_ik + 1e-7)`` and the probe of
  ``g``'s finiteness. One read of ``g`` and ``s``, one write. CPU only."""
  t, n = g.shape
  return jax.ffi.ffi_call(
    _EXCESS_TARGET[0],
    (
      jax.ShapeDtypeStruct((t, n), jnp.float32),
      jax.ShapeDtypeStruct((t,), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32),
    ),
    vmap_method="sequential",
  )(g, s)


def keep_if(keep: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  """``new if keep else old`` for a boolean scalar ``keep``, written into
  ``new``'s buffer (``input_output_aliases``): free when ``keep`` is true,
  one copy of ``old`` otherwise (``jnp.where`` reads both and writes a
  third buffer on one core). CPU only."""
  return jax.ffi.ffi_call(
    _KEEP_TARGET[0],
    jax.ShapeDtypeStruct(new.shape, new.dtype),
    vmap_method="sequential",
    input_output_aliases={0: 0},
  )(new, old, jnp.asarray(keep, jnp.bool_))


def supports(dtype) -> bool:
  """Whether the kernel takes leaves of ``dtype`` (float32, bfloat16)."""
  return jnp.dtype(dtype) in _TARGETS


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when the kernel is built, registered and passes its self-test.

  Loads the shared library, registers its FFI targets with
  ``jax.ffi.register_ffi_target`` and checks the kernel once against a
  float64 NumPy product on a ``(5, 1037)`` matrix (tail columns included);
  any failure makes it False, so callers use the pure-XLA path.
  """
  if os.environ.get(ENV_VAR, "1") == "0":
    return False
  path = _library_path()
  if path is None:
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(path)
    for name, symbol in (*_TARGETS.values(), _WSUM_TARGET, *_ELEMENTWISE):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    x = np.random.default_rng(0).standard_normal((5, 1037)).astype(np.float32)
    # Usually first called while a transform is being traced, possibly under
    # a user's transfer guard: evaluate the self-test eagerly, outside that
    # trace, with its (one-off, host-side) transfers allowed.
    with (
      jax.ensure_compile_time_eval(),
      jax.transfer_guard("allow"),
      jax.default_device(jax.devices("cpu")[0]),
    ):
      got = np.asarray(jax.jit(_ffi_gram)(x), np.float64)
      w = np.linspace(-1.0, 2.0, 5, dtype=np.float32)
      got_sum, probe = jax.jit(_ffi_weighted_sum)(x, w)
      got_sum = np.asarray(got_sum, np.float64)
      # GradDrop with every leak 1 keeps everything: the column sums.
      u = np.full(x.shape[1], 0.5, np.float32)
      drop, drop_probe = jax.jit(graddrop)(x, u, np.ones(5, np.float32))
      s = np.abs(x[::-1])
      s_new, excess, excess_probe = jax.jit(excess_pass)(x, s)
      kept = jax.jit(keep_if)(False, s_new, s)
    x64 = x.astype(np.float64)
    want = x64 @ x64.T
    want_sum = w.astype(np.float64) @ x64
    want_s = s + x64**2
    want_excess = np.sum(x64**2 / np.sqrt(want_s + 1e-7), axis=1)
    return bool(
      np.allclose(got, want, rtol=1e-5, atol=1e-5)
      and np.allclose(got_sum, want_sum, rtol=1e-5, atol=1e-5)
      and np.allclose(np.asarray(drop), x64.sum(0), rtol=1e-5, atol=1e-5)
      and np.allclose(np.asarray(s_new), want_s, rtol=1e-6)
      and np.allclose(np.asarray(excess), want_excess, rtol=1e-5)
      and np.array_equal(np.asarray(kept), s)
      and float(np.asarray(probe)[0]) == 0.0
      and float(np.asarray(drop_probe)[0]) == 0.0
      and float(np.asarray(excess_probe)[0]) == 0.0
    )
  except Exception:  # pylint: disable=broad-except
    return False
