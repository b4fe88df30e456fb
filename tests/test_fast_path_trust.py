"""The fast routes against jax.jacrev, on the models that used to break them.

Each model is a regression case of one class: a weight cast to an integer
(its true gradient is zero), an integer product, a real weight applied to a
complex activation, a large common offset in a dense layer's input, a
``jax.custom_vjp`` whose backward rule is not linear in the cotangent,
complex parameters, Python scalar and integer leaves, a product's
``precision``, a nested ``jax.jit`` with its own settings, and a loss the
analysis cannot trace. The reference is always ``jax.jacrev``: its stacked
per-task gradients, their Gram matrix (``gj.gram_matrix``) and a method's
update on them (``method.update``). Every route is compared with it:
``per_task_value_and_grad`` and ``combined_value_and_grad`` for each
``gram`` mode, in float32 and float64, with and without ``jit``; and
``gram_coverage`` must say what the step did.
"""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcraft_jax as gj
from gradcraft_jax import _dense_gram

T = 3
DTYPES = {"float32": (jnp.float32, 2e-5), "float64": (jnp.float64, 1e-10)}


def _probe(t):
  """A method whose weights are linear in every Gram entry (``w = K c``), so
  its update ``J^T K c`` is sensitive to any error in the Gram matrix and in
  the weighted sum; its state is the Gram matrix it was given."""
  c = jnp.linspace(1.0, -0.5, t)

  def weights(gram, state, losses, *, num_tasks, **extra_args):
    return gram @ c.astype(gram.dtype), gram

  return gj.from_weighting(
    gj.Weighting(lambda p: jnp.zeros((t, t), jnp.float32), weights, name="probe")
  )


def _cast(tree, dtype):
  def cast(x):
    if isinstance(x, float):
      return x
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return jnp.asarray(x, dtype)
    return jnp.asarray(x)

  return jax.tree_util.tree_map(cast, tree)


def _scale(tree):
  leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(_numeric(tree))]
  return max([float(np.max(np.abs(x))) for x in leaves if x.size] + [1e-30])


def _is_float0(x):
  return jnp.result_type(x) == jax.dtypes.float0


def _numeric(tree):
  return jax.tree_util.tree_map(lambda x: None if _is_float0(x) else x, tree)


def _close(actual, expected, tol):
  """Same structure, shapes and dtypes; values within ``tol`` relative to
  the largest entry of ``expected`` (float0 leaves have no values)."""
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_shapes(actual, expected)
  chex.assert_trees_all_equal_dtypes(actual, expected)
  actual, expected = _numeric(actual), _numeric(expected)
  chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol * _scale(expected))


def _jacrev(fun, params, *args):
  """jax.jacrev's stacked gradients, with the gradient of an integer leaf as
  jax.vjp and jax.grad(allow_int=True) give it: float0."""

  def as_float0(g, p):
    if jnp.issubdtype(jnp.result_type(p), jnp.inexact):
      return g
    return np.zeros(np.shape(g), jax.dtypes.float0)

  ref = jax.jacrev(fun, allow_int=True)(params, *args)
  return jax.tree_util.tree_map(as_float0, ref, params)


@functools.lru_cache(maxsize=None)
def _routes(fun, gram, jit, on_fallback="raise", chunk_size=None):
  """Every route of one ``gram`` mode in one (jitted) function: the stacked
  gradients, and the lean step with the probe and with ``mean()``."""
  probe, mean = _probe(T), gj.mean()
  per_task = gj.per_task_value_and_grad(fun, gram=gram, on_fallback=on_fallback)
  lean = functools.partial(
    gj.combined_value_and_grad, fun, gram=gram, on_fallback=on_fallback, chunk_size=chunk_size
  )
  lean_probe, lean_mean = lean(probe), lean(mean)

  def run(params, *args):
    _, stacked = per_task(params, *args)
    _, g_probe, k = lean_probe(params, probe.init(params), *args)
    _, g_mean, _ = lean_mean(params, mean.init(params), *args)
    return stacked, g_probe, k, g_mean

  return jax.jit(run) if jit else run


