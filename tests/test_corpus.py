"""The differential corpus: every model family on every route, in float64
and float32, against ``jax.jacrev`` (rules and tolerances:
``tests/corpus/check.py``; the models: ``tests/corpus/models.py``).

One compiled function per model and dtype serves all of its jitted routes;
the tests of one model share it (cached), and run on one xdist worker
(``tests/conftest.py`` groups them by model).
"""

import pytest
from corpus import check, models

# (model, route) -> what is wrong today. Each pair runs as
# xfail(strict=False): it reports XPASS once fixed, and the pair is then
# removed from here.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _params():
  for model in models.FAMILIES:
    for route in check.ROUTES:
      reason = KNOWN_FAILURES.get((model, route))
      marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
      yield pytest.param(model, route, marks=marks, id=f"{model}-{route}")


def test_corpus_size():
  assert len(models.FAMILIES) >= 40
  assert not set(KNOWN_FAILURES) - {(m, r) for m in models.FAMILIES for r in check.ROUTES}


@pytest.mark.parametrize("dtype", check.DTYPES)
@pytest.mark.parametrize("model, route", list(_params()))
def test_route(model, route, dtype):
  check.check_route(model, route, dtype)
