r"""Every fast route of the library against ``jax.jacrev``, for one model.

The rule, for every model and every route: the route's result equals the
reference within the stated tolerance, or the route refuses the model with a
clear error the model allows (``Case.refusal``); it never crashes where
``jax.jacrev`` works. A route that falls back to another route is held to
the same tolerance (a fallback is to an exact route); the warnings a route
emits are recorded, and a reported fallback is named in the failure message.

Routes (:data:`ROUTES`, the one place to add one):

* ``per_task_value_and_grad`` (stacked per-task gradients), with its default
  options and with ``gram="pullback"``;
* ``combined_value_and_grad`` (the lean step) with each ``gram`` mode and
  with ``chunk_size=2`` (two chunks for ``T = 3``, one padded), each with a
  Gram probe: a method whose weights are ``K c`` and whose state is ``K``,
  so that the Gram matrix the step formed is compared, and its update
  ``J^T K c`` is sensitive to any error in any block. The default route
  (``gram="auto"``) also runs ``gj.imtl_g()`` (a Gram-based method with a
  closed form: UPGrad's and MGDA's solvers cost about 1 s more to compile
  per model) and ``gj.mean()`` (no Gram pass);
* ``gram_coverage`` with each ``gram`` mode (trace-time only: it must not
  crash where the step works, must name every leaf, and must not call a leaf
  of ``Case.not_dense`` "dense");
* the default per-task route and the lean ``"auto"`` route again without
  ``jax.jit`` (the library then sees concrete values), on
  :data:`EAGER_MODELS`.

References, computed with ``jax.jacrev`` (never with the library's routes):
the stacked Jacobian ``J``, its Gram matrix (``K = Re(J^H J)`` in float64
NumPy: ``gj.gram_matrix`` for real gradients, and the Gram matrix of the real
parameter space for complex ones) and each method's update ``method.update(J,
...) = sum_i w_i J_i``, formed in NumPy from the method's weights for that
Gram matrix (``gj.task_weights(method, gram=K)``: one compilation per method
and dtype, shared by every model).

Tolerances (every comparison is per leaf, ``|route - reference| <= atol``):

* float64: ``atol = RTOL["float64"] * scale``;
* float32: the route is compared with the float64 reference (the same model
  at the same float32 values, cast up) and ``atol = RTOL["float32"] * scale
  + JACREV_FACTOR * |jacrev_float32 - jacrev_float64|``: a route must be as
  accurate as ``jax.jacrev`` itself in float32, up to a small factor;
* ``scale`` is the leaf's largest reference magnitude, at least
  ``LEAF_FLOOR`` times the largest of the whole quantity (a leaf whose true
  gradient is zero is judged against the others);
* a model may override ``RTOL`` (``Case.rtol``: bfloat16 computations, and
  models that compute in float32 even with x64 enabled).

Cost: per model and dtype, the reference and every jitted route are traced
into one function and compiled once, without XLA's optimisation passes
(:data:`COMPILER_OPTIONS`); models are built without compiling anything.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

import gradcraft_jax as gj

from . import models

T = models.T

# Relative tolerances, by the dtype the model runs in: float64 results must
# agree with jax.jacrev in float64 to 1e-10 of their scale (about 1e6 units
# in the last place: room for another summation order, nothing for a lost
# term); float32 results to 1e-4 of their scale, plus JACREV_FACTOR times
# jax.jacrev's own float32 error against float64.
RTOL = {"float64": 1e-10, "float32": 1e-4}
JACREV_FACTOR = 4.0
# A leaf's scale is at least this fraction of the largest magnitude of the
# whole compared quantity (gradients, Gram matrix, update).
LEAF_FLOOR = 1e-3
DTYPES = ("float64", "float32")
# Warnings matching this are reported fallbacks (named in failure messages).
FALLBACK_WARNING = re.compile(r"fall(s|ing)?[ -]?back", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Route:
  """One way of calling the library: ``kind`` is ``"per_task"``
  (``per_task_value_and_grad``), ``"lean"`` (``combined_value_and_grad``)
  or ``"coverage"`` (``gram_coverage``); ``options`` its keyword arguments;
  ``jit`` whether it runs under ``jax.jit``; ``methods`` the methods a lean
  route is run with."""

  kind: str
  options: tuple = ()
  jit: bool = True
  methods: tuple = ("probe",)
  models: tuple | None = None  # the models it is checked on (None: every one)

  @property
  def kwargs(self) -> dict:
    return dict(self.options)


def _route(kind, *, jit=True, methods=("probe",), models=None, **options):
  return Route(kind, tuple(sorted(options.items())), jit, methods, models)


# The methods of the default lean route; the other gram modes share their
# weighting and pullback code with it and run the Gram probe only.
_ALL = ("probe", "imtl_g", "mean")
# The models the routes are also run on without jax.jit (the library then
# sees concrete values): one of each kind of leaf and call the analysis
# handles differently (running every model eagerly would cost minutes).
EAGER_MODELS = (
  "nnx_mlp",
  "nnx_batchnorm_train",
  "custom_vjp_clip_gradient",
  "inner_jit_sharded_donated",
  "quant_int8_weight",
  "int8_dot",
  "fourier_features",
  "python_float_leaf",
  "has_aux_tuple_argnums",
  "concrete_batch_read",
)
# Every route the corpus checks. Adding one is one line here.
ROUTES: dict[str, Route] = {
  "per_task": _route("per_task"),
  "per_task_plain": _route("per_task", gram="pullback"),
  "lean_auto": _route("lean", gram="auto", methods=_ALL),
  "lean_dense": _route("lean", gram="dense", methods=("probe",)),
  "lean_pullback": _route("lean", gram="pullback"),
  "lean_chunk2": _route("lean", chunk_size=2, methods=("probe",)),
  "coverage_auto": _route("coverage", gram="auto"),
  "coverage_dense": _route("coverage", gram="dense"),
  "coverage_pullback": _route("coverage", gram="pullback"),
  "per_task_eager": _route("per_task", jit=False, models=EAGER_MODELS),
  "lean_auto_eager": _route("lean", gram="auto", jit=False, models=EAGER_MODELS),
}
# XLA options for the corpus' compilations: tiny programs, compiled once and
# run once, so the backend's optimisation passes cost more than they save
# (about a third of the default compile time on CPU). They change how XLA
# generates code, not what it computes. Dropped where the installed XLA does
# not know one of them.
COMPILER_OPTIONS = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
  "xla_cpu_use_fusion_emitters": False,
  "xla_cpu_parallel_codegen_split_count": 1,
}
_OPTIONS_OK = [True]

_PROBE_C = (1.0, -0.5, 0.25)


def gram_probe():
  """A Gram-based method whose weights are linear in every Gram entry
  (``w = K c``) and whose state is the Gram matrix it was given."""

  def weights(gram, state, losses, *, num_tasks, **extra_args):
    del state, losses, extra_args
    return gram @ jnp.asarray(_PROBE_C[:num_tasks], gram.dtype), gram

  return gj.from_weighting(
    gj.Weighting(lambda params: jnp.zeros((T, T), jnp.float32), weights, name="gram_probe")
  )


# The methods of the lean routes: the Gram probe, a Gram-based method with a
# closed form (IMTL-G; the solver-based UPGrad and MGDA cost about 1 s more to
# compile per model) and one that reads only the losses.
METHODS = {"probe": gram_probe(), "imtl_g": gj.imtl_g(), "mean": gj.mean()}


# ------------------------------------------------------------------ dtypes


_REGISTERED: dict[str, models.Case] = {}


def register(name: str, case: models.Case) -> str:
  """Makes ``case`` (a generated program) known to the checks as ``name``."""
  _REGISTERED[name] = case
  return name


@functools.lru_cache(maxsize=None)
def get_case(model: str) -> models.Case:
  """The model's case (built once)."""
  if model in _REGISTERED:
    return _REGISTERED[model]
  return models.FAMILIES[model]()


