"""Model families of the differential corpus.

Each family is a small model written the way the Flax and JAX documentation
(or common recommender and multi-task practice) writes it, returning a
``(T,)`` vector of task losses. A family is a function returning a
:class:`Case` with float32 values; ``tests/corpus/check.py`` runs it in
float32 and, with every float32 leaf cast up, in float64.

The families cover every Flax NNX and Linen layer kind that holds parameters
(linear, general linear, einsum, LoRA, convolutions, transposed and local
convolutions, embeddings, every normalisation, batch normalisation in train
mode, attention, recurrent cells in ``scan``, PReLU, weight normalisation,
remat), the JAX constructs the fast routes read through (``custom_vjp``,
``custom_jvp``, ``checkpoint``, ``cond``, ``scan``, ``vmap``, nested ``jit``
with shardings and donation, ``precision``) and the modelling patterns that
stress them (quantised and masked weights, mixed precision, complex
activations and parameters, integer inputs, ragged masks, tied and shared
weights, embedding tables with duplicate and out-of-range ids, pooled
multi-valued features, per-task towers, stacked experts, inputs with a large
common offset before batch normalisation, Python float leaves, ``has_aux``
and tuple ``argnums``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

T = 3  # tasks
B = 4  # batch rows: fewer than the features, so the dense identity is the cheaper route


@dataclasses.dataclass
class Case:
  """One model: ``fun(*args)`` returns the ``(T,)`` task losses.

  Attributes:
    fun: the loss function.
    args: every positional argument (the differentiated ones and the batch).
    argnums: the differentiated argument(s), as in ``jax.jacrev``.
    has_aux: whether ``fun`` returns ``(losses, aux)``.
    eager_only: the loss reads a concrete value of its batch, so it can only
      be called outside ``jax.jit`` (as ``jax.jacrev`` can); every route is
      then run without ``jit``.
    rtol: tolerance overrides by dtype name (bfloat16 computations), else
      the corpus defaults of ``check.RTOL``.
    refusal: a pattern for the message of a clear error with which a route
      may refuse the model instead of computing it (complex parameters).
    not_dense: key paths of leaves whose gradient does not flow through a
      dense product (a weight cast to an integer or bool dtype before its
      product): ``gram_coverage`` must not report them as ``"dense"``.
  """

  fun: Callable[..., Any]
  args: tuple
  argnums: int | tuple = 0
  has_aux: bool = False
  eager_only: bool = False
  rtol: dict | None = None
  refusal: str | None = None
  not_dense: tuple = ()


# Tolerance overrides. bfloat16 computations: the routes and jax.jacrev round
# differently (another summation order), at bfloat16's precision.
_BF16_RTOL = {"float32": 3e-2, "float64": 3e-2}
# Models that compute part of their graph in float32 even with x64 enabled
# (JAX's attention softmax; NNX Embed in its float32 param_dtype): in float64
# the pullback of a weighted cotangent and the weighted sum of one-hot
# pullbacks differ at float32's precision, whatever route forms them.
_F32_INSIDE_RTOL = {"float64": 1e-4}


def _rng(seed):
  return np.random.default_rng(seed)


def _normal(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def mse_tasks(out, y):
  """``(T,)`` mean squared errors of the first ``T`` output features
  (flattened per row) against targets ``y`` of shape ``(rows, T)``."""
  out = out.reshape(out.shape[0], -1)[:, :T]
  return jnp.mean((out - y) ** 2, axis=0)


def fill(tree, seed):
  """Concrete values for a tree of ``jax.ShapeDtypeStruct`` leaves (the
  abstract initialisation of a Flax model): batch-statistic means zero and
  variances one, normalisation scales near one, matrices and kernels
  ``N(0, 1 / fan_in)`` (fan-in: every axis but the last), other leaves
  ``N(0, 0.1^2)`` (biases are non-zero, so that nothing is trivially zero).
  Drawn with NumPy: building a model compiles nothing."""
  rng = _rng(1000 + seed)

  def value(path, leaf):
    keys = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
    name = [k for k in keys if k != "value"][-1]
    shape = tuple(leaf.shape)
    if name == "var":
      x = np.ones(shape)
    elif name == "mean":
      x = np.zeros(shape)
    elif "scale" in "".join(keys):
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) >= 2:
      x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    else:
      x = 0.1 * rng.standard_normal(shape)
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, tree)


def _nnx_split(make, *filters, seed=0):
  """``nnx.split`` of the model ``make(rngs)`` builds, initialised
  abstractly (``nnx.eval_shape``) and filled by :func:`fill`."""
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, *states = nnx.split(abstract, *filters)
  return graphdef, *[fill(s, seed + i) for i, s in enumerate(states)]


def _nnx_case(make, x, y, head=mse_tasks, seed=0, **kw):
  """A Flax NNX model as ``fun(params, rest, x, y)`` after ``nnx.split``."""
  graphdef, params, rest = _nnx_split(make, nnx.Param, ..., seed=seed)

  def fun(params, rest, x, y):
    # copy=True: fresh Variables in the caller's trace, so that layers that
    # update their state (batch statistics, weight normalisation) may do so.
    return head(nnx.merge(graphdef, params, rest, copy=True)(x), y)

  return Case(fun, (params, rest, x, y), **kw)


def _linen_case(module, x, y, head=mse_tasks, seed=0, **kw):
  """A Flax Linen module as ``fun(params, x, y)`` with ``module.apply``
  (parameters from the abstract ``module.init``, filled by :func:`fill`)."""
  variables = fill(jax.eval_shape(module.init, jax.random.PRNGKey(0), x), seed)

  def fun(params, x, y):
    return head(module.apply({"params": params}, x), y)

  return Case(fun, (variables["params"], x, y), **kw)


# ------------------------------------------------------------------ Flax NNX


def nnx_mlp():
  rng = _rng(1)

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(12, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, T, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  return _nnx_case(MLP, _normal(rng, (B, 12)), _normal(rng, (B, T)))


def nnx_conv():
  rng = _rng(2)

  class CNN(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, kernel_size=(3, 3), rngs=rngs)
      self.head = nnx.Linear(4 * 5 * 5, T, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.conv(x))
      return self.head(h.reshape(h.shape[0], -1))

  return _nnx_case(CNN, _normal(rng, (B, 5, 5, 2)), _normal(rng, (B, T)))


def nnx_conv_transpose():
  rng = _rng(3)

  class Up(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.ConvTranspose(3, 2, kernel_size=(3,), strides=(2,), rngs=rngs)
      self.head = nnx.Linear(2 * 10, T, rngs=rngs)

    def __call__(self, x):
      h = jnp.tanh(self.up(x))
      return self.head(h.reshape(h.shape[0], -1))

  return _nnx_case(Up, _normal(rng, (B, 5, 3)), _normal(rng, (B, T)))


def nnx_embed_attend():
  """Token embedding and output projection tied (``Embed.attend``)."""
  rng = _rng(4)

  class LM(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 8, rngs=rngs)
      self.mix = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, ids):
      h = jnp.tanh(self.mix(self.embed(ids)))  # (B, L, 8)
      return self.embed.attend(h.mean(1))  # (B, 11)

  ids = jnp.asarray(rng.integers(0, 11, (B, 5)), jnp.int32)
  return _nnx_case(LM, ids, _normal(rng, (B, T)), rtol=_F32_INSIDE_RTOL)


def nnx_layernorm():
  rng = _rng(5)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(12, 16, rngs=rngs)
      self.ln = nnx.LayerNorm(16, rngs=rngs)
      self.l2 = nnx.Linear(16, T, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.ln(nnx.gelu(self.l1(x))))

  return _nnx_case(Net, _normal(rng, (B, 12)), _normal(rng, (B, T)))


def nnx_rmsnorm():
  rng = _rng(6)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(12, 16, rngs=rngs)
      self.norm = nnx.RMSNorm(16, rngs=rngs)
      self.l2 = nnx.Linear(16, T, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.norm(nnx.silu(self.l1(x))))

  return _nnx_case(Net, _normal(rng, (B, 12)), _normal(rng, (B, T)))


def nnx_groupnorm_instancenorm():
  rng = _rng(7)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, kernel_size=(3,), rngs=rngs)
      self.gn = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
      self.inorm = nnx.InstanceNorm(4, rngs=rngs)
      self.head = nnx.Linear(4 * 6, T, rngs=rngs)

    def __call__(self, x):
      h = self.inorm(nnx.relu(self.gn(self.conv(x))))
      return self.head(h.reshape(h.shape[0], -1))

  return _nnx_case(Net, _normal(rng, (B, 6, 2)), _normal(rng, (B, T)))


def nnx_batchnorm_train():
  """Batch normalisation in train mode: the updated batch statistics are the
  auxiliary output."""
  rng = _rng(8)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(12, 16, rngs=rngs)
      self.bn = nnx.BatchNorm(16, use_running_average=False, rngs=rngs)
      self.l2 = nnx.Linear(16, T, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.bn(self.l1(x))))

  graphdef, params, stats = _nnx_split(Net, nnx.Param, nnx.BatchStat)

  def fun(params, stats, x, y):
    model = nnx.merge(graphdef, params, stats, copy=True)
    losses = mse_tasks(model(x), y)
    return losses, nnx.state(model, nnx.BatchStat)

  x, y = _normal(rng, (B, 12)), _normal(rng, (B, T))
  return Case(fun, (params, stats, x, y), has_aux=True)


def nnx_attention_ragged():
  """Self-attention over padded sequences with a key-padding mask."""
  rng = _rng(9)
  length = 5

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, qkv_features=8, decode=False, keep_rngs=False, rngs=rngs
      )
      self.head = nnx.Linear(8, T, rngs=rngs)

    def __call__(self, inputs):
      x, lengths = inputs
      valid = jnp.arange(length)[None, :] < lengths[:, None]  # (B, L)
      mask = nnx.make_attention_mask(valid, valid)
      h = self.attn(x, mask=mask)
      pooled = jnp.sum(h * valid[..., None], 1) / lengths[:, None]
      return self.head(pooled)

  lengths = jnp.asarray([5, 2, 3, 1], jnp.int32)
  x = _normal(rng, (B, length, 8))
  return _nnx_case(Net, (x, lengths), _normal(rng, (B, T)), rtol=_F32_INSIDE_RTOL)


def nnx_lstm_scan():
  """An LSTM cell unrolled with ``nnx.scan`` (cell broadcast, time scanned)."""
  rng = _rng(10)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.cell = nnx.LSTMCell(3, 6, rngs=rngs)
      self.head = nnx.Linear(6, T, rngs=rngs)

    def __call__(self, x):  # (B, L, 3)
      zeros = jnp.zeros((x.shape[0], 6), x.dtype)
      carry = (zeros, zeros)

      @nnx.scan(in_axes=(nnx.Carry, None, 1), out_axes=(nnx.Carry, 1))
      def run(carry, cell, x_t):
        return cell(carry, x_t)

      (_, h), _ = run(carry, self.cell, x)
      return self.head(h)

  return _nnx_case(Net, _normal(rng, (B, 4, 3)), _normal(rng, (B, T)))


def nnx_gru_rnn():
  """A GRU cell in ``nnx.RNN`` (``scan`` over time), mean-pooled."""
  rng = _rng(11)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.rnn = nnx.RNN(nnx.GRUCell(3, 5, rngs=rngs), rngs=False)
      self.head = nnx.Linear(5, T, rngs=rngs)

    def __call__(self, x):
      carry = jnp.zeros((x.shape[0], 5), x.dtype)
      return self.head(self.rnn(x, initial_carry=carry).mean(1))

  return _nnx_case(Net, _normal(rng, (B, 4, 3)), _normal(rng, (B, T)))


def nnx_einsum():
  rng = _rng(12)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Einsum("bld,dhk->blhk", (8, 2, 4), (2, 4), rngs=rngs)
      self.head = nnx.Linear(8, T, rngs=rngs)

    def __call__(self, x):
      h = jnp.tanh(self.proj(x)).mean(1)  # (B, 2, 4)
      return self.head(h.reshape(h.shape[0], -1))

  return _nnx_case(Net, _normal(rng, (B, 3, 8)), _normal(rng, (B, T)))


def nnx_linear_general():
  """Multi-axis projection (``LinearGeneral``: two contracted axes in, two
  feature axes out)."""
  rng = _rng(13)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), rngs=rngs)
      self.head = nnx.Linear(10, T, rngs=rngs)

    def __call__(self, x):
      h = jnp.tanh(self.proj(x))
      return self.head(h.reshape(h.shape[0], -1))

  return _nnx_case(Net, _normal(rng, (B, 3, 4)), _normal(rng, (B, T)))


def nnx_lora():
  """A LoRA-adapted linear layer (base kernel, A and B factors)."""
  rng = _rng(14)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.LoRALinear(12, 16, lora_rank=2, rngs=rngs)
      self.head = nnx.Linear(16, T, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.tanh(self.l1(x)))

  return _nnx_case(Net, _normal(rng, (B, 12)), _normal(rng, (B, T)))


def nnx_remat():
  """A block rematerialised with ``nnx.remat``."""
  rng = _rng(15)

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(12, 12, rngs=rngs)
      self.l2 = nnx.Linear(12, 12, rngs=rngs)

    def __call__(self, x):
      return x + self.l2(nnx.gelu(self.l1(x)))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.block = Block(rngs)
      self.head = nnx.Linear(12, T, rngs=rngs)

    def __call__(self, x):
      h = nnx.remat(lambda block, x: block(x))(self.block, x)
      return self.head(h)

  return _nnx_case(Net, _normal(rng, (B, 12)), _normal(rng, (B, T)))


def nnx_prelu_weightnorm():
  """A weight-normalised linear layer (the kernel's direction; NNX keeps the
  optional scales as plain data, not parameters) and a PReLU activation."""
  rng = _rng(16)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.WeightNorm(nnx.Linear(12, 16, rngs=rngs), use_scale=False, rngs=rngs)
      self.act = nnx.PReLU(0.1)
      self.head = nnx.Linear(16, T, rngs=rngs)

    def __call__(self, x):
      return self.head(self.act(self.l1(x)))

  return _nnx_case(Net, _normal(rng, (B, 12)), _normal(rng, (B, T)))


# ----------------------------------------------------------------- Flax Linen


def linen_mlp():
  rng = _rng(21)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(16)(x))
      x = nn.relu(nn.Dense(16)(x))
      return nn.Dense(T)(x)

  return _linen_case(MLP(), _normal(rng, (B, 12)), _normal(rng, (B, T)))


def linen_conv_depthwise():
  """A depthwise (grouped) convolution, then a pointwise one."""
  rng = _rng(22)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), feature_group_count=4)(x)
      x = nn.Conv(3, (1, 1))(nn.relu(x))
      return nn.Dense(T)(x.reshape(x.shape[0], -1))

  return _linen_case(Net(), _normal(rng, (B, 4, 4, 4)), _normal(rng, (B, T)))


def linen_conv_transpose_local():
  """A transposed convolution and an unshared (local) convolution."""
  rng = _rng(23)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jnp.tanh(nn.ConvTranspose(3, (3,), strides=(2,))(x))  # (B, 8, 3)
      x = jnp.tanh(nn.ConvLocal(2, (3,), padding="VALID")(x))  # (B, 6, 2)
      return nn.Dense(T)(x.reshape(x.shape[0], -1))

  return _linen_case(Net(), _normal(rng, (B, 4, 2)), _normal(rng, (B, T)))


def linen_embed_dense():
  rng = _rng(24)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
      e = nn.Embed(13, 6)(ids)  # (B, 3, 6)
      h = nn.tanh(nn.Dense(8)(e.reshape(e.shape[0], -1)))
      return nn.Dense(T)(h)

  ids = jnp.asarray(rng.integers(0, 13, (B, 3)), jnp.int32)
  return _linen_case(Net(), ids, _normal(rng, (B, T)))


def linen_norms():
  """Layer, RMS and group normalisation in one network."""
  rng = _rng(25)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.LayerNorm()(nn.Dense(16)(x))
      x = nn.RMSNorm()(nn.gelu(nn.Dense(16)(x)))
      x = nn.GroupNorm(num_groups=4)(x)
      return nn.Dense(T)(x)

  return _linen_case(Net(), _normal(rng, (B, 12)), _normal(rng, (B, T)))


def linen_batchnorm_train():
  """Linen batch normalisation in train mode (``mutable=["batch_stats"]``):
  the new statistics are the auxiliary output."""
  rng = _rng(26)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(16)(x)
      x = nn.BatchNorm(use_running_average=False)(x)
      return nn.Dense(T)(nn.relu(x))

  x, y = _normal(rng, (B, 12)), _normal(rng, (B, T))
  variables = fill(jax.eval_shape(Net().init, jax.random.PRNGKey(0), x), 0)

  def fun(params, batch_stats, x, y):
    out, updates = Net().apply(
      {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
    )
    return mse_tasks(out, y), updates["batch_stats"]

  return Case(fun, (variables["params"], variables["batch_stats"], x, y), has_aux=True)


def linen_attention_causal():
  """Causal multi-head self-attention (a decoder block) with a residual and
  a layer norm."""
  rng = _rng(27)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
      h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x, mask=mask)
      h = nn.LayerNorm()(x + h)
      return nn.Dense(T)(h[:, -1])

  return _linen_case(Net(), _normal(rng, (B, 5, 8)), _normal(rng, (B, T)))


def linen_lstm_rnn():
  rng = _rng(28)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      zeros = jnp.zeros((x.shape[0], 6), x.dtype)
      h = nn.RNN(nn.LSTMCell(6))(x, initial_carry=(zeros, zeros))
      return nn.Dense(T)(h[:, -1])

  return _linen_case(Net(), _normal(rng, (B, 4, 3)), _normal(rng, (B, T)))


def linen_gru_scan():
  """A GRU cell lifted with ``nn.scan`` (parameters broadcast over time)."""
  rng = _rng(29)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(
        nn.GRUCell,
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=1,
        out_axes=1,
      )
      carry = jnp.zeros((x.shape[0], 5), x.dtype)
      _, ys = scan(features=5)(carry, x)
      return nn.Dense(T)(ys.mean(1))

  return _linen_case(Net(), _normal(rng, (B, 4, 3)), _normal(rng, (B, T)))


def linen_dense_general_einsum():
  """``DenseGeneral`` over two axes and a Linen ``Einsum`` layer."""
  rng = _rng(30)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, 3, 4)
      h = nn.DenseGeneral((2, 5), axis=(-2, -1))(x)  # (B, 2, 5)
      h = nn.Einsum((5, 6), "bhk,kf->bhf")(jnp.tanh(h))  # (B, 2, 6)
      return nn.Dense(T)(h.reshape(h.shape[0], -1))

  return _linen_case(Net(), _normal(rng, (B, 3, 4)), _normal(rng, (B, T)))


def linen_remat():
  """A Linen block rematerialised with ``nn.remat``."""
  rng = _rng(31)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + nn.Dense(12)(nn.gelu(nn.Dense(12)(x)))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.remat(Block)()(x)
      return nn.Dense(T)(x)

  return _linen_case(Net(), _normal(rng, (B, 12)), _normal(rng, (B, T)))


# ------------------------------------------------- JAX transformations and rules


def _mlp_params(rng, sizes, scale=0.5):
  p = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    p[f"w{i}"] = _normal(rng, (a, b), scale / np.sqrt(a) * 2)
    p[f"b{i}"] = _normal(rng, (b,), 0.1)
  return p


def jax_checkpoint_mlp():
  """``jax.checkpoint`` (remat) around a hidden layer."""
  rng = _rng(41)
  p = _mlp_params(rng, (12, 16, 16, T))

  @jax.checkpoint
  def hidden(w, b, h):
    return jnp.tanh(h @ w + b)

  def fun(p, x, y):
    h = jnp.tanh(x @ p["w0"] + p["b0"])
    h = hidden(p["w1"], p["b1"], h)
    return mse_tasks(h @ p["w2"] + p["b2"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


@jax.custom_vjp
def clip_gradient(lo, hi, x):
  """The gradient-clipping example of JAX's custom derivative tutorial: the
  identity forward, the cotangent clipped to ``[lo, hi]`` backward."""
  return x


def _clip_fwd(lo, hi, x):
  return x, (lo, hi)


def _clip_bwd(res, g):
  lo, hi = res
  return (None, None, jnp.clip(g, lo, hi))


clip_gradient.defvjp(_clip_fwd, _clip_bwd)


def custom_vjp_clip_gradient():
  """A dense layer whose weight passes through ``clip_gradient`` (a backward
  rule that is not linear in the cotangent), and an activation clipped too."""
  rng = _rng(42)
  p = _mlp_params(rng, (12, 16, T))

  def fun(p, x, y):
    w0 = clip_gradient(-0.05, 0.05, p["w0"])
    h = jnp.tanh(x @ w0 + p["b0"])
    h = clip_gradient(-0.02, 0.02, h)
    return mse_tasks(h @ p["w1"] + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


@jax.custom_vjp
def linear_layer(x, w):
  """``x @ w`` with a hand-written (linear, exact) backward rule."""
  return x @ w


def _linear_fwd(x, w):
  return x @ w, (x, w)


def _linear_bwd(res, g):
  x, w = res
  return g @ w.T, x.T @ g


linear_layer.defvjp(_linear_fwd, _linear_bwd)


def custom_vjp_linear():
  rng = _rng(43)
  p = _mlp_params(rng, (12, 16, T))

  def fun(p, x, y):
    h = jnp.tanh(linear_layer(x, p["w0"]) + p["b0"])
    return mse_tasks(linear_layer(h, p["w1"]) + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


@jax.custom_jvp
def log1pexp(x):
  """The numerically stable softplus of JAX's custom derivative tutorial."""
  return jnp.log1p(jnp.exp(x))


