"""The core: the Weighting object, from_weighting and task_weights.

Every method is a :class:`gradcraft_jax.Weighting` turned into an optax
transform by :func:`gradcraft_jax.from_weighting`, and
:func:`gradcraft_jax.task_weights` returns the weights the transform would
use. Checked here, independently of any method's math:

* a hand-written weighting gives the update ``sum_i w_i g_i`` computed with
  NumPy, with and without ``jit`` (``chex.variants``), and receives what it
  declares (Gram matrix or ``None``, losses or ``None``, ``num_tasks``,
  unknown extra arguments);
* for every weighting of the registry (``tests/method_cases.py``), plain
  and wrapped in ``gradcraft_jax.inject_hyperparams``, the weights of
  ``task_weights`` are the ones the update implies: the update equals
  ``sum_i w_i g_i`` computed with NumPy from those weights, and both give
  the same new state; the registry's methods that are not weightings
  (``NOT_WEIGHTINGS``) are refused with a ``TypeError``;
* a transform that is not a method (``optax.adam``, a chain, an
  ``apply_if_finite`` wrapper, a method hidden by ``optax.inject_hyperparams``)
  raises a ``TypeError`` saying so;
* ``optax.inject_hyperparams`` around a method factory still gives the same
  updates on the stacked path as ``gradcraft_jax.inject_hyperparams``;
* ``mean`` makes no Gram pass (no contraction in its jaxpr or its HLO);
* on non-finite input the update (and the weights) are non-finite and the
  state is kept; an empty tree passes through.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_cases import CASES, IDS

import gradcraft_jax as gj
import gradcraft_jax.methods as m

T = 3
SHAPES = {"a": (2, 3), "b": (4,)}

# Methods of the registry that are not weightings (their update is not a
# combination sum_i w_i g_i with weights from the Gram matrix and losses):
# task_weights must refuse them with a TypeError. A method added to the
# registry is a weighting unless listed here.
NOT_WEIGHTINGS = {
  "trimmed_mean": "coordinate-wise trimmed mean",
  "graddrop": "elementwise sign dropout",
  "moco": "tracks the full task gradients in its state",
  "excess_mtl": "accumulates full squared gradients in its state",
}
WEIGHTING_CASES = [c for c in CASES if c.name not in NOT_WEIGHTINGS]
WEIGHTING_IDS = [c.name for c in WEIGHTING_CASES]
NON_WEIGHTINGS = [c for c in CASES if c.name in NOT_WEIGHTINGS]


def stacked_of(flat, dtype=jnp.float32):
  """(T, 10) -> {"a": (T, 2, 3), "b": (T, 4)}."""
  flat = np.asarray(flat)
  t = flat.shape[0]
  return {
    "a": jnp.asarray(flat[:, :6].reshape(t, 2, 3), dtype),
    "b": jnp.asarray(flat[:, 6:], dtype),
  }


def params_like(dtype=jnp.float32):
  return {k: jnp.zeros(s, dtype) for k, s in SHAPES.items()}


def np_weighted_sum(flat, w):
  """``sum_i w_i g_i`` in float64 NumPy, as a tree like the parameters."""
  d = np.asarray(w, np.float64) @ np.asarray(flat, np.float64)
  return {"a": d[:6].reshape(2, 3), "b": d[6:]}


def update_kwargs(case, t, rng):
  kw = {}
  if case.needs_losses:
    kw["task_losses"] = jnp.asarray(rng.uniform(0.5, 2.0, t), jnp.float32)
  if case.extra is not None:
    kw.update(case.extra(t, rng))
  return kw


def inverse_norm_weights(gram, state, losses, *, num_tasks, **extra_args):
  """1 / ||g_i||: a weighting written here, independent of the library."""
  del losses, num_tasks, extra_args
  return 1.0 / jnp.sqrt(jnp.diagonal(gram)), state


def counting_init(params):
  del params
  return jnp.zeros((), jnp.int32)


# ------------------------------------------------------- the Weighting object


class FromWeightingTest(chex.TestCase):
  """The transform built from a weighting, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_is_weighted_sum_of_the_weights(self):
    flat = np.random.default_rng(0).standard_normal((T, 10))
    tx = gj.from_weighting(gj.Weighting(counting_init, inverse_norm_weights, name="inv"))
    g = stacked_of(flat)
    chex.assert_tree_shape_prefix(g, (T,))
    upd, state = self.variant(tx.update)(g, tx.init(params_like()))
    chex.assert_trees_all_equal_shapes_and_dtypes(upd, params_like())
    w = 1.0 / np.linalg.norm(flat, axis=1)
    chex.assert_trees_all_close(upd, np_weighted_sum(flat, w), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(state, jnp.zeros((), jnp.int32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_weights_receive_what_they_declare(self):
    """needs_gram=False: no Gram matrix (None); needs_losses: the losses in
    the accumulation dtype; num_tasks and unknown extra args are passed."""
    seen = {}

    def weights(gram, state, losses, *, num_tasks, **extra_args):
      seen.update(gram=gram, losses=losses, t=num_tasks, extra=sorted(extra_args))
      return losses / jnp.sum(losses), state + 1

    tx = gj.from_weighting(
      gj.Weighting(counting_init, weights, name="by_loss", needs_gram=False, needs_losses=True)
    )
    flat = np.random.default_rng(1).standard_normal((T, 10))
    losses = jnp.array([1.0, 2.0, 5.0], jnp.bfloat16)
    upd, state = self.variant(tx.update)(
      stacked_of(flat), tx.init(params_like()), task_losses=losses, unknown=jnp.ones(2)
    )
    assert seen["gram"] is None
    chex.assert_shape(seen["losses"], (T,))
    chex.assert_type(seen["losses"], jnp.float32)
    assert seen["t"] == T and seen["extra"] == ["unknown"]
    chex.assert_trees_all_close(upd, np_weighted_sum(flat, [0.125, 0.25, 0.625]), rtol=1e-5)
    chex.assert_trees_all_equal(state, jnp.ones((), jnp.int32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_bf16_leaves_keep_their_dtype(self):
    flat = np.random.default_rng(2).standard_normal((T, 10))
    tx = gj.from_weighting(gj.Weighting(counting_init, inverse_norm_weights, name="inv"))
    g = stacked_of(flat, jnp.bfloat16)
    upd, _ = self.variant(tx.update)(g, tx.init(params_like()))
    chex.assert_trees_all_equal_shapes_and_dtypes(upd, params_like(jnp.bfloat16))
    rounded = np.asarray(jnp.asarray(flat, jnp.bfloat16), np.float64)
    ref = np_weighted_sum(rounded, 1.0 / np.linalg.norm(rounded, axis=1))
    chex.assert_trees_all_close(
      jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), upd), ref, rtol=2e-2, atol=2e-2
    )


def test_weighting_is_frozen_and_keyword_only():
  w = gj.Weighting(counting_init, inverse_norm_weights, name="inv")
  assert w.needs_gram and not w.needs_losses and w.num_tasks is None
  with pytest.raises(Exception):
    w.name = "other"
  with pytest.raises(TypeError):
    gj.Weighting(counting_init, inverse_norm_weights, "inv")  # name is keyword-only


def test_wrong_weight_shape_and_task_count_raise():
  bad = gj.Weighting(counting_init, lambda k, s, l, **kw: (jnp.ones(2), s), name="bad")
  g = stacked_of(np.ones((T, 10)))
  with pytest.raises(ValueError, match=r"bad: .*shape \(2,\).*expected \(3,\)"):
    gj.from_weighting(bad).update(g, jnp.zeros((), jnp.int32))
  fixed = gj.Weighting(counting_init, inverse_norm_weights, name="fixed", num_tasks=2)
  with pytest.raises(ValueError, match="fixed: built for num_tasks=2"):
    gj.from_weighting(fixed).update(g, jnp.zeros((), jnp.int32))


def test_missing_losses_raise_with_the_method_name():
  w = gj.Weighting(
    counting_init, lambda k, s, l, **kw: (l, s), name="lossy", needs_gram=False, needs_losses=True
  )
  with pytest.raises(ValueError, match="lossy needs the per-task losses"):
    gj.from_weighting(w).update(stacked_of(np.ones((T, 10))), jnp.zeros((), jnp.int32))


# ------------------------------------------------------- task_weights


def inject_all(case, t):
  """The method wrapped in ``gradcraft_jax.inject_hyperparams`` (state wrapped)."""
  return gj.inject_hyperparams(lambda: case.make(t))()


# Real injected hyperparameters (arrays in the state, used by the update).
INJECTED = [
  ("gradcraft", lambda t: gj.inject_hyperparams(gj.gradcraft)(tau=0.5, eps=0.1), False),
  ("pcgrad_plus", lambda t: gj.inject_hyperparams(m.pcgrad_plus)(tau=0.3, eps=0.05), False),
  (
    "cagrad",
    lambda t: gj.inject_hyperparams(m.cagrad, static_args=("outer_iters", "inner_iters"))(c=0.4),
    False,
  ),
  ("dwa", lambda t: gj.inject_hyperparams(m.dwa)(1.5, num_tasks=t), True),
  (
    "uncertainty_weighting",
    lambda t: gj.inject_hyperparams(m.uncertainty_weighting)(0.1, num_tasks=t),
    True,
  ),
]


def check_task_weights_match_update(tx, needs_losses, extra, seed, steps=2):
  """Over a few steps: ``update == sum_i w_i g_i`` (NumPy) with ``w`` from
  ``task_weights`` on the same state, and the same new state; also with
  the Gram matrix given instead of the stacked gradients. All under one jit
  (one compilation per method)."""
  rng = np.random.default_rng(seed)
  state = tx.init(params_like())

  @jax.jit
  def step(g, gram, state, kw):
    upd, new_state = tx.update(g, state, **kw)
    w, w_state = gj.task_weights(tx, g, state, **kw)
    w_gram, _ = gj.task_weights(tx, None, state, gram=gram, **kw)
    return upd, new_state, w, w_state, w_gram

  for _ in range(steps):
    flat = rng.standard_normal((T, 10)) * np.array([[1.0], [3.0], [0.3]])
    kw = {}
    if needs_losses:
      kw["task_losses"] = jnp.asarray(rng.uniform(0.5, 2.0, T), jnp.float32)
    if extra is not None:
      kw.update(extra(T, rng))
    gram = jnp.asarray(flat @ flat.T, jnp.float32)
    upd, new_state, w, w_state, w_gram = step(stacked_of(flat), gram, state, kw)
    chex.assert_shape(w, (T,))
    chex.assert_tree_all_finite(w)
    chex.assert_trees_all_close(upd, np_weighted_sum(flat, w), rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(w_state, new_state, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(w_gram, w, rtol=1e-4, atol=1e-5)
    state = new_state
  return step, state, kw


def check_nan_keeps_state(tx, step, state, kw, needs_losses):
  """With the compiled step of a weighting: a NaN gradient gives a
  non-finite update (and NaN weights), and leaves the state exactly as it
  was when the method reads the Gram matrix; a NaN loss does the same for
  methods reading the losses."""
  bad = np.random.default_rng(5).standard_normal((T, 10))
  bad[1, 3] = np.nan
  gram = jnp.asarray(bad @ bad.T, jnp.float32)
  upd, new_state, w, w_state, _ = step(stacked_of(bad), gram, state, kw)
  assert not all_finite(upd)
  if reads_gram(tx, state, kw):
    assert not all_finite(w)
    chex.assert_trees_all_equal(new_state, state)
    chex.assert_trees_all_equal(w_state, state)
  if needs_losses:
    good = np.random.default_rng(6).standard_normal((T, 10))
    kw_bad = dict(kw, task_losses=kw["task_losses"].at[0].set(jnp.nan))
    gram = jnp.asarray(good @ good.T, jnp.float32)
    upd, new_state, w, w_state, _ = step(stacked_of(good), gram, state, kw_bad)
    assert not all_finite(upd) and not all_finite(w)
    chex.assert_trees_all_equal(new_state, state)
    chex.assert_trees_all_equal(w_state, state)


@pytest.mark.parametrize("case", WEIGHTING_CASES, ids=WEIGHTING_IDS)
def test_task_weights_are_what_the_update_uses(case):
  """...and, with the same compiled step, the state is kept on NaN input."""
  tx = case.make(T)
  step, state, kw = check_task_weights_match_update(tx, case.needs_losses, case.extra, seed=0)
  check_nan_keeps_state(tx, step, state, kw, case.needs_losses)


@pytest.mark.parametrize("case", WEIGHTING_CASES, ids=WEIGHTING_IDS)
def test_task_weights_through_inject_hyperparams(case):
  check_task_weights_match_update(inject_all(case, T), case.needs_losses, case.extra, seed=1)


@pytest.mark.parametrize("case", NON_WEIGHTINGS, ids=[c.name for c in NON_WEIGHTINGS])
def test_task_weights_refuses_methods_that_are_not_weightings(case):
  rng = np.random.default_rng(0)
  kw = update_kwargs(case, T, rng)
  g = stacked_of(rng.standard_normal((T, 10)))
  for tx in (case.make(T), optax.inject_hyperparams(lambda: case.make(T))()):
    with pytest.raises(TypeError, match="task_weights needs a method of gradcraft_jax"):
      gj.task_weights(tx, g, tx.init(params_like()), **kw)
    with pytest.raises(TypeError, match="caller needs a method of gradcraft_jax"):
      gj.weighting_of(tx, "caller")
  with pytest.raises(TypeError, match="coordinate by coordinate"):
    gj.weighting_of(case.make(T))
  with pytest.raises(TypeError, match="inject_hyperparams needs a method"):
    gj.inject_hyperparams(lambda: case.make(T))()


@pytest.mark.parametrize("name,make,needs_losses", INJECTED, ids=[i[0] for i in INJECTED])
def test_task_weights_with_injected_hyperparameters(name, make, needs_losses):
  check_task_weights_match_update(make(T), needs_losses, None, seed=2)


@pytest.mark.parametrize("name,make,needs_losses", INJECTED, ids=[i[0] for i in INJECTED])
def test_optax_inject_hyperparams_still_works_on_the_stacked_path(name, make, needs_losses):
  """optax's own wrapper around a method factory gives the updates and
  hyperparameters that gradcraft_jax.inject_hyperparams gives."""
  factory_args = {
    "gradcraft": (gj.gradcraft, (), {"tau": optax.linear_schedule(0.0, 1.0, 4), "eps": 0.1}),
    "pcgrad_plus": (m.pcgrad_plus, (), {"tau": 0.3, "eps": 0.05}),
    "cagrad": (m.cagrad, (), {"c": 0.4}),
    "dwa": (m.dwa, (1.5,), {"num_tasks": T}),
    "uncertainty_weighting": (m.uncertainty_weighting, (0.1,), {"num_tasks": T}),
  }
  factory, args, kwargs = factory_args[name]
  static = ("outer_iters", "inner_iters") if name == "cagrad" else ()
  ours = gj.inject_hyperparams(factory, static_args=static)(*args, **kwargs)
  theirs = optax.inject_hyperparams(factory, static_args=static)(*args, **kwargs)
  rng = np.random.default_rng(7)
  s_ours, s_theirs = ours.init(params_like()), theirs.init(params_like())
  for _ in range(3):
    g = stacked_of(rng.standard_normal((T, 10)))
    kw = {"task_losses": jnp.asarray(rng.uniform(0.5, 2.0, T), jnp.float32)}
    u_ours, s_ours = ours.update(g, s_ours, **kw)
    u_theirs, s_theirs = theirs.update(g, s_theirs, **kw)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(s_ours, s_theirs, rtol=1e-6, atol=1e-7)


def test_task_weights_follow_an_injected_hyperparameter():
  """Changing the injected value in the state changes the weights as a
  freshly built transform with that value does."""
  tx = gj.inject_hyperparams(gj.gradcraft)(tau=0.5, eps=0.1)
  state = tx.init(params_like())
  state.hyperparams["tau"] = jnp.asarray(0.0)
  g = stacked_of(np.random.default_rng(3).standard_normal((T, 10)))
  w, _ = gj.task_weights(tx, g, state)
  ref = gj.gradcraft(0.0, 0.1)
  w_ref, _ = gj.task_weights(ref, g, ref.init(params_like()))
  chex.assert_trees_all_close(w, w_ref, rtol=1e-6)


def test_task_weights_needs_a_task_count():
  with pytest.raises(ValueError, match="num_tasks to fix T"):
    gj.task_weights(m.mean(), None, optax.EmptyState())
  w, _ = gj.task_weights(m.mean(), None, optax.EmptyState(), num_tasks=4)
  chex.assert_trees_all_close(w, jnp.full((4,), 0.25))


@pytest.mark.parametrize(
  "what,make",
  [
    pytest.param("adam", lambda: optax.adam(1e-3)),
    pytest.param(
      "chain",
      lambda: optax.chain(m.mgda(), optax.adam(1e-3)),
    ),
    ("apply_if_finite", lambda: optax.apply_if_finite(m.mgda(), 3)),
    # sgd's scale would map over a pytree answer and return -lr * w silently
    ("chain_sgd", lambda: optax.chain(m.mgda(), optax.sgd(0.1))),
    ("not_a_transform", lambda: object()),
    ("optax_inject", lambda: optax.inject_hyperparams(m.mgda)()),
  ],
)
def test_task_weights_rejects_non_methods(what, make):
  tx = make()
  g = stacked_of(np.ones((T, 10)))
  state = tx.init(params_like()) if hasattr(tx, "init") else None
  with pytest.raises(TypeError, match="task_weights needs a method of gradcraft_jax"):
    gj.task_weights(tx, g, state)
  with pytest.raises(TypeError, match="my_caller needs a method of gradcraft_jax"):
    gj.weighting_of(tx, "my_caller")


@pytest.mark.parametrize("case", WEIGHTING_CASES, ids=WEIGHTING_IDS)
def test_every_weighting_is_reachable(case):
  """Each factory's transform carries its weighting, also through
  gradcraft_jax.inject_hyperparams, with the same flags."""
  tx, injected = case.make(T), inject_all(case, T)
  assert isinstance(tx, gj.Method) and isinstance(injected, gj.Method)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  w, wi = gj.weighting_of(tx), gj.weighting_of(injected)
  assert gj.weighting_of(w) is w
  assert (w.name, w.needs_gram, w.needs_losses) == (wi.name, wi.needs_gram, wi.needs_losses)


def test_the_gram_is_computed_only_when_the_weighting_reads_it():
  calls = []

  def gram_fn(leaves):
    calls.append(leaves)
    return jnp.eye(T)

  def weigh(tx):
    return gj.weighting.weigh(
      gj.weighting_of(tx),
      optax.EmptyState(),
      num_tasks=T,
      gram_fn=gram_fn,
      task_losses=None,
      dtype=jnp.float32,
      extra_args={},
    )

  weigh(m.mean())
  assert calls == []
  w, _ = weigh(m.mgda())
  assert calls == [None]
  chex.assert_trees_all_close(w, jnp.full((T,), 1.0 / T), rtol=1e-5)


# ------------------------------------------------------- construction errors


def test_from_weighting_takes_a_weighting_only():
  with pytest.raises(TypeError, match="takes a gradcraft_jax.Weighting"):
    gj.from_weighting(counting_init)


# ------------------------------------------------------- no Gram pass for mean

CONTRACTIONS = ("dot_general", "ffi_call", "custom_call", "platform_index")


def _program_texts(tx, g):
  state = tx.init(params_like())
  jaxpr = str(jax.make_jaxpr(tx.update)(g, state))
  hlo = jax.jit(tx.update).lower(g, state).as_text()
  return jaxpr, hlo


def test_mean_makes_no_gram_pass():
  """mean's update is one weighted sum: its program contracts nothing (no
  dot_general, no CPU-kernel custom call), while a Gram method's does."""
  g = stacked_of(np.ones((T, 10)))
  for text in _program_texts(m.mean(), g):
    assert not [c for c in CONTRACTIONS if c in text], text
  for text in _program_texts(m.mgda(), g):  # the check can see a Gram pass
    assert [c for c in CONTRACTIONS if c in text]


# ------------------------------------------------------- non-finite, empty


def reads_gram(tx, state, kw):
  """Whether the method's weighting reads the Gram matrix (asked with a Gram
  function that records its call)."""
  calls = []

  def gram_fn(leaves):
    calls.append(1)
    return jnp.eye(T)

  jax.eval_shape(  # traced only: nothing is computed
    lambda state, kw: gj.weighting.weigh(
      gj.weighting_of(tx),
      state,
      num_tasks=T,
      gram_fn=gram_fn,
      task_losses=kw.get("task_losses"),
      dtype=jnp.float32,
      extra_args={k: v for k, v in kw.items() if k != "task_losses"},
    ),
    state,
    kw,
  )
  return bool(calls)


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("case", NON_WEIGHTINGS, ids=[c.name for c in NON_WEIGHTINGS])
def test_nonfinite_update_on_nan_for_non_weightings(case):
  """(Weightings: see test_task_weights_are_what_the_update_uses.)"""
  rng = np.random.default_rng(5)
  tx = case.make(T)
  update = jax.jit(tx.update)
  kw = update_kwargs(case, T, rng)
  _, state = update(stacked_of(rng.standard_normal((T, 10))), tx.init(params_like()), **kw)
  bad = rng.standard_normal((T, 10))
  bad[1, 3] = np.nan
  upd, _ = update(stacked_of(bad), state, **kw)
  assert not all_finite(upd)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_empty_tree_passes_through(case):
  tx = case.make(T)
  state = tx.init(params_like())
  for empty in ({}, (), None):
    upd, new_state = tx.update(empty, state)
    assert upd == empty
    assert new_state is state
