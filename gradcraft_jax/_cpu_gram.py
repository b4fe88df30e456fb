"""The compiled CPU Gram kernel (``csrc/gram_cpu.cc``), an XLA FFI call.

XLA:CPU runs ``dot_general`` of a ``(T, n)`` matrix with itself far from
memory bandwidth when ``T`` is small and ``n`` is large: its matmul kernels
vectorise over ``T``. The kernel built from ``csrc/gram_cpu.cc`` at install
time vectorises over ``n`` instead, reads every element once, splits the
columns over XLA's intra-op thread pool and accumulates in float64 (see the
source for the details). It takes float32 and bfloat16 ``(T, n)`` matrices
and returns the float32 ``(T, T)`` Gram matrix. The same library holds the
weighted sum, GradDrop's and ExcessMTL's passes and an in-place select.

The kernel is optional. :func:`available` is False, and :func:`kernel_info`
says why in one line, when it was not built (no C++ compiler at install
time, or a platform it does not support), when it was built against
another jaxlib version than the one installed (its FFI headers must match),
when it fails its self-test against NumPy on first use (finite, NaN and Inf
inputs: the finiteness guarantees of the library rest on the kernels
propagating NaN and Inf), or when the environment variable
``GRADCRAFT_JAX_CPU_KERNEL`` is ``0``; :mod:`gradcraft_jax._stacked` then
uses its pure-XLA paths. Either way the results are the same up to float32
rounding.

The compiled kernels are never differentiated themselves: each wrapper
carries a ``jax.custom_jvp`` rule written in XLA (linear in the tangents, so
reverse mode works through JAX's transposition), so ``jax.grad`` and
``jax.jvp`` through a method give the derivatives of the XLA path whether
the kernel is in use or not.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

__all__ = [
  "KernelInfo",
  "available",
  "kernel_info",
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
_BUILD_INFO = "GradcraftBuildInfo"
ENV_VAR = "GRADCRAFT_JAX_CPU_KERNEL"
_REINSTALL = (
  "to compile it against the installed jaxlib, reinstall gradcraft-jax with "
  "pip install --no-build-isolation --force-reinstall --no-deps (setuptools>=77 needed)"
)


def _library_path() -> str | None:
  try:
    spec = importlib.util.find_spec("gradcraft_jax._gram_cpu")
  except (ImportError, ValueError):
    return None
  return None if spec is None else spec.origin


def _check(ok: bool, kernel: str, what: str) -> None:
  if not ok:
    raise ValueError(f"gradcraft_jax._cpu_gram.{kernel}: {what}")


_F32 = (jnp.dtype(jnp.float32),)


def _check_matrix(kernel: str, name: str, x, dtypes=_F32) -> None:
  _check(jnp.ndim(x) == 2, kernel, f"{name} must be a (T, n) matrix, got shape {jnp.shape(x)}")
  _check(
    jnp.dtype(x.dtype) in dtypes,
    kernel,
    f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {x.dtype}",
  )


def _check_vector(kernel: str, name: str, x, size: int) -> None:
  _check(
    jnp.shape(x) == (size,) and jnp.dtype(x.dtype) == jnp.float32,
    kernel,
    f"{name} must be a float32 vector of shape ({size},), got {jnp.shape(x)} {x.dtype}",
  )


def _ffi_gram(flat: jax.Array) -> jax.Array:
  _check_matrix("gram", "flat", flat, tuple(_TARGETS))
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
  _check_matrix("weighted_sum", "flat", flat)
  _check_vector("weighted_sum", "w", w, flat.shape[0])
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


def _ffi_graddrop(flat: jax.Array, u: jax.Array, leak: jax.Array):
  _check_matrix("graddrop", "flat", flat)
  t, n = flat.shape
  _check_vector("graddrop", "u", u, n)
  _check_vector("graddrop", "leak", leak, t)
  return jax.ffi.ffi_call(
    _DROP_TARGET[0],
    (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)),
    vmap_method="sequential",
  )(flat, u, leak)


@jax.custom_jvp
def graddrop(flat: jax.Array, u: jax.Array, leak: jax.Array):
  """GradDrop's combination of a float32 ``(T, n)`` matrix with float32
  thresholds ``u`` ``(n,)`` and leaks ``(T,)``: ``(out (n,), probe (1,))``,
  the probe 0 when every input element is finite and NaN otherwise. One
  read of ``flat`` (see ``csrc/gram_cpu.cc``). CPU only, when
  :func:`available`. The masks are piecewise constant: the tangent rule
  (in XLA) holds them fixed, as the XLA path's derivative does."""
  return _ffi_graddrop(flat, u, leak)