def check_routes(
  fun, params, args, tol, *, grams=("auto", "pullback"), jit=True, on_fallback="raise", **kw
):
  """Every route of every ``gram`` mode equals jax.jacrev: the stacked
  gradients, the Gram matrix the method reads, and the combined updates of
  a Gram-based method and of ``mean()``."""
  ref = _jacrev(fun, params, *args)
  losses = fun(params, *args)
  k_ref = gj.gram_matrix(ref)
  probe, mean = _probe(T), gj.mean()
  upd_probe, _ = probe.update(ref, probe.init(params), params, task_losses=losses)
  upd_mean, _ = mean.update(ref, mean.init(params), params, task_losses=losses)
  for gram in grams:
    stacked, g_probe, k, g_mean = _routes(fun, gram, jit, on_fallback, **kw)(params, *args)
    _close(stacked, ref, tol)
    np.testing.assert_allclose(k, k_ref, rtol=tol, atol=tol * _scale(k_ref))
    _close(g_probe, upd_probe, tol)
    _close(g_mean, upd_mean, tol)
  return ref


def _with_dtype(dtype_name):
  dtype, tol = DTYPES[dtype_name]
  x64 = jax.enable_x64(dtype == jnp.float64)
  return dtype, tol, x64


def _keys(n):
  return list(jax.random.split(jax.random.PRNGKey(3), n))


def _mlp(dtype, rows=4, cols=16, hidden=8):
  k = _keys(3)
  params = {
    "w": jax.random.normal(k[0], (cols, hidden), dtype) / 4,
    "head": jax.random.normal(k[1], (hidden, T), dtype) / 3,
  }
  x = jax.random.normal(k[2], (rows, cols), dtype)
  return params, x


# ------------------------------------------------------------ integer casts


def int_cast_int_dot(p, x):
  """A weight quantised to int32 for an integer product (no gradient)."""
  q = p["w"].astype(jnp.int32)
  h = (jnp.round(4 * x).astype(jnp.int32) @ q).astype(x.dtype) / 16
  h = jnp.tanh(h + x[:, : h.shape[1]])
  return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)


def int8_round_trip(p, x):
  """A weight cast to int8 and back before a float product (no gradient)."""
  h = jnp.tanh(x @ p["w"].astype(jnp.int8).astype(x.dtype))
  return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)


def bool_mask(p, x):
  """A weight used as a bool mask of another product (no gradient)."""
  h = jnp.tanh(x @ (p["w"] > 0).astype(x.dtype))
  return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("fun", [int_cast_int_dot, int8_round_trip, bool_mask])
def test_integer_casts_cut_the_gradient(fun, dtype_name):
  dtype, tol, x64 = _with_dtype(dtype_name)
  with x64:
    params, x = _mlp(dtype)
    params["w"] = params["w"] * 8  # some entries survive the cast
    cov = gj.gram_coverage(fun, gram="dense")(params, x)
    assert cov["['w']"] != "dense" and cov["['head']"] == "dense", cov
    assert cov.fallbacks == ()
    ref = check_routes(fun, params, (x,), tol)
    assert not np.any(np.asarray(ref["w"]))  # the true gradient is zero


def test_integer_casts_without_jit():
  """No jit: the int product used to crash the stacked route (float0
  perturbation) and the lean route."""
  params, x = _mlp(jnp.float32)
  params["w"] = params["w"] * 8
  assert "cast to int32" in gj.gram_coverage(int_cast_int_dot)(params, x)["['w']"]
  check_routes(int_cast_int_dot, params, (x,), 2e-5, grams=("dense",), jit=False)


