"""per_task_value_and_grad against jax.jacrev, with and without chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradcraft_jax import per_task_value_and_grad


def _params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "dense": {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4,))},
    "head": [jax.random.normal(k3, (4, 5)), jnp.ones(())],
  }


def _losses(params, x, t):
  h = jnp.tanh(x @ params["dense"]["w"] + params["dense"]["b"])
  out = h @ params["head"][0] * params["head"][1]  # (batch, 5)
  cols = jnp.concatenate([out, out**2], axis=1)[:, :t]  # t <= 10 tasks
  return jnp.mean(cols**2 + jnp.sin(cols), axis=0)  # (t,)


def _assert_tree_close(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [1, 3, 7])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4, 64])
def test_matches_jacrev(t, chunk_size):
  params = _params(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
  losses, grads = per_task_value_and_grad(_losses, chunk_size=chunk_size)(params, x, t)
  np.testing.assert_allclose(losses, _losses(params, x, t), rtol=1e-6)
  _assert_tree_close(grads, jax.jacrev(_losses)(params, x, t))


@pytest.mark.parametrize("chunk_size", [None, 2, 3])
def test_argnums_tuple_and_has_aux(chunk_size):
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 5))
  b = jax.random.normal(jax.random.PRNGKey(3), (5,))
  x = jax.random.normal(jax.random.PRNGKey(4), (6, 3))

  def f(x, w, b):
    z = x @ w + b
    return jnp.mean(z**2, axis=0), {"z": z}

  (losses, aux), (gw, gb) = per_task_value_and_grad(
    f, argnums=(1, 2), has_aux=True, chunk_size=chunk_size
  )(x, w, b)
  jw, jb = jax.jacrev(f, argnums=(1, 2), has_aux=True)(x, w, b)[0]
  np.testing.assert_allclose(losses, f(x, w, b)[0], rtol=1e-6)
  np.testing.assert_allclose(aux["z"], f(x, w, b)[1]["z"], rtol=1e-6)
  _assert_tree_close((gw, gb), (jw, jb))
  assert gw.shape == (5, 3, 5) and gb.shape == (5, 5)


@pytest.mark.parametrize("argnums", [1, -2])
def test_argnums_int(argnums):
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 2))
  w = jax.random.normal(jax.random.PRNGKey(6), (2, 3))
  f = lambda x, w, s: s * jnp.sum((x @ w) ** 2, axis=0)
  _, g = per_task_value_and_grad(f, argnums=argnums, chunk_size=2)(x, w, 2.0)
  _assert_tree_close(g, jax.jacrev(f, argnums=1)(x, w, 2.0))


def test_jit_and_kwargs():
  params = _params(jax.random.PRNGKey(7))
  x = jax.random.normal(jax.random.PRNGKey(8), (8, 3))
  fn = jax.jit(
    per_task_value_and_grad(lambda p, x, *, t: _losses(p, x, t), chunk_size=4), static_argnames="t"
  )
  _, g = fn(params, x, t=9)
  _assert_tree_close(g, jax.jacrev(_losses)(params, x, 9))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_non_vector_losses_raise(chunk_size):
  w = jnp.ones((3,))
  for out in (lambda w: jnp.sum(w), lambda w: jnp.outer(w, w)):
    with pytest.raises(ValueError, match="1-D vector"):
      per_task_value_and_grad(out, chunk_size=chunk_size)(w)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_bad_chunk_size(bad):
  with pytest.raises(ValueError, match="chunk_size"):
    per_task_value_and_grad(lambda w: w, chunk_size=bad)


def test_chunking_bounds_memory():
  """With many tasks and a wide hidden layer, the vmapped backward pass
  holds T copies of the activations' cotangents; chunks hold k."""
  t, batch, hidden = 32, 256, 512
  w1 = jnp.ones((16, hidden)) * 0.01
  w2 = jnp.ones((hidden, t)) * 0.01
  x = jnp.ones((batch, 16))

  def f(params, x):
    h = jnp.tanh(x @ params[0])
    return jnp.mean((h @ params[1]) ** 2, axis=0)

  def temp(chunk):
    fn = jax.jit(per_task_value_and_grad(f, chunk_size=chunk))
    return fn.lower((w1, w2), x).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp(None), temp(4)
  assert chunked < 0.5 * full, (chunked, full)