@graddrop.defjvp
def _graddrop_jvp(primals, tangents):
  (x, u, leak), (dx, _, dleak) = primals, tangents
  out, probe = graddrop(x, u, leak)
  total, mass = jnp.sum(x, 0), jnp.sum(jnp.abs(x), 0)
  ratio = jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), 0.0)
  purity = 0.5 * (1.0 + ratio)
  mask = jnp.where(x > 0, purity > u, jnp.where(x < 0, purity < u, False)).astype(x.dtype)
  keep = leak[:, None] + (1.0 - leak[:, None]) * mask
  tangent = jnp.sum(keep * dx, 0) + jnp.sum((1.0 - mask) * x * dleak[:, None], 0)
  return (out, probe), (tangent, jnp.zeros_like(probe))


def _ffi_excess(g: jax.Array, s: jax.Array):
  _check_matrix("excess_pass", "g", g)
  _check_matrix("excess_pass", "s", s)
  _check(g.shape == s.shape, "excess_pass", f"g {g.shape} and s {s.shape} differ in shape")
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


@jax.custom_jvp
def excess_pass(g: jax.Array, s: jax.Array):
  """ExcessMTL's pass over float32 ``(T, n)`` gradients ``g`` and squared
  sums ``s``: ``(s + g**2, excess (T,), probe (1,))`` with
  ``excess_i = sum_k g_ik^2 / sqrt(s_new_ik + 1e-7)`` and the probe of
  ``g``'s finiteness. One read of ``g`` and ``s``, one write. CPU only;
  differentiable through a tangent rule in XLA."""
  return _ffi_excess(g, s)


@excess_pass.defjvp
def _excess_jvp(primals, tangents):
  (g, s), (dg, ds) = primals, tangents
  s_new, excess, probe = excess_pass(g, s)
  d_s_new = ds + 2.0 * g * dg
  inv = jax.lax.rsqrt(s_new + 1e-7)
  d_excess = jnp.sum(2.0 * g * dg * inv - 0.5 * g * g * inv**3 * d_s_new, axis=1)
  return (s_new, excess, probe), (d_s_new, d_excess, jnp.zeros_like(probe))


def _ffi_keep_if(keep, new: jax.Array, old: jax.Array) -> jax.Array:
  _check(
    new.shape == old.shape and new.dtype == old.dtype,
    "keep_if",
    f"new {new.shape} {new.dtype} and old {old.shape} {old.dtype} differ",
  )
  _check(jnp.shape(keep) == (), "keep_if", f"keep must be a scalar, got shape {jnp.shape(keep)}")
  return jax.ffi.ffi_call(
    _KEEP_TARGET[0],
    jax.ShapeDtypeStruct(new.shape, new.dtype),
    vmap_method="sequential",
    input_output_aliases={0: 0},
  )(new, old, jnp.asarray(keep, jnp.bool_))