# ------------------------------------------------------- complex activation


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_real_weight_on_complex_activation(dtype_name):
  """Fourier features: a real weight in a complex product keeps its
  per-task pullback (the identity's real inner product would drop the
  imaginary parts)."""
  dtype, tol, x64 = _with_dtype(dtype_name)

  def fun(p, x):
    z = jnp.exp(1j * x)  # complex activation
    h = jnp.abs(z @ p["w"])
    return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)

  with x64:
    params, x = _mlp(dtype)
    cov = gj.gram_coverage(fun, gram="dense")(params, x)
    assert "not real floating point" in cov["['w']"], cov
    assert cov["['head']"] == "dense"
    check_routes(fun, params, (x,), tol)


# ------------------------------------------------- offsets: centred identity


def _offset_model(offset, rows=16, cols=32, feats=8):
  rng = np.random.default_rng(0)
  params = {
    "w": (rng.normal(size=(cols, feats)) / np.sqrt(cols)).astype(np.float32),
    "head": (rng.normal(size=(feats, T)) / np.sqrt(feats)).astype(np.float32),
  }
  x = (offset + rng.normal(size=(rows, cols))).astype(np.float32)

  def fun(p, x):
    h = x @ p["w"]
    h = (h - jnp.mean(h, 0)) / jnp.sqrt(jnp.var(h, 0) + 1e-5)  # batch norm
    return jnp.mean((jnp.tanh(h) @ p["head"] - 0.5) ** 2, axis=0)

  return fun, params, x


@pytest.mark.parametrize("offset", [1.0, 1e3, 1e4])
def test_dense_identity_is_stable_under_offsets(offset):
  """Raw features around a large offset into a dense layer followed by batch
  normalisation (cotangents summing to ~0 over the batch): the dense-layer
  identity's Gram matrix is within a small factor of the per-task
  pullback's error against float64 (uncentred, it was off by 2e-2 at 1e3
  and 1.9 at 1e4, relative)."""
  fun, p32, x32 = _offset_model(offset)
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), p32)
    k64 = np.asarray(gj.gram_matrix(jax.jacrev(fun)(p64, jnp.asarray(x32, jnp.float64))))
  scale = np.max(np.abs(k64))
  probe = _probe(T)
  params = jax.tree_util.tree_map(jnp.asarray, p32)
  err = {}
  for gram in ("dense", "pullback"):
    step = jax.jit(gj.combined_value_and_grad(fun, probe, gram=gram, on_fallback="raise"))
    k = step(params, probe.init(params), jnp.asarray(x32))[2]
    err[gram] = float(np.max(np.abs(np.asarray(k, np.float64) - k64)) / scale)
  assert gj.gram_coverage(fun, gram="dense")(params, x32)["['w']"] == "dense"
  assert err["dense"] <= 4 * err["pullback"] + 1e-6, err


def test_block_centring_equals_the_plain_formula_in_float64():
  """The centred block is the same quantity: equal to <(a a^T) d_s, d_t>
  for a random (non-centred) activation, in float64."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    r, c, f = 5, 7, 4
    a = jnp.asarray(3.0 + rng.normal(size=(r, c)))
    d = jnp.asarray(rng.normal(size=(T, r, f)))
    use = _dense_gram.DenseUse(0, 0, 0, (1,), (0,), (), r, c, f)
    k = _dense_gram.block(use, a, d, jnp.float64)
    g = jnp.einsum("rc,trf->tcf", a, d)
    np.testing.assert_allclose(k, jnp.einsum("scf,tcf->st", g, g), rtol=1e-12)


# ------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def clip_gradient(lo, hi, x):
  """JAX's custom-VJP tutorial: identity forward, clipped cotangent."""
  return x


def _clip_fwd(lo, hi, x):
  return x, None


def _clip_bwd(lo, hi, _, g):
  return (jnp.clip(g, lo, hi),)


clip_gradient.defvjp(_clip_fwd, _clip_bwd)


def clipped(p, x):
  h = clip_gradient(-0.05, 0.05, jnp.tanh(x @ p["w"]))
  return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)


