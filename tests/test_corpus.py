"""The differential corpus: every model family on every route, in float64
and float32, against ``jax.jacrev`` (rules and tolerances:
``tests/corpus/check.py``; the models: ``tests/corpus/models.py``).

One compiled function per model and dtype serves all of its jitted routes;
the tests of one model share it (cached), and run on one xdist worker
(``tests/conftest.py`` groups them by model). Marked slow: the float32 runs
and the routes without ``jit``.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from corpus import check, models

import gradcraft_jax as gj

# (model, route) -> the reason a pair is known to be wrong (empty: every
# route of every model passes). A pair listed here runs as
# xfail(strict=True): it must fail, so an entry cannot outlive its fix.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _params():
  for model in models.FAMILIES:
    for route in check.routes_of(model):
      reason = KNOWN_FAILURES.get((model, route))
      marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
      if not check.ROUTES[route].jit:  # op-by-op dispatch: seconds per model
        marks.append(pytest.mark.slow)
      yield pytest.param(model, route, marks=marks, id=f"{model}-{route}")


def test_corpus_size():
  assert len(models.FAMILIES) >= 40
  assert not set(KNOWN_FAILURES) - {(m, r) for m in models.FAMILIES for r in check.routes_of(m)}


# float64 is the strict check of every route (RTOL 1e-10); float32 (each
# model compiled again) runs with the slow tests.
_DTYPES = [
  pytest.param(d, marks=[pytest.mark.slow] if d == "float32" else []) for d in check.DTYPES
]


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("model, route", list(_params()))
def test_route(model, route, dtype):
  check.check_route(model, route, dtype)


def test_checker_catches_wrong_results():
  """The comparison fails on a wrong leaf, on a non-zero value where the
  reference is zero, on a changed structure and on a changed dtype; the
  float32 peer term widens the tolerance by jax.jacrev's own error only."""
  ref = {"a": np.array([[1.0, -2.0], [0.5, 3.0]]), "z": np.zeros((2, 3))}
  ok = {"a": ref["a"] * (1 + 1e-12), "z": ref["z"] + 1e-14}
  check.assert_close(ok, ref, rtol=1e-10, what="ok")
  bad = [
    {"a": ref["a"] * (1 + 1e-8), "z": ref["z"]},
    {"a": ref["a"], "z": ref["z"] + 1e-6},
    {"a": ref["a"]},
  ]
  for actual in bad:
    with pytest.raises(AssertionError):
      check.assert_close(actual, ref, rtol=1e-10, what="bad")
  with pytest.raises(AssertionError):
    check.assert_close(
      {"a": jnp.asarray(ref["a"], jnp.float32), "z": ref["z"]},
      ref,
      rtol=1e-5,
      what="dtype",
      dtypes_of=ref,
    )
  peer = {"a": ref["a"] + 1e-3, "z": ref["z"]}
  check.assert_close({"a": ref["a"] + 3e-3, "z": ref["z"]}, ref, rtol=1e-10, what="p", peer=peer)
  with pytest.raises(AssertionError):
    check.assert_close({"a": ref["a"] + 5e-3, "z": ref["z"]}, ref, rtol=1e-10, what="p", peer=peer)


def test_np_gram_is_the_real_gram():
  """The reference Gram matrix treats a complex leaf as its real and
  imaginary parts (K = Re(J^H J)), and equals gj.gram_matrix for real ones."""
  rng = np.random.default_rng(0)
  real = {"w": rng.standard_normal((3, 4, 2)), "b": rng.standard_normal((3, 5))}
  np.testing.assert_allclose(check.np_gram(real), np.asarray(gj.gram_matrix(real)), rtol=1e-6)
  z = rng.standard_normal((3, 4)) + 1j * rng.standard_normal((3, 4))
  pairs = np.concatenate([z.real, z.imag], 1)
  np.testing.assert_allclose(check.np_gram({"z": z}), pairs @ pairs.T, rtol=1e-12)
