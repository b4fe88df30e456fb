"""The compiled CPU Gram kernel (csrc/gram_cpu.cc) against float64 NumPy,
against the pure-XLA paths, and through jit, grad, jvp and vmap."""

import os
import platform
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcraft_jax as gj
from gradcraft_jax import _cpu_gram, _stacked

KERNEL = _cpu_gram.available()
needs_kernel = pytest.mark.skipif(not KERNEL, reason="CPU kernel not built")


def reference(x):
  x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
  return x @ x.T


def tolerance(x, rel=2e-6):
  """Entry-wise bound ~ rel * ||x_i|| ||x_j|| (float32 output rounding
  plus float32 partial sums)."""
  norms = np.linalg.norm(np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64), axis=1)
  return rel * np.outer(norms, norms) + 1e-30


def test_kernel_is_built_where_it_should_be():
  """On x86-64 Linux with a C++ compiler the install builds the kernel; a
  silent fallback would lose the speed the docs report."""
  if os.environ.get(_cpu_gram.ENV_VAR, "1") == "0":
    pytest.skip("kernel disabled by the environment")
  if platform.system() != "Linux" or platform.machine() != "x86_64" or shutil.which("c++") is None:
    pytest.skip("kernel only required on x86-64 Linux with a compiler")
  assert KERNEL


@needs_kernel
@settings(max_examples=60)
@given(
  t=st.integers(1, 70), n=st.integers(0, 3000), bf16=st.booleans(), seed=st.integers(0, 2**31 - 1)
)
def test_kernel_matches_float64_numpy(t, n, bf16, seed):
  x = np.random.default_rng(seed).standard_normal((t, n)).astype(np.float32)
  x = jnp.asarray(x, jnp.bfloat16 if bf16 else jnp.float32)
  got = np.asarray(jax.jit(_cpu_gram.gram)(x))
  assert got.dtype == np.float32 and got.shape == (t, t)
  np.testing.assert_array_equal(got, got.T)
  assert np.all(np.abs(got - reference(x)) <= tolerance(x))


@needs_kernel
@pytest.mark.parametrize("t,n", [(3, 400_003), (6, (1 << 20) + 5), (40, 70_001)])
def test_kernel_threaded_parts(t, n):
  """Shapes large enough to be split over the thread pool: accurate, and
  bit-identical from call to call (parts depend on the shape only)."""
  rng = np.random.default_rng(t)
  x = jnp.asarray(rng.standard_normal((t, n)) * rng.uniform(0.01, 100, (t, 1)), jnp.float32)
  f = jax.jit(_cpu_gram.gram)
  got = np.asarray(f(x))
  assert np.all(np.abs(got - reference(x)) <= tolerance(x))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(x)), got)


@needs_kernel
def test_kernel_concurrent_calls_are_bit_identical():
  """Several threads run the multi-part kernel at once (helpers finishing
  late, the calling thread sleeping until they are done): every result is
  the same bits as a lone call."""
  import concurrent.futures

  x = jnp.asarray(np.random.default_rng(9).standard_normal((4, 1_200_000)), jnp.float32)
  f = jax.jit(_cpu_gram.gram)
  lone = np.asarray(f(x))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda _: np.asarray(f(x)), range(8)))
  for got in results:
    np.testing.assert_array_equal(got, lone)


def test_kernel_source_does_not_spin_wait():
  """The calling thread sleeps on a condition variable while the helpers
  finish (a busy loop such as `while (done < parts) {}` burns a core)."""
  import re

  src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "gram_cpu.cc")).read()
  assert not re.search(r"while\s*\(.*\)\s*\{\s*\}", src)
  assert "condition_variable" in src and ".wait(" in src