@log1pexp.defjvp
def _log1pexp_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return log1pexp(x), t * (1.0 - 1.0 / (1.0 + jnp.exp(x)))


def custom_jvp_log1pexp():
  rng = _rng(44)
  p = _mlp_params(rng, (12, 16, T))

  def fun(p, x, y):
    h = log1pexp(x @ p["w0"] + p["b0"])
    return mse_tasks(h @ p["w1"] + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


def lax_cond_branches():
  """``lax.cond`` on a batch flag choosing between two weights."""
  rng = _rng(45)
  p = _mlp_params(rng, (12, 16, T))
  p["w_alt"] = _normal(rng, (12, 16), 0.3)

  def fun(p, x, y, flag):
    h = jax.lax.cond(flag, lambda: x @ p["w0"], lambda: x @ p["w_alt"] * 0.5)
    h = jnp.tanh(h + p["b0"])
    return mse_tasks(h @ p["w1"] + p["b1"], y)

  args = (p, _normal(rng, (B, 12)), _normal(rng, (B, T)), jnp.asarray(True))
  return Case(fun, args)


def scan_stacked_layers():
  """Residual layers with stacked weights applied by ``lax.scan``."""
  rng = _rng(46)
  p = {
    "inp": _normal(rng, (12, 8), 0.3),
    "layers": _normal(rng, (3, 8, 8), 0.3),
    "biases": _normal(rng, (3, 8), 0.1),
    "out": _normal(rng, (8, T), 0.3),
  }

  def fun(p, x, y):
    def layer(h, wb):
      w, b = wb
      return h + jnp.tanh(h @ w + b), None

    h, _ = jax.lax.scan(layer, x @ p["inp"], (p["layers"], p["biases"]))
    return mse_tasks(h @ p["out"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


def vmap_per_example():
  """A per-example function batched with ``jax.vmap`` (weights broadcast)."""
  rng = _rng(47)
  p = _mlp_params(rng, (12, 16, T))

  def one(p, x):
    return jnp.tanh(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]

  def fun(p, x, y):
    return mse_tasks(jax.vmap(one, in_axes=(None, 0))(p, x), y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


def dot_product_attention():
  """Attention written with ``jax.nn.dot_product_attention`` and separate
  query, key, value and output projections (3-D weights)."""
  rng = _rng(48)
  p = {
    "wq": _normal(rng, (8, 2, 4), 0.3),
    "wk": _normal(rng, (8, 2, 4), 0.3),
    "wv": _normal(rng, (8, 2, 4), 0.3),
    "wo": _normal(rng, (2, 4, T), 0.3),
  }

  def fun(p, x, y, mask):
    q = jnp.einsum("bld,dhk->blhk", x, p["wq"])
    k = jnp.einsum("bld,dhk->blhk", x, p["wk"])
    v = jnp.einsum("bld,dhk->blhk", x, p["wv"])
    o = jax.nn.dot_product_attention(q, k, v, mask=mask)  # (B, L, H, K)
    out = jnp.einsum("blhk,hkf->bf", o, p["wo"])
    return mse_tasks(out, y)

  mask = jnp.asarray(rng.random((B, 1, 5, 5)) > 0.3) | jnp.eye(5, dtype=bool)
  return Case(fun, (p, _normal(rng, (B, 5, 8)), _normal(rng, (B, T)), mask), rtol=_F32_INSIDE_RTOL)


def precision_highest():
  """Products at ``precision=HIGHEST`` with a float32 accumulator."""
  rng = _rng(49)
  p = _mlp_params(rng, (12, 16, T))
  hi = jax.lax.Precision.HIGHEST

  def fun(p, x, y):
    h = jnp.tanh(jnp.dot(x, p["w0"], precision=hi) + p["b0"])
    out = jax.lax.dot_general(h, p["w1"], (((1,), (0,)), ((), ())), precision=hi)
    return mse_tasks(out + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


def inner_jit_sharded_donated():
  """A layer under its own ``jax.jit`` with shardings and a donated input."""
  rng = _rng(50)
  p = _mlp_params(rng, (12, 16, T))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def layer(h, w, b):
    return jnp.tanh(h @ w + b)

  inner = jax.jit(
    layer,
    in_shardings=(sharding, sharding, sharding),
    out_shardings=sharding,
    donate_argnums=(0,),
  )

  def fun(p, x, y):
    h = inner(x * 1.0, p["w0"], p["b0"])  # a fresh array to donate
    return mse_tasks(h @ p["w1"] + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


# ---------------------------------------------------------- quantisation, dtypes


def quant_int8_weight():
  """A weight stored in quantisation units and cast to int8 before its
  product (then back to float and rescaled). The cast to an integer has a
  zero derivative, so the true gradient of the quantised weight is zero; the
  scale and the other layers carry the gradient."""
  rng = _rng(51)
  p = _mlp_params(rng, (12, 16, T))
  p["w0"] = _normal(rng, (12, 16), 3.0)
  p["scale"] = jnp.asarray(0.1, jnp.float32)

  def fun(p, x, y):
    q = p["w0"].astype(jnp.int8)
    h = jnp.tanh(x @ q.astype(x.dtype) * p["scale"] + p["b0"])
    return mse_tasks(h @ p["w1"] + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))), not_dense=("['w0']",))


def quant_fake_round():
  """Fake quantisation as usually written: scale, round, cast to int8, cast
  back, unscale (no straight-through estimator: the weight's true gradient
  is zero)."""
  rng = _rng(59)
  p = _mlp_params(rng, (12, 16, T))
  p["scale"] = jnp.asarray(0.05, jnp.float32)

  def fun(p, x, y):
    q = jnp.round(p["w0"] / 0.05).astype(jnp.int8)
    h = jnp.tanh(x @ q.astype(x.dtype) * p["scale"] + p["b0"])
    return mse_tasks(h @ p["w1"] + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))), not_dense=("['w0']",))