def x64(dtype: str):
  """The JAX configuration a dtype runs in: float64 needs x64 enabled,
  float32 runs in the default configuration."""
  return jax.enable_x64(dtype == "float64")


def _up(x):
  """float32 -> float64 and complex64 -> complex128 (other leaves kept)."""
  if isinstance(x, (jax.Array, np.ndarray)):
    if x.dtype == np.float32:
      return jnp.asarray(x, jnp.float64)
    if x.dtype == np.complex64:
      return jnp.asarray(x, jnp.complex128)
  return x


def case_args(case: models.Case, dtype: str) -> tuple:
  """The case's arguments in ``dtype`` (call inside ``x64(dtype)``)."""
  if dtype == "float32":
    return case.args
  return jax.tree_util.tree_map(_up, case.args)


def diff_args(case: models.Case, args: tuple):
  if isinstance(case.argnums, int):
    return args[case.argnums]
  return tuple(args[n] for n in case.argnums)


def leaf_paths(tree) -> list:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def np_gram(stacked) -> np.ndarray:
  """``K = Re(G^H G)`` over every leaf, in float64 NumPy (independent of
  ``gj.gram_matrix``; equal to it for real gradients)."""
  k = np.zeros((T, T))
  for leaf in jax.tree_util.tree_leaves(stacked):
    g = np.asarray(leaf)
    g = g.reshape(g.shape[0], -1)
    if np.iscomplexobj(g):
      g = np.concatenate([g.real, g.imag], 1)
    g = g.astype(np.float64)
    k += g @ g.T
  return k


