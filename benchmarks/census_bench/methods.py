"""Which methods the benchmark runs and how each one is built.

Methods are enumerated from ``gradcraft_jax.methods.__all__``: every public
function whose return annotation is ``Method`` or ``CoordinatewiseMethod``
(both optax gradient transformations) is a method factory (the ``*_weights``
and ``*_step`` functions and other helpers are not).
NMT is run separately (priority stages), so it is left out of the list.

A factory is called with ``num_tasks=T`` and ``seed=seed`` when it takes
them, and otherwise with its defaults. A factory with a required argument
the benchmark cannot supply, or whose update needs extra arguments (a second
batch, ...), is *skipped* and the reason is printed in the table.

"Crafting" methods are those whose weights read the Gram matrix (detected by
asking the method for its weights with a lazily computed Gram matrix); they
also run on the shared parameters only (``gradcraft_jax.shared_only``; the
task-specific leaves get their own task's gradient), as separate rows.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import optax

import gradcraft_jax
import gradcraft_jax.methods as library_methods

NMT = "nmt"
# Return annotations of the method factories.
METHOD_TYPES = ("Method", "CoordinatewiseMethod")
# Display order of the methods listed here; any other method of the library
# is appended after them (before GradCraft, which comes last).
PREFERRED_ORDER = (
  "mean",
  "uncertainty_weighting",
  "dwa",
  "rlw",
  "gls",
  "famo",
  "stch",
  "imtl_l",
  "gradnorm",
  "mgda",
  "pcgrad",
  "pcgrad_plus",
  "gradvac",
  "cagrad",
  "imtl_g",
  "imtl",
  "dbmtl",
  "nash_mtl",
  "aligned_mtl",
  "upgrad",
  "cr_mogm",
  "fairgrad",
  "gradcraft",
)
# Methods whose ``seed`` argument only seeds the initial state (a PRNG key
# created in ``init``): one traced update serves every seed.
SEED_IN_STATE_ONLY = ("pcgrad", "pcgrad_plus", "gradvac")
SHARED_SUFFIX = " (shared)"
# Methods whose update needs the stacked gradients of a second, independent
# mini-batch (``update(..., stacked_2=...)``): the benchmarks draw one per
# step for them (twice the gradient cost), and run them on the whole model only.
SECOND_BATCH = ("modo", "sdmgrad")
# Required factory arguments the benchmarks supply: CR-MOGM smooths the
# weights of another method, MGDA's (the combination of its paper).
REQUIRED_ARGS = {"cr_mogm": lambda: {"method": gradcraft_jax.mgda()}}


def gradcraft_magnitude(tau: float = 0.5) -> gradcraft_jax.Method:
  r"""GradCraft's magnitude alignment alone (its ablation): the update
  :math:`\frac1T \sum_i s_i g_i` with GradCraft's factors
  :math:`s_i = \tau \max_j \|g_j\| / \|g_i\| + 1 - \tau`, no projection."""

  def weights(gram, state, losses, *, num_tasks, **extra_args):
    s, _ = library_methods.gradcraft_coefficients(gram, tau=jnp.asarray(tau, gram.dtype), eps=0.0)
    return s / num_tasks, state

  return gradcraft_jax.from_weighting(
    gradcraft_jax.Weighting(lambda params: optax.EmptyState(), weights, name="gradcraft_magnitude")
  )


def gradcraft_direction(eps: float = 0.0) -> gradcraft_jax.Method:
  """GradCraft's direction deconfliction alone (its ablation): GradCraft
  with ``tau = 0`` (every magnitude factor 1)."""
  return gradcraft_jax.gradcraft(tau=0.0, eps=eps)


# GradCraft's parts, run by ``--ablation`` (not methods of the library).
ABLATION = {"gradcraft_magnitude": gradcraft_magnitude, "gradcraft_direction": gradcraft_direction}


def factory_of(name: str):
  """The factory of a library method or of an ablation variant."""
  return ABLATION.get(name) or getattr(gradcraft_jax, name)


class Skip(Exception):
  """A method the benchmark cannot run as is (the message says why)."""


def library_method_names() -> list[str]:
  """Every method factory of ``gradcraft_jax.methods.__all__`` but NMT."""
  found = []
  for name in library_methods.__all__:
    obj = getattr(library_methods, name, None)
    if not inspect.isfunction(obj) or name == NMT:
      continue
    ann = inspect.signature(obj).return_annotation
    ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    if ann in METHOD_TYPES or "GradientTransformation" in ann:
      found.append(name)
  rank = {n: i for i, n in enumerate(PREFERRED_ORDER)}
  known = sorted((n for n in found if n in rank), key=rank.get)
  new = sorted(n for n in found if n not in rank)
  if known and known[-1] == "gradcraft":
    return known[:-1] + new + ["gradcraft"]
  return known + new


def factory_kwargs(factory, num_tasks: int, seed: int, hparams: dict | None = None) -> dict:
  """The keyword arguments the benchmark passes to ``factory``."""
  sig = inspect.signature(factory).parameters
  kw = {}
  if "num_tasks" in sig:
    kw["num_tasks"] = num_tasks
  if "seed" in sig:
    kw["seed"] = seed
  kw.update(REQUIRED_ARGS.get(getattr(factory, "__name__", ""), dict)())
  kw.update(hparams or {})
  missing = [
    p.name
    for p in sig.values()
    if p.default is inspect.Parameter.empty
    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    and p.name not in kw
  ]
  if missing:
    raise Skip(f"skipped: needs arguments {', '.join(missing)}")
  return kw


def make_method(name: str, num_tasks: int, seed: int = 0, hparams: dict | None = None):
  """``gradcraft_jax.<name>(...)`` with the benchmark's arguments."""
  factory = factory_of(name)
  return factory(**factory_kwargs(factory, num_tasks, seed, hparams))


def make_injected(
  name: str, num_tasks: int, seed: int, hparams: dict, tuned: tuple | list = ()
) -> optax.GradientTransformation:
  """``gradcraft_jax.<name>`` with the hyperparameters named in ``tuned``
  injected (``optax.inject_hyperparams``: their values live in the state, so
  one traced update serves every value tried) and every other argument
  static. Without ``tuned``, :func:`make_method`."""
  if not tuned:
    return make_method(name, num_tasks, seed, hparams)
  factory = factory_of(name)
  static = tuple(p for p in inspect.signature(factory).parameters if p not in tuned)
  injected = optax.inject_hyperparams(factory, static_args=static)
  return injected(**factory_kwargs(factory, num_tasks, seed, hparams))


def probe(tx, params, num_tasks: int, name: str = "") -> bool:
  """Whether ``tx``'s weights read the Gram matrix. A coordinate-wise
  transform (MoCo, GradDrop, ...) has no weighting and runs as it is, as a
  method that does not read the Gram matrix; the second-batch methods read
  it."""
  del params, num_tasks
  if name in SECOND_BATCH:
    return True
  weighting = getattr(tx, "weighting", None)
  return weighting is not None and bool(weighting.needs_gram)


def wrap_shared(tx, shared_mask):
  """``tx`` on the shared leaves; task-specific leaves get their own task's gradient."""
  return gradcraft_jax.shared_only(tx, shared_mask)