def int8_dot():
  """An integer product: int8 activations times an int8-cast weight
  accumulated in int32, then rescaled by float parameters."""
  rng = _rng(52)
  p = {
    "w0": _normal(rng, (12, 16), 20.0),
    "s": _normal(rng, (16,), 0.01),
    "w1": _normal(rng, (16, T), 0.3),
  }

  def fun(p, xq, y):
    acc = jax.lax.dot_general(
      xq, p["w0"].astype(jnp.int8), (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )
    h = jnp.tanh(acc.astype(p["s"].dtype) * p["s"])
    return mse_tasks(h @ p["w1"], y)

  xq = jnp.asarray(rng.integers(-8, 8, (B, 12)), jnp.int8)
  return Case(fun, (p, xq, _normal(rng, (B, T))), not_dense=("['w0']",))


def bool_mask_weight():
  """A weight turned into a 0/1 connectivity mask by a cast to bool (its
  true gradient is zero), multiplying a second, trained weight."""
  rng = _rng(53)
  p = _mlp_params(rng, (12, 16, T))
  p["gate"] = _normal(rng, (12, 16))

  def fun(p, x, y):
    mask = p["gate"].astype(jnp.bool_).astype(x.dtype)  # nonzero -> 1
    h = jnp.tanh(x @ mask + x @ p["w0"] + p["b0"])
    return mse_tasks(h @ p["w1"] + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))), not_dense=("['gate']",))