# ------------------------------------------------------------ running a model


def compiled(fn, args, jit=True):
  """``fn(*args)`` as host arrays: compiled with :data:`COMPILER_OPTIONS`,
  or called as it is when ``jit`` is false."""
  if not jit:
    return jax.device_get(fn(*args))
  lowered = jax.jit(fn).lower(*args)
  if _OPTIONS_OK[0]:
    try:
      return jax.device_get(lowered.compile(COMPILER_OPTIONS)(*args))
    except Exception as e:  # noqa: BLE001
      if "compile option" not in str(e):
        raise
      _OPTIONS_OK[0] = False
  return jax.device_get(lowered.compile()(*args))


@functools.lru_cache(maxsize=None)
def _weights_fn(method: str, dtype: str):
  """``(K, losses) -> w``: the method's task weights for a Gram matrix (one
  compilation per method and dtype, shared by every model)."""
  tx = METHODS[method]

  def weights(gram, losses):
    w, _ = gj.task_weights(tx, None, tx.init({}), gram=gram, task_losses=losses)
    return w

  return jax.jit(weights)


def reference_update(method: str, dtype: str, jac, gram: np.ndarray, losses) -> Any:
  """``method.update(jac, ...)`` from the reference Jacobian: the method's
  weights for the reference Gram matrix, and ``sum_i w_i J_i`` in float64
  NumPy, in the dtypes of the parameters."""
  with x64(dtype):
    w = np.asarray(_weights_fn(method, dtype)(jnp.asarray(gram, dtype), jnp.asarray(losses)))
  w = w.astype(np.float64)

  def combine(g):
    g = np.asarray(g)
    out = np.tensordot(w, g.astype(np.complex128 if np.iscomplexobj(g) else np.float64), 1)
    return out.astype(g.dtype)

  return jax.tree_util.tree_map(combine, jac)


@dataclasses.dataclass
class Outcome:
  value: Any = None  # the route's result (host arrays), None if it raised
  error: BaseException | None = None
  warnings: tuple = ()


def _call(case: models.Case, route: Route, args: tuple):
  """Run ``route`` on ``case`` at ``args`` (traced when called under jit)."""
  kw = route.kwargs
  if route.kind == "per_task":
    return gj.per_task_value_and_grad(case.fun, case.argnums, case.has_aux, **kw)(*args)
  if route.kind == "lean":
    diff = diff_args(case, args)
    out = {}
    for name in route.methods:
      method = METHODS[name]
      step = gj.combined_value_and_grad(case.fun, method, case.argnums, case.has_aux, **kw)
      out[name] = step(args[0], method.init(diff), *args[1:])
    return out
  if route.kind == "coverage":
    return gj.gram_coverage(case.fun, case.argnums, case.has_aux, **kw)(*args)
  raise ValueError(route.kind)


def _jacrev(case: models.Case, args: tuple) -> dict:
  out = jax.jacrev(case.fun, case.argnums, has_aux=case.has_aux)(*args)
  return {"value": case.fun(*args), "jac": out[0] if case.has_aux else out}