def clipped_in_jit_scan_cond_remat(p, x):
  @jax.jit
  def inner(h):
    def body(c, _):
      c = jax.checkpoint(
        lambda v: jax.lax.cond(True, lambda u: clip_gradient(-0.05, 0.05, u), jnp.sin, v)
      )(c)
      return c, None

    return jax.lax.scan(body, h, None, length=2)[0]

  h = inner(jnp.tanh(x @ p["w"]))
  return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("fun", [clipped, clipped_in_jit_scan_cond_remat])
def test_cotangent_nonlinear_custom_vjp(fun, dtype_name):
  """A gradient-clipping custom VJP: the weighted cotangent pulled back once
  is clipped as a sum, not per task. Detected (at any depth), the combined
  gradient is the weighted sum of per-task pullbacks, for every gram mode
  and for mean(); the step warns, and gram_coverage says the same."""
  dtype, tol, x64 = _with_dtype(dtype_name)
  with x64:
    params, x = _mlp(dtype)
    cov = gj.gram_coverage(fun)(params, x)
    assert cov.combined == "weighted sum of per-task pullbacks"
    assert len(cov.fallbacks) == 1 and "clip_gradient" in cov.fallbacks[0]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      check_routes(fun, params, (x,), tol, grams=("auto", "dense", "pullback"), on_fallback="warn")
    messages = {str(w.message) for w in caught if issubclass(w.category, gj.FallbackWarning)}
    assert messages and all(cov.fallbacks[0] in m for m in messages), messages
    # the single weighted pullback really is wrong here (the test can fail)
    ref = jax.jacrev(fun)(params, x)
    one_pullback = jax.grad(lambda p: jnp.mean(fun(p, x)))(params)
    assert not np.allclose(one_pullback["w"], jnp.mean(ref["w"], 0), rtol=1e-3)


def test_custom_vjp_strict_mode_raises():
  params, x = _mlp(jnp.float32)
  method = gj.mean()
  step = gj.combined_value_and_grad(clipped, method, on_fallback="raise")
  with pytest.raises(RuntimeError, match="custom_vjp"):
    jax.jit(step)(params, method.init(params), x)


def test_custom_vjp_with_chunk_size():
  """Forward mode cannot differentiate a custom VJP: chunk_size is not used
  (reported), and the result still equals jacrev's."""
  params, x = _mlp(jnp.float32)
  cov = gj.gram_coverage(clipped, chunk_size=1)(params, x)
  assert any("chunk_size is not used" in r for r in cov.fallbacks), cov.fallbacks
  _, messages = _fallback_messages(
    lambda: check_routes(
      clipped, params, (x,), 2e-5, grams=("pullback",), on_fallback="warn", chunk_size=1
    )
  )
  assert any("chunk_size is not used" in m for m in messages), messages


def test_custom_vjp_off_the_parameters_and_custom_jvp_are_fast():
  """A custom VJP on the data only, and a custom JVP (linear transpose): no
  fallback (on_fallback="raise"), equal to jacrev."""

  @jax.custom_jvp
  def soft(x):
    return jnp.log1p(jnp.exp(x))

  soft.defjvps(lambda t, ans, x: t * jax.nn.sigmoid(x))

  def fun(p, x):
    x = clip_gradient(-1.0, 1.0, x)  # x is not differentiated
    h = soft(x @ p["w"])
    return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)

  params, x = _mlp(jnp.float32)
  cov = gj.gram_coverage(fun)(params, x)
  assert cov.combined == "one pullback of the weighted losses" and cov.fallbacks == ()
  check_routes(fun, params, (x,), 2e-5)


# ------------------------------------------------------ complex parameters


def test_complex_parameters_are_refused_naming_the_leaf():
  params = {"w": jnp.ones((4, 3)), "z": jnp.ones((3,), jnp.complex64)}
  x = jnp.ones((2, 4))

  def fun(p, x):
    return jnp.mean(jnp.abs((x @ p["w"]) * p["z"]) ** 2, axis=0)

  method = gj.upgrad()
  stacked = {"w": jnp.ones((3, 4, 3)), "z": jnp.ones((3, 3), jnp.complex64)}
  calls = [
    lambda: gj.gram_matrix(stacked),
    lambda: method.update(stacked, method.init(params), params),
    lambda: gj.per_task_value_and_grad(fun)(params, x),
    lambda: gj.combined_value_and_grad(fun, method)(params, method.init(params), x),
    lambda: gj.gram_coverage(fun)(params, x),
  ]
  for call in calls:
    with pytest.raises(TypeError, match=r"\['z'\].*complex"):
      call()