def bf16_mixed_precision():
  """float32 parameters, bfloat16 compute (inputs and weights cast down),
  float32 losses: the usual mixed-precision policy."""
  rng = _rng(54)
  p = _mlp_params(rng, (12, 16, T))
  bf = jnp.bfloat16

  def fun(p, x, y):
    h = jnp.tanh(x.astype(bf) @ p["w0"].astype(bf) + p["b0"].astype(bf))
    out = (h @ p["w1"].astype(bf) + p["b1"].astype(bf)).astype(y.dtype)
    return mse_tasks(out, y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))), rtol=_BF16_RTOL)


def bf16_params():
  """bfloat16 parameters and compute (a Linen model with
  ``param_dtype=bfloat16``), float32 losses."""
  rng = _rng(55)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
      h = nn.tanh(nn.Dense(16, **kw)(x))
      return nn.Dense(T, **kw)(h).astype(jnp.float32)

  def head(out, y):
    return mse_tasks(out.astype(y.dtype), y)

  return _linen_case(Net(), _normal(rng, (B, 12)), _normal(rng, (B, T)), head=head, rtol=_BF16_RTOL)


def fourier_features():
  """Random Fourier features ``exp(i x B)`` (complex) times a real weight;
  the losses are squared moduli."""
  rng = _rng(56)
  p = {"w": _normal(rng, (16, T), 0.3), "b": _normal(rng, (T,), 0.1)}
  freqs = _normal(rng, (2, 16), 2.0)

  def fun(p, x, y, freqs):
    z = jnp.exp(1j * (x @ freqs))  # (B, 16) complex
    out = z @ p["w"] + p["b"]  # the real weight applied to a complex activation
    return jnp.mean(jnp.abs(out - y) ** 2, axis=0)

  return Case(fun, (p, _normal(rng, (B, 2)), _normal(rng, (B, T)), freqs))