@needs_kernel
def test_gram_matrix_uses_kernel_and_agrees_with_xla_paths():
  rng = np.random.default_rng(0)
  tree = {
    "w": jnp.asarray(rng.standard_normal((5, 300, 70)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((5, 70)), jnp.float32),
  }
  hlo = jax.jit(gj.gram_matrix).lower(tree).as_text()
  assert hlo.count("gradcraft_jax_gram_f32") == 2
  flat = jnp.concatenate([tree["w"].reshape(5, -1), tree["b"]], axis=1)
  k = np.asarray(jax.jit(gj.gram_matrix)(tree))
  blocked = np.asarray(jax.jit(lambda x: _stacked._leaf_gram_blocked(x, jnp.float32))(flat))
  plain = np.asarray(jax.jit(lambda x: _stacked._self_gram(x, jnp.float32))(flat))
  tol = tolerance(flat, rel=1e-5)
  assert np.all(np.abs(k - blocked) <= tol)
  assert np.all(np.abs(k - plain) <= tol)
  assert np.all(np.abs(k - reference(flat)) <= tolerance(flat))


@needs_kernel
def test_kernel_grad_jvp_vmap():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 37)), jnp.float32)
  dx = jnp.asarray(rng.standard_normal((4, 37)), jnp.float32)
  ref = lambda x: jnp.dot(x, x.T, precision="highest")  # noqa: E731
  _, tan = jax.jvp(_cpu_gram.gram, (x,), (dx,))
  _, tan_ref = jax.jvp(ref, (x,), (dx,))
  np.testing.assert_allclose(tan, tan_ref, rtol=1e-5, atol=1e-5)
  c = jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(c * gj.gram_matrix({"x": x})))(x)
  g_ref = jax.grad(lambda x: jnp.sum(c * ref(x)))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  batch = jnp.stack([x, 2 * x, -x])
  got = jax.jit(jax.vmap(lambda x: gj.gram_matrix({"x": x})))(batch)
  np.testing.assert_allclose(got, jax.vmap(ref)(batch), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_kernel_propagates_nonfinite():
  x = np.random.default_rng(2).standard_normal((3, 2000)).astype(np.float32)
  x[1, 1234] = np.nan
  k = np.asarray(_cpu_gram.gram(jnp.asarray(x)))
  assert np.isnan(k[1]).all() and np.isnan(k[:, 1]).all()
  assert np.isfinite(k[np.ix_([0, 2], [0, 2])]).all()


def test_environment_variable_disables_kernel():
  """GRADCRAFT_JAX_CPU_KERNEL=0 falls back to the pure-XLA path, with the
  same Gram matrix."""
  code = (
    "import jax, jax.numpy as jnp, numpy as np\n"
    "import gradcraft_jax as gj\n"
    "from gradcraft_jax import _cpu_gram\n"
    "x = np.random.default_rng(3).standard_normal((4, 9000), np.float32)\n"
    "k = np.asarray(jax.jit(gj.gram_matrix)({'x': jnp.asarray(x)}))\n"
    "hlo = jax.jit(gj.gram_matrix).lower({'x': jnp.asarray(x)}).as_text()\n"
    "r = x.astype(np.float64) @ x.T.astype(np.float64)\n"
    "assert not _cpu_gram.available()\n"
    "assert not gj.kernel_info().enabled\n"
    "assert 'GRADCRAFT_JAX_CPU_KERNEL=0' in str(gj.kernel_info())\n"
    "assert 'gradcraft_jax_gram' not in hlo\n"
    "assert np.abs(k - r).max() <= 1e-5 * np.abs(r).max()\n"
  )
  env = dict(os.environ, **{_cpu_gram.ENV_VAR: "0"})
  subprocess.run([sys.executable, "-c", code], env=env, check=True)


@needs_kernel
def test_first_use_under_transfer_guard_still_uses_kernel():
  """The kernel's one-off self-test runs on first use, often inside a user's
  jitted step under ``jax.transfer_guard("disallow")``; it must not fail
  there (and silently drop to the slower path)."""
  code = (
    "import jax, jax.numpy as jnp, numpy as np\n"
    "import gradcraft_jax as gj\n"
    "from gradcraft_jax import _cpu_gram\n"
    "x = jnp.asarray(np.ones((3, 5000), np.float32))\n"
    "with jax.transfer_guard('disallow'):\n"
    "  hlo = jax.jit(gj.gram_matrix).lower({'x': x}).as_text()\n"
    "  k = jax.jit(gj.gram_matrix)({'x': x})\n"
    "assert _cpu_gram.available()\n"
    "assert 'gradcraft_jax_gram_f32' in hlo\n"
    "assert np.allclose(np.asarray(k), 5000.0)\n"
  )
  env = dict(os.environ)
  env.pop(_cpu_gram.ENV_VAR, None)
  subprocess.run([sys.executable, "-c", code], env=env, check=True)


@needs_kernel
def test_mixed_float32_float64_tree_accumulates_in_float64():
  """With x64, a tree mixing float32 and float64 leaves accumulates in
  float64 (``accumulation_dtype``): its float32 leaves must not take the
  float32-output kernel."""
  rng = np.random.default_rng(4)
  a = rng.standard_normal((3, 5000)).astype(np.float32)
  b = rng.standard_normal((3, 7))
  with jax.enable_x64(True):
    tree = {"a": jnp.asarray(a), "b": jnp.asarray(b, jnp.float64)}
    k = np.asarray(jax.jit(gj.gram_matrix)(tree))
    hlo = jax.jit(gj.gram_matrix).lower(tree).as_text()
  want = a.astype(np.float64) @ a.T.astype(np.float64) + b @ b.T
  assert k.dtype == np.float64
  assert "gradcraft_jax_gram" not in hlo
  np.testing.assert_allclose(k, want, rtol=1e-12)


# ------------------------------------------------------------ weighted sum


@needs_kernel
@pytest.mark.parametrize("t,n", [(1, 70_001), (2, 65_536), (5, 300_007), (9, (1 << 18) + 3)])
def test_weighted_sum_kernel_matches_float64_numpy(t, n):
  """The kernel's ordered float32 sum against float64 NumPy (tails, one
  and several parts, 4-row groups and the rows left over)."""
  rng = np.random.default_rng(t)
  x = rng.standard_normal((t, n)).astype(np.float32)
  w = rng.standard_normal(t).astype(np.float32)
  got, probe = jax.jit(_cpu_gram.weighted_sum)(x, w)
  got = np.asarray(got, np.float64)
  assert float(probe[0]) == 0.0
  want = w.astype(np.float64) @ x.astype(np.float64)
  bound = 4e-7 * t * (np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64)) + 1e-30
  assert np.all(np.abs(got - want) <= bound)