# ------------------------------------------- Python scalar and integer leaves


@pytest.mark.parametrize("jit", [False, True])
def test_python_scalar_and_integer_leaves(jit):
  """A Python float leaf (a gradient like jacrev's) and an int leaf (a float0
  gradient, as jacrev(allow_int=True)), with and without jit."""
  params, x = _mlp(jnp.float32)
  params["scale"] = 2.0
  params["count"] = jnp.arange(T)

  def fun(p, x):
    h = jnp.tanh(x @ p["w"]) * p["scale"]
    return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0) * (1 + p["count"])

  cov = gj.gram_coverage(fun)(params, x)
  assert cov["['count']"] == "int32 leaf (not real floating point)"
  check_routes(fun, params, (x,), 2e-5, grams=("dense", "pullback"), jit=jit)


# -------------------------------------------------------------- precision


def test_products_keep_precision_and_preferred_element_type():
  """The stacked route's batched weight gradients carry the product's own
  precision and preferred_element_type (as autodiff's transpose does), and
  every product of a dense-layer Gram block is at HIGHEST precision (as
  gram_matrix's)."""
  hi = jax.lax.Precision.HIGHEST
  k = _keys(3)
  params = {
    "w": (jax.random.normal(k[0], (16, 8)) / 4).astype(jnp.bfloat16),
    "head": jax.random.normal(k[1], (8, T)),
  }
  x = jax.random.normal(k[2], (4, 16)).astype(jnp.bfloat16)

  def fun(p, x):
    h = jax.lax.dot_general(
      x, p["w"], (((1,), (0,)), ((), ())), precision=hi, preferred_element_type=jnp.float32
    )
    return jnp.mean((jnp.tanh(h) @ p["head"] - 1.0) ** 2, axis=0)

  jaxpr = jax.make_jaxpr(gj.per_task_value_and_grad(fun, gram="dense", on_fallback="raise"))(
    params, x
  )
  batched = [
    e
    for e in jaxpr.jaxpr.eqns
    if e.primitive.name == "dot_general" and e.outvars[0].aval.shape == (T, 16, 8)
  ]  # w's (T, C, F) per-task gradients
  assert len(batched) == 1, jaxpr
  for e in batched:
    assert e.params["preferred_element_type"] == jnp.float32
    assert e.params["precision"] in (hi, (hi, hi)), e.params["precision"]
  ref = jax.jacrev(fun)(params, x)
  _, stacked = jax.jit(gj.per_task_value_and_grad(fun, gram="dense"))(params, x)
  _close(stacked, ref, 1e-2)

  use = _dense_gram.DenseUse(0, 0, 0, (1,), (0,), (), 4, 16, 8)
  block_jaxpr = jax.make_jaxpr(lambda a, d: _dense_gram.block(use, a, d, jnp.float32))(
    jnp.ones((4, 16)), jnp.ones((T, 4, 8))
  )
  dots = [e for e in block_jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(e.params["precision"] in (hi, (hi, hi)) for e in dots)


# ---------------------------------------------- nested jit with its settings


def test_nested_jit_with_shardings_or_donation_is_kept():
  """A nested jit with its own shardings or donation is not inlined (its
  settings would be dropped): the leaves entering it keep their pullbacks,
  a plain nested jit is inlined, and every route equals jacrev."""
  mesh = jax.make_mesh((1,), ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  @functools.partial(jax.jit, out_shardings=replicated)
  def sharded_layer(h, w):
    return jnp.tanh(h @ w)

  @jax.jit
  def plain_layer(h, w):
    return h @ w

  def fun(p, x):
    h = sharded_layer(x, p["w"])
    return jnp.mean((plain_layer(h, p["head"]) - 1.0) ** 2, axis=0)

  params, x = _mlp(jnp.float32)
  cov = gj.gram_coverage(fun, gram="dense")(params, x)
  assert cov["['w']"] == "used by a jax.jit call with its own shardings (not inlined)", cov
  assert cov["['head']"] == "dense"
  check_routes(fun, params, (x,), 2e-5, grams=("dense",))

  @functools.partial(jax.jit, donate_argnums=1)
  def donating_layer(h, w):
    return jnp.tanh(h @ w)

  def donating(p, x):
    return jnp.mean((donating_layer(x, p["w"]) @ p["head"] - 1.0) ** 2, axis=0)

  cov = gj.gram_coverage(donating, gram="dense")(params, x)
  assert cov["['w']"] == "used by a jax.jit call with its own donation (not inlined)", cov


# ----------------------------------------------------- one guarded route


def numpy_read(p, x):
  """Reads its batch through NumPy: cannot be traced with an abstract batch."""
  scale = 2.0 if np.asarray(x)[0, 0] > 0 else 3.0
  h = jnp.tanh(x @ p["w"]) * scale
  return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)


def concrete_read(p, x):
  """Reads a concrete value of a jax operation on its batch: no trace of it
  (jax.vjp evaluates it eagerly, a trace stages it out)."""
  scale = 2.0 if float(x[0, 0]) > 0 else 3.0
  h = jnp.tanh(x @ p["w"]) * scale
  return jnp.mean((h @ p["head"] - 1.0) ** 2, axis=0)


def _fallback_messages(call):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = call()
  return out, [str(w.message) for w in caught if issubclass(w.category, gj.FallbackWarning)]


@pytest.mark.parametrize("fun", [numpy_read, concrete_read])
def test_untraceable_loss_falls_back_and_says_so(fun):
  """Without jit, a loss reading a concrete value of its batch cannot be
  analysed: the step takes its plain route (equal to jacrev), warns, and
  gram_coverage reports the same fallbacks (every leaf on its pullback)
  instead of raising. When fun cannot be traced at all, the custom-VJP rule
  cannot be checked either: the combined gradient is then the weighted sum
  of per-task pullbacks (exact), and that is reported too."""
  params, x = _mlp(jnp.float32)
  cov = gj.gram_coverage(fun)(params, x)
  assert set(cov.values()) == {cov["['w']"]}
  assert cov["['w']"].startswith("per-task pullback (tracing fun with abstract arguments failed")
  if fun is numpy_read:  # traced with the batch as it is: no custom VJP found
    assert cov.combined == "one pullback of the weighted losses" and len(cov.fallbacks) == 1
  else:
    assert cov.combined == "weighted sum of per-task pullbacks" and len(cov.fallbacks) == 2
  method = _probe(T)
  (_, grads, _), messages = _fallback_messages(
    lambda: gj.combined_value_and_grad(fun, method)(params, method.init(params), x)
  )
  assert len(messages) == len(cov.fallbacks)
  assert all(r in m for r, m in zip(cov.fallbacks, messages)), (cov.fallbacks, messages)
  ref = jax.jacrev(fun)(params, x)
  _close(grads, method.update(ref, method.init(params), params)[0], 2e-5)
  (_, stacked), messages = _fallback_messages(lambda: gj.per_task_value_and_grad(fun)(params, x))
  assert len(messages) == 1 and "tracing fun with abstract arguments failed" in messages[0]
  _close(stacked, ref, 2e-5)
  for call in (
    lambda: gj.per_task_value_and_grad(fun, on_fallback="raise")(params, x),
    lambda: gj.combined_value_and_grad(fun, method, on_fallback="raise")(
      params, method.init(params), x
    ),
  ):
    with pytest.raises(RuntimeError, match="tracing fun with abstract arguments failed"):
      call()
  # gram="pullback" loses no dense route: only the custom-VJP check is reported
  cov = gj.gram_coverage(fun, gram="pullback")(params, x)
  assert set(cov.values()) == {"per-task pullback (gram='pullback')"}
  assert len(cov.fallbacks) == (0 if fun is numpy_read else 1)
  (_, grads, _), messages = _fallback_messages(
    lambda: gj.combined_value_and_grad(fun, method, gram="pullback")(params, method.init(params), x)
  )
  assert len(messages) == len(cov.fallbacks)
  assert all(r in m for r, m in zip(cov.fallbacks, messages)), (cov.fallbacks, messages)
  _close(grads, method.update(ref, method.init(params), params)[0], 2e-5)
  for call in (
    lambda: gj.per_task_value_and_grad(fun, on_fallback="silent")(params, x),
    lambda: gj.combined_value_and_grad(fun, method, on_fallback="silent")(
      params, method.init(params), x
    ),
  ):
    assert _fallback_messages(call)[1] == []


def test_a_failing_analysis_step_falls_back_as_one_unit(monkeypatch):
  """A failure in any later part of the fast route (here the blocks, then
  the batched weight gradients) makes the whole step take its plain route;
  gram_coverage and the step agree."""
  params, x = _mlp(jnp.float32)

  def fun(p, x):
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["head"] - 1.0) ** 2, axis=0)

  def broken(*args, **kwargs):
    raise IndexError("a bug in the analysis")

  monkeypatch.setattr(_dense_gram, "block", broken)
  monkeypatch.setattr(_dense_gram, "per_task_grad", broken)
  cov = gj.gram_coverage(fun, gram="dense")(params, x)
  assert set(cov.values()) == {
    "per-task pullback (the dense-layer blocks failed (IndexError: a bug in the analysis))"
  }
  method = _probe(T)
  (_, grads, _), messages = _fallback_messages(
    lambda: jax.jit(gj.combined_value_and_grad(fun, method, gram="dense"))(
      params, method.init(params), x
    )
  )
  assert len(messages) == 1 and cov.fallbacks[0] in messages[0]
  ref = jax.jacrev(fun)(params, x)
  _close(grads, method.update(ref, method.init(params), params)[0], 2e-5)
  (_, stacked), messages = _fallback_messages(
    lambda: jax.jit(gj.per_task_value_and_grad(fun, gram="dense"))(params, x)
  )
  assert len(messages) == 1 and "IndexError: a bug in the analysis" in messages[0]
  _close(stacked, ref, 2e-5)