def complex_params():
  """A complex weight (a spectral filter) with real losses. Its gradient is
  taken in the real sense (``Re``/``Im`` parts as two real parameters), so
  the Gram matrix is ``Re(G^H G)``; a route may instead refuse complex
  parameters with a clear error."""
  rng = _rng(57)
  wr, wi = _normal(rng, (8, 16), 0.3), _normal(rng, (8, 16), 0.3)
  p = {"wc": (wr + 1j * wi).astype(jnp.complex64), "head": _normal(rng, (16, T), 0.3)}

  def fun(p, x, y):
    z = x.astype(p["wc"].dtype) @ p["wc"]
    h = jnp.abs(z)  # real
    return mse_tasks(jnp.tanh(h) @ p["head"], y)

  return Case(
    fun,
    (p, _normal(rng, (B, 8)), _normal(rng, (B, T))),
    refusal=r"complex[ -](param|gradient|leaf|leaves|dtype)",
  )


def integer_inputs():
  """Integer features: ids into an embedding table, and integer counts cast
  to float into a dense layer."""
  rng = _rng(58)
  p = {
    "table": _normal(rng, (10, 6)),
    "w_counts": _normal(rng, (5, 6), 0.3),
    "w_out": _normal(rng, (6, T), 0.3),
  }

  def fun(p, ids, counts, y):
    h = jnp.tanh(p["table"][ids].sum(1) + counts.astype(p["w_counts"].dtype) @ p["w_counts"])
    return mse_tasks(h @ p["w_out"], y)

  ids = jnp.asarray(rng.integers(0, 10, (B, 3)), jnp.int32)
  counts = jnp.asarray(rng.integers(0, 4, (B, 5)), jnp.int32)
  return Case(fun, (p, ids, counts, _normal(rng, (B, T))))