def _record(fn):
  """``fn()``'s result or exception, and the warnings it emitted."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      out = Outcome(value=fn())
    except Exception as e:  # noqa: BLE001 (every crash is a finding)
      out = Outcome(error=e)
  out.warnings = tuple(f"{w.category.__name__}: {w.message}" for w in caught)
  return out


def routes_of(model: str) -> list:
  """The routes checked for ``model``."""
  return [n for n, r in ROUTES.items() if r.models is None or model in r.models]


class _Lazy(dict):
  """A dict computing a missing entry with ``compute(key)``."""

  def __init__(self, compute):
    super().__init__()
    self._compute = compute

  def __missing__(self, key):
    self[key] = value = self._compute(key)
    return value


@functools.lru_cache(maxsize=None)
def run(model: str, dtype: str) -> tuple[dict, dict]:
  """``(reference, outcomes)`` for one model in one dtype. The reference
  (``jax.jacrev`` and the loss values) and every jitted route are traced
  into one function, compiled once (each route traced on its own, so that
  one that raises is recorded and the others still run); if that function
  fails to compile or run, each route is compiled on its own. The routes
  without ``jit`` run when their outcome is first read."""
  case = get_case(model)
  names = routes_of(model)

  def without_jit(name):
    with x64(dtype):
      args = case_args(case, dtype)
      return _record(lambda: compiled(lambda *a: _call(case, ROUTES[name], a), args, jit=False))

  results = _Lazy(without_jit)
  with x64(dtype):
    args = case_args(case, dtype)
    jit = not case.eager_only
    jitted = [n for n in names if ROUTES[n].kind != "coverage" and ROUTES[n].jit and jit]
    traced = {}

    def everything(*args):
      outs = {"reference": _jacrev(case, args)}
      for name in jitted:
        traced[name] = _record(lambda name=name: _call(case, ROUTES[name], args))
        if traced[name].error is None:
          outs[name] = traced[name].value
      return outs

    combined = _record(lambda: compiled(everything, args, jit))
    if combined.error is None:
      ref = combined.value["reference"]
      for name in jitted:
        o = traced[name]
        results[name] = Outcome(combined.value.get(name), o.error, o.warnings)
    else:
      ref = compiled(lambda *a: _jacrev(case, a), args, jit)
      for name in jitted:
        results[name] = _record(
          lambda name=name: compiled(lambda *a: _call(case, ROUTES[name], a), args)
        )
    for name in names:
      if ROUTES[name].kind == "coverage":
        results[name] = without_jit(name)
  ref["gram"] = np_gram(ref["jac"])
  losses = ref["value"][0] if case.has_aux else ref["value"]
  ref["updates"] = {m: reference_update(m, dtype, ref["jac"], ref["gram"], losses) for m in METHODS}
  return ref, results


# -------------------------------------------------------------- comparison


def _host(tree):
  """float64 / complex128 host copies of every leaf."""

  def up(x):
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)

  return jax.tree_util.tree_map(up, tree)


def _max_abs(x) -> float:
  return float(np.max(np.abs(x))) if np.size(x) else 0.0


def assert_close(actual, expected, *, rtol, what, peer=None, dtypes_of=None):
  """``actual`` equals ``expected`` leaf by leaf within ``rtol`` of each
  leaf's scale, plus ``JACREV_FACTOR`` times ``|peer - expected|`` when a
  ``peer`` (jax.jacrev's own lower-precision result) is given; with
  ``dtypes_of``, ``actual`` has the dtypes of that tree."""
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_shapes(actual, expected)
  a, e = _host(actual), _host(expected)
  p = _host(peer) if peer is not None else None
  top = max([_max_abs(x) for x in jax.tree_util.tree_leaves(e)] + [0.0])
  floor = LEAF_FLOOR * top if top > 0 else 1.0

  def atol(e_leaf, p_leaf=None):
    tol = rtol * max(_max_abs(e_leaf), floor)
    if p_leaf is not None:
      tol += JACREV_FACTOR * _max_abs(p_leaf - e_leaf)
    return np.float64(tol)

  tols = jax.tree_util.tree_map(atol, e) if p is None else jax.tree_util.tree_map(atol, e, p)
  worst = []
  for (path, x), y, t in zip(
    jax.tree_util.tree_leaves_with_path(a),
    jax.tree_util.tree_leaves(e),
    jax.tree_util.tree_leaves(tols),
  ):
    err = _max_abs(x - y)
    if not err <= t:  # also catches NaN
      worst.append(f"{jax.tree_util.keystr(path) or '(root)'}: max|err| {err:.3g} > atol {t:.3g}")
  try:
    chex.assert_trees_all_close(
      jax.tree_util.tree_map(lambda x, t: x / t, a, tols),
      jax.tree_util.tree_map(lambda y, t: y / t, e, tols),
      atol=1.0,
      rtol=0.0,
    )
  except AssertionError as err:
    raise AssertionError(f"{what} differs from jax.jacrev: " + "; ".join(worst)) from err
  if dtypes_of is not None:
    chex.assert_trees_all_equal_dtypes(actual, dtypes_of)


def _tolerance(case: models.Case, dtype: str) -> float:
  return (case.rtol or {}).get(dtype, RTOL[dtype])


def _value_parts(case, value):
  return (value[0], value[1]) if case.has_aux else (value, None)


def _comparisons(model: str, route_name: str, dtype: str):
  """``(what, actual, expected, peer, dtypes_of)`` for every quantity a
  successful route is compared on."""
  route = ROUTES[route_name]
  ref, results = run(model, dtype)
  outcome = results[route_name]
  truth = run(model, "float64")[0] if dtype == "float32" else ref
  peer = ref if dtype == "float32" else None

  def item(what, actual, key, sub=None, check_dtypes=True):
    def pick(r):
      x = r[key]
      return x if sub is None else x[sub]

    dtypes_of = pick(ref) if check_dtypes else None
    return what, actual, pick(truth), None if peer is None else pick(peer), dtypes_of

  if route.kind == "per_task":
    value, stacked = outcome.value
    yield item("losses", value, "value", check_dtypes=False)
    yield item("stacked per-task gradients", stacked, "jac")
    yield item("Gram matrix of the stacked gradients", np_gram(stacked), "gram", check_dtypes=False)
  else:
    for name in route.methods:
      value, grads, state = outcome.value[name]
      yield item(f"losses ({name})", value, "value", check_dtypes=False)
      if name == "probe":
        yield item("Gram matrix formed by the step", np.asarray(state), "gram", check_dtypes=False)
      yield item(f"combined update of {name}", grads, "updates", sub=name)


def check_route(model: str, route_name: str, dtype: str) -> str:
  """Assert the rule for one model, route and dtype; returns ``"ok"``,
  ``"refused"`` (a clear error the model allows) or ``"fallback"`` (the
  route raised to report a fallback, as a strict mode may)."""
  case = get_case(model)
  route = ROUTES[route_name]
  outcome = run(model, dtype)[1][route_name]
  fallbacks = [w for w in outcome.warnings if FALLBACK_WARNING.search(w)]
  note = f" (reported fallback: {fallbacks})" if fallbacks else ""
  if outcome.warnings:
    note += f" (warnings: {list(outcome.warnings)})"
  if outcome.error is not None:
    e = outcome.error
    if FALLBACK_WARNING.search(str(e)):
      return "fallback"
    if (
      case.refusal
      and isinstance(e, (ValueError, TypeError, NotImplementedError))
      and re.search(case.refusal, str(e), re.IGNORECASE)
    ):
      return "refused"
    raise AssertionError(
      f"{route_name} crashed where jax.jacrev works: {type(e).__name__}: {e}{note}"
    ) from e
  if route.kind == "coverage":
    _check_coverage(case, dtype, outcome.value, route)
    return "ok"
  rtol = _tolerance(case, dtype)
  for what, actual, expected, peer, dtypes_of in _comparisons(model, route_name, dtype):
    assert_close(
      actual,
      expected,
      rtol=rtol,
      what=f"{route_name} [{dtype}] {what}{note}",
      peer=peer,
      dtypes_of=dtypes_of,
    )
  return "ok"


def relative_error(model: str, route_name: str, dtype: str) -> float | None:
  """The route's largest error against the float64 ``jax.jacrev``
  reference, relative to each leaf's scale (as in :func:`assert_close`,
  without the tolerance), over everything it is compared on; None if the
  route raised or is ``gram_coverage``."""
  outcome = run(model, dtype)[1][route_name]
  if outcome.error is not None or ROUTES[route_name].kind == "coverage":
    return None
  worst = 0.0
  for _, actual, expected, _, _ in _comparisons(model, route_name, dtype):
    a, e = _host(actual), _host(expected)
    top = max([_max_abs(x) for x in jax.tree_util.tree_leaves(e)] + [0.0])
    floor = LEAF_FLOOR * top if top > 0 else 1.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(e)):
      worst = max(worst, _max_abs(x - y) / max(_max_abs(y), floor))
  return worst


def _check_coverage(case, dtype, coverage, route):
  with x64(dtype):
    paths = leaf_paths(diff_args(case, case_args(case, dtype)))
  assert isinstance(coverage, dict), type(coverage)
  assert sorted(coverage) == sorted(paths), (sorted(coverage), sorted(paths))
  assert all(isinstance(v, str) and v for v in coverage.values()), coverage
  wrongly_dense = [p for p in case.not_dense if coverage.get(p) == "dense"]
  assert not wrongly_dense, (
    f"gram_coverage(gram={route.kwargs.get('gram')!r}) reports {wrongly_dense} as 'dense', "
    "but their gradient does not flow through a dense product"
  )
