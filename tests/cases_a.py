"""Property-test cases for the comparison methods, part A.

``CASES``: ``(name, factory(num_tasks) -> transform, needs_losses,
order_free, nonconflicting)``. ``order_free``: permuting the tasks (and
losses) gives the same update. ``nonconflicting``: the update never has a
negative inner product with a task gradient.
"""

import gradcraft_jax.methods as m

CASES = [
  ("mean", lambda t: m.mean(num_tasks=t), False, True, False),
  ("uncertainty_weighting", lambda t: m.uncertainty_weighting(0.1, num_tasks=t), True, True, False),
  ("dwa", lambda t: m.dwa(2.0, num_tasks=t), True, True, False),
  ("mgda", lambda t: m.mgda(num_tasks=t), False, True, True),
  ("pcgrad", lambda t: m.pcgrad(seed=1, num_tasks=t), False, False, False),
  ("pcgrad_plus", lambda t: m.pcgrad_plus(0.5, 0.1, seed=1, num_tasks=t), False, False, False),
  ("gradvac", lambda t: m.gradvac(0.5, num_tasks=t), False, False, False),
  ("imtl_g", lambda t: m.imtl_g(num_tasks=t), False, True, False),
  ("imtl", lambda t: m.imtl(0.1, num_tasks=t), True, True, False),
]