@jax.custom_jvp
def keep_if(keep: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  """``new if keep else old`` for a boolean scalar ``keep``, written into
  ``new``'s buffer (``input_output_aliases``): free when ``keep`` is true,
  one copy of ``old`` otherwise (``jnp.where`` reads both and writes a
  third buffer on one core). ``new`` and ``old`` must have one shape and
  one dtype. CPU only; differentiable (the tangent is selected the same
  way)."""
  return _ffi_keep_if(keep, new, old)


@keep_if.defjvp
def _keep_if_jvp(primals, tangents):
  (keep, new, old), (_, d_new, d_old) = primals, tangents
  return keep_if(keep, new, old), jnp.where(keep, d_new, d_old)


def supports(dtype) -> bool:
  """Whether the kernel takes leaves of ``dtype`` (float32, bfloat16)."""
  return jnp.dtype(dtype) in _TARGETS


class KernelInfo(NamedTuple):
  """Whether the compiled CPU kernel is in use, and why (or why not).

  Attributes:
    enabled: True when the library's CPU paths use the compiled kernel.
    reason: one line saying why it is on or off.
    library: path of the compiled library, or None when it is not installed.
    built_with_jaxlib: the jaxlib version whose FFI headers the library was
      compiled against, or None when unknown.
    jaxlib: the installed jaxlib version.
  """

  enabled: bool
  reason: str
  library: str | None
  built_with_jaxlib: str | None
  jaxlib: str

  def __str__(self) -> str:
    return f"CPU kernel {'on' if self.enabled else 'off'}: {self.reason}"


def kernel_info() -> KernelInfo:
  """Whether the compiled CPU kernel (``csrc/gram_cpu.cc``) is in use, and why.

  The kernel speeds up the Gram matrix, the weighted sum and the GradDrop
  and ExcessMTL passes on single-device CPU; without it the same results
  (up to float32 rounding) come from XLA. It is off when it was not built
  at install time (no C++ compiler, or ``GRADCRAFT_JAX_BUILD_KERNEL=0``),
  when it was built against another jaxlib version than the installed one,
  when it fails its self-test against NumPy on first use (finite, NaN and
  Inf inputs), or when the environment variable
  ``GRADCRAFT_JAX_CPU_KERNEL=0`` is set. The first call loads and tests the
  kernel; later calls return the cached answer.

  Returns:
    A :class:`KernelInfo`; ``str()`` of it is one line, e.g.
    ``"CPU kernel off: not built: ..."``.

  Examples:
    >>> import gradcraft_jax as gj
    >>> info = gj.kernel_info()
    >>> isinstance(info.enabled, bool) and str(info).startswith("CPU kernel ")
    True
  """
  return _status()


def available() -> bool:
  """True when the kernel is built for this jaxlib, registered and passes
  its self-test (:func:`kernel_info` says why not)."""
  return _status().enabled


def _build_jaxlib(lib) -> str | None:
  try:
    fn = getattr(lib, _BUILD_INFO)
  except AttributeError:
    return None
  fn.restype = ctypes.c_char_p
  info = (fn() or b"").decode()
  return info[len("jaxlib=") :] if info.startswith("jaxlib=") else None


@functools.lru_cache(maxsize=None)
def _status() -> KernelInfo:
  """:func:`_load`, once per process (the FFI targets are registered once)."""
  return _load()


def _load() -> KernelInfo:
  """Loads, checks and registers the kernel: a :class:`KernelInfo`."""
  runtime = jaxlib.__version__

  def off(reason, path=None, built=None):
    return KernelInfo(False, reason, path, built, runtime)

  if os.environ.get(ENV_VAR, "1") == "0":
    return off(f"disabled by the environment variable {ENV_VAR}=0")
  path = _library_path()
  if path is None:
    return off(
      "not built: gradcraft-jax was installed without a C++ compiler, with "
      "GRADCRAFT_JAX_BUILD_KERNEL=0, or the build failed (pip install -v shows why)"
    )
  try:
    lib = ctypes.cdll.LoadLibrary(path)
  except OSError as e:
    return off(f"cannot be loaded ({e})", path)
  built = _build_jaxlib(lib)
  if built is None:
    return off(f"built without a recorded jaxlib version: {_REINSTALL}", path)
  if built != runtime:
    return off(
      f"built against jaxlib {built}, but jaxlib {runtime} is installed: {_REINSTALL}", path, built
    )
  try:
    for name, symbol in (*_TARGETS.values(), _WSUM_TARGET, *_ELEMENTWISE):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    failed = _self_test()
  except Exception as e:  # pylint: disable=broad-except
    return off(f"failed to register or run ({type(e).__name__}: {e})", path, built)
  if failed:
    return off(f"failed its self-test against NumPy ({', '.join(failed)})", path, built)
  return KernelInfo(
    True,
    f"built against jaxlib {built}, passed its self-test (finite, NaN and Inf inputs)",
    path,
    built,
    runtime,
  )


def _self_test() -> list[str]:
  """Runs every kernel once against float64 NumPy on ``(5, 1037)`` matrices
  (vector body and tail columns): finite inputs, then NaN and Inf in the
  body and in the tail. Returns the names of the checks that failed."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 1037)).astype(np.float32)
  bad = x.copy()
  bad[1, 3] = np.nan  # vector body
  bad[3, 1030] = np.inf  # tail columns
  bad[4, 17] = -np.inf
  w = np.linspace(-1.0, 2.0, 5, dtype=np.float32)  # no zero weight
  u = np.full(x.shape[1], 0.5, np.float32)
  ones = np.ones(5, np.float32)
  s = np.abs(x[::-1])
  # Usually first called while a transform is being traced, possibly under
  # a user's transfer guard: evaluate the self-test eagerly, outside that
  # trace, with its (one-off, host-side) transfers allowed.
  with (
    jax.ensure_compile_time_eval(),
    jax.transfer_guard("allow"),
    jax.default_device(jax.devices("cpu")[0]),
  ):
    got = {}
    for name, m in (("finite", x), ("nonfinite", bad)):
      got[name, "gram"] = np.asarray(jax.jit(_ffi_gram)(m), np.float64)
      out, probe = jax.jit(_ffi_weighted_sum)(m, w)
      got[name, "sum"], got[name, "sum_probe"] = np.asarray(out, np.float64), np.asarray(probe)
      # GradDrop with every leak 1 keeps everything: the column sums.
      out, probe = jax.jit(_ffi_graddrop)(m, u, ones)
      got[name, "drop"], got[name, "drop_probe"] = np.asarray(out), np.asarray(probe)
      s_new, excess, probe = jax.jit(_ffi_excess)(m, s)
      got[name, "s_new"], got[name, "excess"] = np.asarray(s_new), np.asarray(excess)
      got[name, "excess_probe"] = np.asarray(probe)
      got[name, "keep_old"] = np.asarray(jax.jit(_ffi_keep_if)(False, s_new, s))
      got[name, "keep_new"] = np.asarray(jax.jit(_ffi_keep_if)(True, m, s))
  failed = []

  def check(name, ok):
    if not ok:
      failed.append(name)

  with np.errstate(invalid="ignore", over="ignore"):
    for name, m in (("finite", x), ("nonfinite", bad)):
      m64 = m.astype(np.float64)
      want_s = s + m64**2
      want_excess = np.sum(m64**2 / np.sqrt(want_s + 1e-7), axis=1)
      close = functools.partial(np.allclose, rtol=1e-5, atol=1e-5, equal_nan=True)
      check(f"gram ({name})", close(got[name, "gram"], m64 @ m64.T))
      check(f"weighted sum ({name})", close(got[name, "sum"], w.astype(np.float64) @ m64))
      check(f"excess pass ({name})", close(got[name, "s_new"], want_s))
      check(f"excess risks ({name})", close(got[name, "excess"], want_excess))
      check(f"keep old ({name})", np.array_equal(got[name, "keep_old"], s))
      check(f"keep new ({name})", np.array_equal(got[name, "keep_new"], m, equal_nan=True))
      finite = name == "finite"
      if finite:
        check("graddrop (finite)", close(got[name, "drop"], m64.sum(0)))
      for probe in ("sum_probe", "drop_probe", "excess_probe"):
        value = float(got[name, probe][0])
        check(f"{probe.replace('_', ' ')} ({name})", value == 0.0 if finite else np.isnan(value))
  # The non-finite rows reach exactly the entries they touch.
  gram_bad = got["nonfinite", "gram"]
  touched = np.zeros((5, 5), bool)
  touched[[1, 3, 4], :] = touched[:, [1, 3, 4]] = True
  check("gram propagates NaN/Inf", np.all(~np.isfinite(gram_bad[touched])))
  check("gram keeps finite rows finite", np.all(np.isfinite(gram_bad[~touched])))
  return failed