# -------------------------------------------------- sharing, sparsity, multi-task


def ragged_masks():
  """Padded sequences: masked mean pooling of a per-token dense layer."""
  rng = _rng(61)
  p = _mlp_params(rng, (6, 10, T))
  lengths = jnp.asarray([3, 1, 5, 2], jnp.int32)

  def fun(p, x, y, lengths):
    valid = (jnp.arange(x.shape[1])[None, :] < lengths[:, None]).astype(x.dtype)
    h = jnp.tanh(x @ p["w0"] + p["b0"])  # (B, L, 10)
    pooled = jnp.sum(h * valid[..., None], 1) / jnp.maximum(valid.sum(1, keepdims=True), 1.0)
    return mse_tasks(pooled @ p["w1"] + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 5, 6)), _normal(rng, (B, T)), lengths))


def tied_autoencoder():
  """A tied-weight autoencoder (``W`` encodes, ``W.T`` decodes), plus a head
  on the code."""
  rng = _rng(62)
  p = {"w": _normal(rng, (12, 6), 0.3), "c": _normal(rng, (6,), 0.1), "head": _normal(rng, (6, 2))}

  def fun(p, x, y):
    code = jnp.tanh(x @ p["w"] + p["c"])
    recon = code @ p["w"].T
    pred = code @ p["head"]
    return jnp.stack(
      [jnp.mean((recon - x) ** 2), jnp.mean((pred[:, 0] - y[:, 0]) ** 2), jnp.mean(pred[:, 1] ** 2)]
    )

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