def test_user_errors_are_not_fallbacks():
  """A loss that is not a vector of real losses raises the same ValueError
  on every route, with no fallback warning."""
  params, x = _mlp(jnp.float32)
  for bad in (lambda p, x: jnp.sum(x @ p["w"]), lambda p, x: (x @ p["w"])[0].astype(jnp.int32)):
    for gram in ("auto", "pullback"):
      with warnings.catch_warnings():
        warnings.simplefilter("error", gj.FallbackWarning)
        with pytest.raises(ValueError, match="fun must return"):
          gj.per_task_value_and_grad(bad, gram=gram)(params, x)
        with pytest.raises(ValueError, match="fun must return"):
          gj.combined_value_and_grad(bad, gj.mean(), gram=gram)(params, gj.mean().init(params), x)


def test_switch_spellings():
  f = lambda w: w  # noqa: E731
  for bad in (
    lambda: gj.per_task_value_and_grad(f, gram="fast"),
    lambda: gj.combined_value_and_grad(f, gj.mean(), gram="fast"),
    lambda: gj.gram_coverage(f, gram="fast"),
  ):
    with pytest.raises(ValueError, match="gram must be one of"):
      bad()
  for bad in (
    lambda: gj.per_task_value_and_grad(f, on_fallback="loud"),
    lambda: gj.combined_value_and_grad(f, gj.mean(), on_fallback="loud"),
  ):
    with pytest.raises(ValueError, match="on_fallback must be one of"):
      bad()
  with pytest.raises(TypeError):
    gj.per_task_value_and_grad(f, dense=False)  # spelled gram="pullback"
