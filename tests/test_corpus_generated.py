"""Random programs (``tests/corpus/programs.py``: views, casts, products with
random dimension numbers and batch dimensions, gathers, ``scan``, ``cond``,
custom VJPs) on every jitted route and ``gram_coverage``, in float64 and
float32, against ``jax.jacrev`` (rules and tolerances:
``tests/corpus/check.py``).

Deterministic: the examples are drawn by Hypothesis' ``derandomize`` profile
(``tests/conftest.py``), a bounded number per run, without shrinking (a
failure reports the program as drawn; shrinking would re-run whole
compilations). ``HYPOTHESIS_PROFILE=explore`` draws fresh programs.
"""

import pytest
from corpus import check, programs
from hypothesis import Phase, given, settings

# (operation kind, route) -> what is known to be wrong. A program with such an
# operation is checked on its other routes by test_generated_programs and on
# these by test_generated_known_failures (xfail, strict=False); once fixed,
# the pair is removed from here.
_CUSTOM_VJP_CHUNK = (
  "chunk_size forms the Gram matrix with forward mode, which cannot differentiate a "
  "custom_vjp: TypeError"
)
_NONLINEAR_VJP = (
  "a custom_vjp rule not linear in the cotangent (clip_gradient) is applied once to the "
  "weighted cotangent instead of per task: wrong combined update"
)
_INT_CAST = (
  "a weight cast to int8 before its product is taken for a dense use: non-zero Gram block "
  "for a zero gradient, and gram_coverage reports it as 'dense'"
)
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

# Every route that runs under jit on any model, and gram_coverage.
ROUTES = tuple(n for n, r in check.ROUTES.items() if r.jit and r.models is None)
MAX_EXAMPLES = 6
_NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def _check(program, routes):
  name = check.register(f"generated {program}", programs.build(program))
  for dtype in check.DTYPES:
    for route in routes:
      check.check_route(name, route, dtype)


def _known(program):
  return {r for (kind, r) in KNOWN_FAILURES if kind in program.kinds}


@settings(max_examples=MAX_EXAMPLES, deadline=None, phases=_NO_SHRINK)
@given(program=programs.programs())
def test_generated_programs(program):
  known = _known(program)
  _check(program, [r for r in ROUTES if r not in known])


@pytest.mark.slow
@pytest.mark.skipif(not KNOWN_FAILURES, reason="no known failures")
@pytest.mark.xfail(strict=False, reason="; ".join(sorted(set(KNOWN_FAILURES.values()))))
@settings(max_examples=4, deadline=None, phases=_NO_SHRINK)
@given(program=programs.programs(require=tuple(sorted({k for k, _ in KNOWN_FAILURES}))))
def test_generated_known_failures(program):
  _check(program, [r for r in ROUTES if r in _known(program)])


def test_known_failures_name_real_ops_and_routes():
  assert {k for k, _ in KNOWN_FAILURES} <= set(programs.OPS)
  assert {r for _, r in KNOWN_FAILURES} <= set(ROUTES)