def shared_embedding_oob():
  """One embedding table shared by two id fields, with duplicate ids and ids
  out of range (clipped in one field, filled with zeros in the other)."""
  rng = _rng(63)
  p = {"table": _normal(rng, (7, 6)), "w": _normal(rng, (12, 8), 0.3), "out": _normal(rng, (8, T))}
  user = jnp.asarray([[1, 1, 9], [0, 6, 6], [3, 3, 3], [-2, 2, 12]], jnp.int32)
  item = jnp.asarray([[2, 2, 7], [1, 8, 1], [4, 4, 0], [5, -9, 5]], jnp.int32)

  def fun(p, user, item, y):
    u = p["table"].at[user].get(mode="clip").sum(1)
    i = p["table"].at[item].get(mode="fill", fill_value=0.0).sum(1)
    h = jnp.tanh(jnp.concatenate([u, i], -1) @ p["w"])
    return mse_tasks(h @ p["out"], y)

  return Case(fun, (p, user, item, _normal(rng, (B, T))))


def pooled_multivalued_embedding():
  """A multi-valued feature (a bag of ids per example, with weights) pooled
  by ``segment_sum`` over a flat id list, as in recommender input layers."""
  rng = _rng(64)
  p = {"table": _normal(rng, (9, 6)), "w": _normal(rng, (6, 8), 0.3), "out": _normal(rng, (8, T))}
  ids = jnp.asarray([0, 3, 3, 8, 1, 2, 2, 2, 5, 7], jnp.int32)
  seg = jnp.asarray([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], jnp.int32)
  wts = jnp.asarray(rng.random(10), jnp.float32)

  def fun(p, ids, seg, wts, y):
    rows = p["table"][ids] * wts[:, None]
    pooled = jax.ops.segment_sum(rows, seg, num_segments=B)
    pooled = pooled / jax.ops.segment_sum(wts, seg, num_segments=B)[:, None]
    h = jnp.tanh(pooled @ p["w"])
    return mse_tasks(h @ p["out"], y)

  return Case(fun, (p, ids, seg, wts, _normal(rng, (B, T))))


def per_task_towers():
  """A shared bottom and one tower per task (each tower's gradient is zero
  for the other tasks)."""
  rng = _rng(65)
  p = {"bottom": _mlp_params(rng, (12, 16))}
  for t in range(T):
    p[f"tower{t}"] = _mlp_params(rng, (16, 6, 1))

  def fun(p, x, y):
    h = jax.nn.relu(x @ p["bottom"]["w0"] + p["bottom"]["b0"])
    losses = []
    for t in range(T):
      q = p[f"tower{t}"]
      out = jnp.tanh(h @ q["w0"] + q["b0"]) @ q["w1"] + q["b1"]
      losses.append(jnp.mean((out[:, 0] - y[:, t]) ** 2))
    return jnp.stack(losses)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


def stacked_experts():
  """Multi-gate mixture of experts: the experts' weights stacked on a leading
  axis and applied with one einsum (a product with a batch dimension), one
  softmax gate per task."""
  rng = _rng(66)
  e = 3
  p = {
    "experts": _normal(rng, (e, 12, 8), 0.3),
    "expert_b": _normal(rng, (e, 8), 0.1),
    "gates": _normal(rng, (T, 12, e), 0.3),
    "towers": _normal(rng, (T, 8), 0.3),
  }

  def fun(p, x, y):
    xe = jnp.broadcast_to(x, (e, *x.shape))
    h = jax.nn.relu(jnp.einsum("ebc,ecf->ebf", xe, p["experts"]) + p["expert_b"][:, None])
    g = jax.nn.softmax(jnp.einsum("bc,tce->tbe", x, p["gates"]), -1)
    mixed = jnp.einsum("tbe,ebf->tbf", g, h)
    out = jnp.einsum("tbf,tf->bt", mixed, p["towers"])
    return jnp.mean((out - y) ** 2, axis=0)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


