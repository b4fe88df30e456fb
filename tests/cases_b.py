"""Property-test cases for the comparison methods, part B.

``CASES``: ``(name, factory(num_tasks) -> transform, needs_losses,
order_free, nonconflicting)``.

Non-conflict, stated honestly:

* UPGrad: yes. Every projection lies in the dual cone
  ``{x : <g_j, x> >= 0 for all j}``, a convex cone, so their mean does too
  (exactly for the default ``reg_eps=0``).
* Nash-MTL: ``<g_i, d> = 1/alpha_i > 0`` at an exact solution of
  ``K alpha = 1/alpha``, which only exists when no positive combination of
  the gradients vanishes; with dependent/opposite gradients the ridged
  solution gives ``<g_i, d> = 1/alpha_i - ridge * alpha_i`` (scaled), which
  may be slightly negative. Not claimed.
* CAGrad (any ``c``): maximises ``min_i <g_i, d>`` over a ball around the
  mean; that maximum is negative whenever the ball holds no improving
  direction. Not claimed.
* Aligned-MTL: ``<g_i, d> = sqrt(lambda_min)/T (V Lambda^(1/2) V^T 1)_i``
  can be negative. Not claimed.
* DB-MTL: a positive reweighting of the raw gradients. Not claimed.
"""

import gradcraft_jax.methods as m

CASES = [
  ("cagrad", lambda t: m.cagrad(0.4, num_tasks=t), False, True, False),
  ("dbmtl", lambda t: m.dbmtl(0.9, 0.5, num_tasks=t), True, True, False),
  ("nash_mtl", lambda t: m.nash_mtl(num_tasks=t), False, True, False),
  ("aligned_mtl", lambda t: m.aligned_mtl(num_tasks=t), False, True, False),
  ("upgrad", lambda t: m.upgrad(num_tasks=t), False, True, True),
]