@needs_kernel
def test_weighted_sum_uses_kernel_and_agrees_with_fused_loop():
  t, n = 6, 1 << 17
  rng = np.random.default_rng(0)
  g = {"a": jnp.asarray(rng.standard_normal((t, n // 4, 4)), jnp.float32)}
  w = jnp.asarray(rng.standard_normal(t), jnp.float32)
  hlo = jax.jit(gj.weighted_sum).lower(g, w).as_text()
  assert "gradcraft_jax_wsum_f32" in hlo
  fused = _stacked._fused_sum(g["a"].reshape(t, -1), w, t, jnp.float32).reshape(n // 4, 4)
  np.testing.assert_allclose(jax.jit(gj.weighted_sum)(g, w)["a"], fused, rtol=1e-6, atol=1e-6)
  # gradients through the kernel (its jvp rule) equal those of the fused loop
  gx = jax.grad(lambda w: jnp.sum(gj.weighted_sum(g, w)["a"] ** 2))(w)
  gf = jax.grad(
    lambda w: jnp.sum(_stacked._fused_sum(g["a"].reshape(t, -1), w, t, jnp.float32) ** 2)
  )(w)
  np.testing.assert_allclose(gx, gf, rtol=1e-4)


@needs_kernel
def test_weighted_sum_kernel_propagates_nonfinite():
  x = np.ones((3, 1 << 16), np.float32)
  x[1, 5] = np.inf
  x[2, 7] = np.nan
  out, probe = jax.jit(_cpu_gram.weighted_sum)(x, np.ones(3, np.float32))
  out = np.asarray(out)
  assert np.isinf(out[5]) and np.isnan(out[7]) and np.all(np.isfinite(np.delete(out, [5, 7])))
  assert np.isnan(float(probe[0]))
  x[2, 7] = 1.0  # an inf alone also trips the probe
  assert np.isnan(float(jax.jit(_cpu_gram.weighted_sum)(x, np.ones(3, np.float32))[1][0]))


@needs_kernel
def test_core_keeps_state_on_kernel_probe():
  """A stateful loss-only method (RLW: its weights never read the gradients)
  on a leaf large enough for the kernel: an inf in one task's gradient makes
  the update non-finite and keeps the state, via the kernel's probe."""
  tx = gj.rlw(seed=1)
  st = tx.init(None)
  g = np.ones((2, 1 << 17), np.float32)
  upd, st1 = jax.jit(tx.update)({"p": jnp.asarray(g)}, st)
  assert np.all(np.isfinite(np.asarray(upd["p"])))
  assert not np.array_equal(np.asarray(st1.key), np.asarray(st.key))
  g[1, 123] = np.inf
  upd, st2 = jax.jit(tx.update)({"p": jnp.asarray(g)}, st1)
  assert not np.all(np.isfinite(np.asarray(upd["p"])))
  np.testing.assert_array_equal(np.asarray(st2.key), np.asarray(st1.key))


@pytest.mark.parametrize("t", [1, 3, 8, 70])
def test_sum_over_tasks(t):
  x = np.random.default_rng(t).standard_normal((t, 5, 3)).astype(np.float32)
  got = jax.jit(_stacked.sum_over_tasks)(jnp.asarray(x))
  np.testing.assert_allclose(got, x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ GradDrop, ExcessMTL


def _numpy_graddrop(j, u, leak):
  """GradDrop's combination in float64, one task at a time (Algorithm 1)."""
  total, mass = j.sum(0), np.abs(j).sum(0)
  p = 0.5 * (1.0 + np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), 0.0))
  out = np.zeros(j.shape[1])
  for i in range(j.shape[0]):
    m = (p > u) * (j[i] > 0) + (p < u) * (j[i] < 0)
    out += (leak[i] + (1 - leak[i]) * m) * j[i]
  return out, p


@needs_kernel
@pytest.mark.parametrize("t,n,leaky", [(1, 70_001, False), (3, 300_007, True), (17, 65_536, True)])
def test_graddrop_kernel_matches_float64_numpy(t, n, leaky):
  """Tails, one and several parts; coordinates whose purity is within
  float32 rounding of its threshold may go either way and are left out."""
  rng = np.random.default_rng(t)
  x = rng.standard_normal((t, n)).astype(np.float32)
  x[:, :50] = np.abs(x[:, :50])  # same signs: purity 1
  x[:, 50:60] = 0.0  # all zero: purity 1/2, nothing kept
  u = rng.uniform(size=n).astype(np.float32)
  leak = (rng.uniform(0, 0.5, t) if leaky else np.zeros(t)).astype(np.float32)
  got, probe = jax.jit(_cpu_gram.graddrop)(x, u, leak)
  assert float(probe[0]) == 0.0
  want, p = _numpy_graddrop(x.astype(np.float64), u.astype(np.float64), leak.astype(np.float64))
  clear = np.abs(p - u) > 1e-5
  assert clear.mean() > 0.99
  np.testing.assert_allclose(np.asarray(got)[clear], want[clear], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[50:60], 0.0)


@needs_kernel
def test_graddrop_uses_kernel_and_agrees_with_xla_chain(monkeypatch):
  from gradcraft_jax.methods import _graddrop

  t, n = 5, 1 << 17
  g = {"a": jnp.asarray(np.random.default_rng(0).standard_normal((t, n // 4, 4)), jnp.float32)}
  key = jax.random.PRNGKey(3)
  leak = jnp.asarray([0.0, 0.1, 0.2, 0.0, 0.5], jnp.float32)
  run = jax.jit(lambda g: gj.methods.graddrop_combine(g, key, leak=leak))
  assert "gradcraft_jax_graddrop_f32" in run.lower(g).as_text()
  got = run(g)["a"]
  monkeypatch.setattr(_graddrop, "_kernel_leaf", lambda leaf, f: False)
  xla = jax.jit(lambda g: gj.methods.graddrop_combine(g, key, leak=leak))
  assert "gradcraft_jax_graddrop_f32" not in xla.lower(g).as_text()
  np.testing.assert_allclose(got, xla(g)["a"], rtol=1e-6, atol=1e-6)


@needs_kernel
def test_graddrop_and_excess_kernels_report_nonfinite_and_keep_state():
  t, n = 3, 1 << 16
  x = np.ones((t, n), np.float32)
  x[1, 5] = np.inf
  assert np.isnan(float(jax.jit(_cpu_gram.graddrop)(x, np.zeros(n, np.float32), np.zeros(t))[1][0]))
  assert np.isnan(float(jax.jit(_cpu_gram.excess_pass)(x, np.ones_like(x))[2][0]))
  for tx in (gj.methods.graddrop(), gj.methods.excess_mtl(num_tasks=t)):
    state = tx.init({"p": jnp.zeros(n)})
    upd, new = jax.jit(tx.update)({"p": jnp.asarray(x)}, state)
    assert np.isnan(np.asarray(upd["p"])).all()
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, state)


@needs_kernel
@pytest.mark.parametrize("t,n", [(1, 70_001), (4, 300_007)])
def test_excess_kernel_matches_float64_numpy(t, n):
  rng = np.random.default_rng(t)
  g = rng.standard_normal((t, n)).astype(np.float32)
  s = rng.uniform(0, 2, (t, n)).astype(np.float32)
  s_new, excess, probe = jax.jit(_cpu_gram.excess_pass)(g, s)
  assert float(probe[0]) == 0.0
  g64 = g.astype(np.float64)
  want_s = s + g64**2
  np.testing.assert_allclose(s_new, want_s, rtol=1e-6)
  np.testing.assert_allclose(excess, np.sum(g64**2 / np.sqrt(want_s + 1e-7), axis=1), rtol=1e-5)


@needs_kernel
def test_excess_mtl_on_kernel_equals_xla_path_over_steps(monkeypatch):
  """Three steps on a tree with one kernel leaf and one small leaf, then an
  inf in the small leaf: the kernel leaf's state is kept too (in place)."""
  t = 3
  rng = np.random.default_rng(1)
  shapes = {"big": (1 << 16, 2), "small": (7,)}
  grads = [
    {k: jnp.asarray(rng.standard_normal((t, *s)), jnp.float32) for k, s in shapes.items()}
    for _ in range(3)
  ]
  params = {k: jnp.zeros(s) for k, s in shapes.items()}

  def steps(tx):
    state, outs = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads:
      out, state = update(g, state)
      outs.append(out)
    return outs, state, update

  outs_k, state_k, update_k = steps(gj.methods.excess_mtl(num_tasks=t))
  assert "gradcraft_jax_excess_f32" in update_k.lower(grads[0], state_k).as_text()
  monkeypatch.setattr(_cpu_gram, "available", lambda: False)
  outs_x, state_x, _ = steps(gj.methods.excess_mtl(num_tasks=t))
  for a, b in zip(outs_k, outs_x):
    jax.tree_util.tree_map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-7), a, b
    )
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5), state_k, state_x)
  bad = dict(grads[0], small=grads[0]["small"].at[1, 2].set(jnp.inf))
  upd, kept = update_k(bad, state_k)
  assert np.isnan(np.asarray(upd["big"])).all()
  jax.tree_util.tree_map(np.testing.assert_array_equal, kept, state_k)


# ------------------------------------------------ status, checks, derivatives


def test_kernel_info_is_one_line_and_agrees_with_available():
  info = gj.kernel_info()
  assert isinstance(info, gj.KernelInfo)
  assert info.enabled == _cpu_gram.available() == KERNEL
  line = str(info)
  assert "\n" not in line and line.startswith(f"CPU kernel {'on' if KERNEL else 'off'}: ")
  assert info.jaxlib == jaxlib.__version__
  if KERNEL:
    assert info.built_with_jaxlib == jaxlib.__version__ and info.library is not None
    assert "NaN and Inf" in info.reason


@pytest.mark.parametrize(
  "case,expected",
  [
    ("disabled", "disabled by the environment variable GRADCRAFT_JAX_CPU_KERNEL=0"),
    ("not_built", "not built: "),
    ("other_jaxlib", "but jaxlib 0.0.1 is installed: to compile it against the installed jaxlib"),
  ],
)
def test_kernel_info_says_why_it_is_off(case, expected, monkeypatch):
  """The reasons that are decided before anything is registered (``_load``
  is the uncached body of ``kernel_info``)."""
  if case == "disabled":
    monkeypatch.setenv(_cpu_gram.ENV_VAR, "0")
  elif case == "not_built":
    monkeypatch.setattr(_cpu_gram, "_library_path", lambda: None)
  else:
    if _cpu_gram._library_path() is None:
      pytest.skip("CPU kernel not built")
    monkeypatch.setenv(_cpu_gram.ENV_VAR, "1")
    monkeypatch.setattr(jaxlib, "__version__", "0.0.1")
  info = _cpu_gram._load()
  assert not info.enabled
  assert expected in info.reason, info.reason
  if case == "other_jaxlib":
    assert info.built_with_jaxlib != "0.0.1" and info.jaxlib == "0.0.1"


def _compiler_and_headers():
  cxx = shutil.which("c++") or shutil.which("g++")
  include = jax.ffi.include_dir()
  if cxx is None or not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
    pytest.skip("needs a C++ compiler and jaxlib's FFI headers")
  return cxx, include


SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@pytest.mark.parametrize("flag", ["-ffast-math", "-Ofast", "-ffinite-math-only"])
def test_fast_math_build_is_refused(flag):
  cxx, include = _compiler_and_headers()
  proc = subprocess.run(
    [cxx, "-std=c++17", "-fsyntax-only", flag, f"-I{include}", '-DGRADCRAFT_JAX_JAXLIB_VERSION="x"']
    + [os.path.join(SOURCE, "gram_cpu.cc")],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert "needs IEEE NaN/Inf semantics" in proc.stderr


@pytest.mark.slow
def test_self_test_refuses_a_fast_math_library(tmp_path):
  """A library compiled with -ffast-math (the source's guard bypassed by
  undefining the compiler's macros) folds the finiteness probes' x * 0 to
  0: the self-test's NaN and Inf inputs catch it and the kernel stays off."""
  cxx, include = _compiler_and_headers()
  lib = tmp_path / "fast_math.so"
  version = f'-DGRADCRAFT_JAX_JAXLIB_VERSION="{jaxlib.__version__}"'
  subprocess.run(
    [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-ffast-math", "-U__FAST_MATH__"]
    + ["-U__FINITE_MATH_ONLY__", "-Wno-psabi", f"-I{include}", version]
    + [os.path.join(SOURCE, "gram_cpu.cc"), "-o", str(lib)],
    check=True,
    capture_output=True,
    timeout=600,
  )
  code = (
    "from gradcraft_jax import _cpu_gram\n"
    f"_cpu_gram._library_path = lambda: {str(lib)!r}\n"
    "info = _cpu_gram.kernel_info()\n"
    "assert not info.enabled and not _cpu_gram.available(), info\n"
    "assert 'failed its self-test' in info.reason and 'probe (nonfinite)' in info.reason, info\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(_cpu_gram.ENV_VAR, None)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]


@needs_kernel
def test_wrappers_check_shapes_and_dtypes():
  x = jnp.ones((3, 100), jnp.float32)
  with pytest.raises(ValueError, match="keep_if: new .* and old .* differ"):
    _cpu_gram.keep_if(True, x, jnp.ones((3, 99), jnp.float32))
  with pytest.raises(ValueError, match="keep_if: new .* and old .* differ"):
    _cpu_gram.keep_if(True, x, jnp.ones((3, 100), jnp.bfloat16))
  with pytest.raises(ValueError, match="weighted_sum: w must be a float32 vector of shape"):
    _cpu_gram.weighted_sum(x, jnp.ones(4, jnp.float32))
  with pytest.raises(ValueError, match="graddrop: u must be"):
    _cpu_gram.graddrop(x, jnp.ones(99, jnp.float32), jnp.ones(3, jnp.float32))
  with pytest.raises(ValueError, match="excess_pass: g .* and s .* differ"):
    _cpu_gram.excess_pass(x, jnp.ones((3, 101), jnp.float32))
  with pytest.raises(ValueError, match="gram: flat must have dtype"):
    _cpu_gram.gram(jnp.ones((3, 100), jnp.float16))


@needs_kernel
def test_compiled_keep_if_checks_sizes_and_dtypes():
  """The library itself refuses mismatched buffers (a direct FFI call,
  without the Python wrapper's checks): it copies by bytes."""
  new = jnp.ones((3, 100), jnp.float32)
  call = lambda old, out: jax.ffi.ffi_call(  # noqa: E731
    _cpu_gram._KEEP_TARGET[0], out, vmap_method="sequential"
  )(new, old, jnp.asarray(False))
  with pytest.raises(Exception, match="keep_if: old has 200 elements, expected 300"):
    jax.block_until_ready(
      call(jnp.ones((2, 100), jnp.float32), jax.ShapeDtypeStruct((3, 100), jnp.float32))
    )
  with pytest.raises(Exception, match="keep_if: new, old and out have different dtypes"):
    jax.block_until_ready(
      call(jnp.ones((3, 100), jnp.int32), jax.ShapeDtypeStruct((3, 100), jnp.float32))
    )
  with pytest.raises(Exception, match="weighted_sum: w has 4 elements, expected 3"):
    jax.block_until_ready(
      jax.ffi.ffi_call(
        _cpu_gram._WSUM_TARGET[0],
        (jax.ShapeDtypeStruct((100,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)),
      )(new, jnp.ones(4, jnp.float32))
    )


def _graddrop_xla(x, u, leak):
  """GradDrop's combination (Chen et al., 2020, Algorithm 1) in jnp."""
  total, mass = jnp.sum(x, 0), jnp.sum(jnp.abs(x), 0)
  purity = 0.5 * (1 + jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1), 0))
  mask = ((purity > u) & (x > 0)) | ((purity < u) & (x < 0))
  return jnp.sum((leak[:, None] + (1 - leak[:, None]) * mask) * x, 0)


def _excess_xla(g, s):
  s_new = s + g * g
  return s_new, jnp.sum(g * g / jnp.sqrt(s_new + 1e-7), axis=1)


@needs_kernel
def test_elementwise_kernels_differentiate_like_xla():
  """GradDrop's, ExcessMTL's and the select's kernels have tangent rules in
  XLA: forward and reverse mode agree with jnp implementations of the same
  formulas (the masks held fixed, as their derivative is zero)."""
  rng = np.random.default_rng(5)
  t, n = 3, 5000
  x = jnp.asarray(rng.standard_normal((t, n)), jnp.float32)
  dx = jnp.asarray(rng.standard_normal((t, n)), jnp.float32)
  u = jnp.asarray(rng.uniform(size=n), jnp.float32)
  leak, dleak = jnp.asarray([0.1, 0.0, 0.5], jnp.float32), jnp.asarray([1.0, -2.0, 0.5])
  s = jnp.abs(x[::-1])

  drop = lambda x, leak: _cpu_gram.graddrop(x, u, leak)[0]  # noqa: E731
  drop_ref = lambda x, leak: _graddrop_xla(x, u, leak)  # noqa: E731
  got = jax.jit(lambda *a: jax.jvp(drop, a, (dx, dleak)))(x, leak)
  want = jax.jvp(drop_ref, (x, leak), (dx, dleak))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)
  loss = lambda f: lambda x, leak: jnp.sum(f(x, leak) ** 2)  # noqa: E731
  chex.assert_trees_all_close(
    jax.grad(loss(drop), (0, 1))(x, leak),
    jax.grad(loss(drop_ref), (0, 1))(x, leak),
    rtol=1e-5,
    atol=1e-2,
  )

  excess = lambda g, s: _cpu_gram.excess_pass(g, s)[:2]  # noqa: E731
  got = jax.jvp(excess, (x, s), (dx, dx[::-1]))
  want = jax.jvp(_excess_xla, (x, s), (dx, dx[::-1]))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)
  risk = lambda f: lambda g, s: jnp.sum(jnp.arange(1.0, t + 1) * f(g, s)[1])  # noqa: E731
  chex.assert_trees_all_close(
    jax.grad(risk(excess), (0, 1))(x, s),
    jax.grad(risk(_excess_xla), (0, 1))(x, s),
    rtol=1e-5,
    atol=1e-6,
  )

  for keep in (True, False):
    got = jax.jvp(lambda a, b: _cpu_gram.keep_if(jnp.asarray(keep), a, b), (x, s), (dx, 2 * dx))
    want = (x if keep else s, dx if keep else 2 * dx)
    chex.assert_trees_all_close(got, want, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("method", ["graddrop", "excess_mtl"])
def test_method_gradients_same_with_and_without_kernel(method, monkeypatch):
  """``jax.grad`` through GradDrop's and ExcessMTL's updates on leaves that
  take the kernel equals the XLA path's."""
  t, n = 3, 1 << 16
  rng = np.random.default_rng(6)
  g = {"p": jnp.asarray(rng.standard_normal((t, n)), jnp.float32)}
  make = {
    "graddrop": lambda: gj.methods.graddrop(leak=[0.1, 0.2, 0.0]),
    "excess_mtl": lambda: gj.methods.excess_mtl(num_tasks=t),
  }[method]

  def grad_of():
    tx = make()
    state = tx.init({"p": jnp.zeros(n)})
    f = jax.jit(jax.grad(lambda g: jnp.sum(jnp.sin(tx.update(g, state)[0]["p"]))))
    return f, f(g)

  f, got = grad_of()
  assert "gradcraft_jax_" in f.lower(g).as_text()
  monkeypatch.setattr(_cpu_gram, "available", lambda: False)
  f, want = grad_of()
  assert "gradcraft_jax_" not in f.lower(g).as_text()
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