def _offset_batchnorm(offset, seed):
  """Raw features around ``offset`` into a dense layer (no bias), then batch
  normalisation: the layer's output cotangents sum to nearly zero over the
  batch, the setting in which ``<(a a^T) d_s, d_t>`` cancels."""
  rng = _rng(seed)
  p = {
    "w": _normal(rng, (16, 16), 0.25),
    "gamma": jnp.ones(16, jnp.float32),
    "beta": jnp.zeros(16, jnp.float32),
    "out": _normal(rng, (16, T), 0.3),
  }

  def fun(p, x, y):
    h = x @ p["w"]
    mu = h.mean(0)
    var = jnp.mean((h - mu) ** 2, 0)
    h = (h - mu) / jnp.sqrt(var + 1e-5) * p["gamma"] + p["beta"]
    return mse_tasks(jnp.tanh(h) @ p["out"], y)

  x = jnp.asarray(offset + rng.standard_normal((B, 16)), jnp.float32)
  return Case(fun, (p, x, _normal(rng, (B, T))))


def offset_batchnorm_1e3():
  return _offset_batchnorm(1e3, 67)


def offset_batchnorm_1e4():
  return _offset_batchnorm(1e4, 68)


# ----------------------------------------------------------- calling conventions


def python_float_leaf():
  """A Python float among the parameters (a temperature)."""
  rng = _rng(71)
  p = _mlp_params(rng, (12, 16, T))
  p["temperature"] = 0.7

  def fun(p, x, y):
    h = jnp.tanh(x @ p["w0"] + p["b0"])
    return mse_tasks((h @ p["w1"] + p["b1"]) / p["temperature"], y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


def has_aux_tuple_argnums():
  """Gradients with respect to the parameters and the input (``argnums=(0,
  1)``), with an auxiliary dictionary."""
  rng = _rng(72)
  p = _mlp_params(rng, (12, 16, T))

  def fun(p, x, y):
    h = jnp.tanh(x @ p["w0"] + p["b0"])
    out = h @ p["w1"] + p["b1"]
    losses = mse_tasks(out, y)
    return losses, {"pred": out, "total": jnp.sum(losses)}

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))), argnums=(0, 1), has_aux=True)


def concrete_batch_read():
  """A loss that reads a concrete value of its batch (Python control flow on
  the largest input magnitude): it runs only outside ``jit``, like the
  ``jax.jacrev`` reference."""
  rng = _rng(73)
  p = _mlp_params(rng, (12, 16, T))

  def fun(p, x, y):
    scale = float(jnp.max(jnp.abs(x)))
    if scale > 1.0:
      x = x / scale
    h = jnp.tanh(x @ p["w0"] + p["b0"])
    return mse_tasks(h @ p["w1"] + p["b1"], y)

  return Case(fun, (p, _normal(rng, (B, 12), 3.0), _normal(rng, (B, T))), eager_only=True)


def weight_views():
  """Weights stored in another layout than the product reads: a transposed
  weight (``h @ W.T``), a 3-D weight reshaped to 2-D, and a weight on the
  left of its product."""
  rng = _rng(74)
  p = {
    "wt": _normal(rng, (16, 12), 0.3),  # used as x @ wt.T
    "w3": _normal(rng, (16, 2, 4), 0.3),  # used reshaped to (16, 8)
    "wl": _normal(rng, (T, 8), 0.3),  # on the left: wl @ h.T
  }

  def fun(p, x, y):
    h = jnp.tanh(x @ p["wt"].T)
    h = jnp.tanh(h @ p["w3"].reshape(16, 8))
    out = (p["wl"] @ h.T).T
    return mse_tasks(out, y)

  return Case(fun, (p, _normal(rng, (B, 12)), _normal(rng, (B, T))))


FAMILIES: dict[str, Callable[[], Case]] = {
  f.__name__: f
  for f in (
    # Flax NNX
    nnx_mlp,
    nnx_conv,
    nnx_conv_transpose,
    nnx_embed_attend,
    nnx_layernorm,
    nnx_rmsnorm,
    nnx_groupnorm_instancenorm,
    nnx_batchnorm_train,
    nnx_attention_ragged,
    nnx_lstm_scan,
    nnx_gru_rnn,
    nnx_einsum,
    nnx_linear_general,
    nnx_lora,
    nnx_remat,
    nnx_prelu_weightnorm,
    # Flax Linen
    linen_mlp,
    linen_conv_depthwise,
    linen_conv_transpose_local,
    linen_embed_dense,
    linen_norms,
    linen_batchnorm_train,
    linen_attention_causal,
    linen_lstm_rnn,
    linen_gru_scan,
    linen_dense_general_einsum,
    linen_remat,
    # JAX transformations and derivative rules
    jax_checkpoint_mlp,
    custom_vjp_clip_gradient,
    custom_vjp_linear,
    custom_jvp_log1pexp,
    lax_cond_branches,
    scan_stacked_layers,
    vmap_per_example,
    dot_product_attention,
    precision_highest,
    inner_jit_sharded_donated,
    # quantisation and dtypes
    quant_int8_weight,
    quant_fake_round,
    int8_dot,
    bool_mask_weight,
    bf16_mixed_precision,
    bf16_params,
    fourier_features,
    complex_params,
    integer_inputs,
    # sharing, sparsity, multi-task structure
    ragged_masks,
    tied_autoencoder,
    shared_embedding_oob,
    pooled_multivalued_embedding,
    per_task_towers,
    stacked_experts,
    offset_batchnorm_1e3,
    offset_batchnorm_1e4,
    # calling conventions
    python_float_leaf,
    has_aux_tuple_argnums,
    concrete_batch_read,
    weight_views,
  )
}
