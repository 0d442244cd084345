"""One declaration per parameter: shape, logical axes, initializer.

A model describes its parameters as a pytree of `Param`. Everything else is
derived from that one tree: abstract shapes, shardings, the parameter count and
the initialized values, which are created already sharded inside `jax.jit`.

The parametrization (`model.parametrization`) is derived from the same tree.
"sp" (standard) keeps every declaration as written. "mup" (the maximal-update
parametrization, Tensor Programs V, for Adam) reads each parameter's role from
its logical axes (`role`) and rescales its init and learning rate by the width
multiplier m = d_model / model.mup_base_width (`parametrize`):

  role     what it is (from the axes)                         init std      Adam LR
  vector   constant init (norm scales, biases) or one dim      x 1           x 1
  input    finite fan-in, width fan-out (the embedding)        x 1           x 1
  hidden   width fan-in and fan-out (attention, MLP, experts)  x 1/sqrt(m)   x 1/m
  output   width fan-in, finite fan-out (the router)           x 1/m         x 1/m
  logits   width fan-in, 'vocab' fan-out (the unembedding)     x 1           x 1, logits x 1/m

Width axes are WIDTH_AXES; an unnamed dim counts as width when it is a whole
multiple of d_model. The rule assumes all of them grow by the same m, as the
size dial (fmjax/scaling/sizing.py) grows d_model, d_ff and the heads.

The last two are the same rule: a readout's 1/m sits in its init and learning
rate, except for the logits, where it is a forward multiplier
(`logit_multiplier`) so that a tied embedding can be both input and readout.
Attention under µP scales q.k by 1/d_head rather than 1/sqrt(d_head)
(`attention_scale`). At m = 1 (d_model = the base width) µP's init and learning
rates are SP's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fmjax.nn import sharding as sharding_lib

Init = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Param:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # one logical name per dimension
  init: Init
  dtype: Any = jnp.float32
  lr_scale: float = 1.0  # multiplies the learning rate (set by `parametrize`; the optimizer reads it)

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")


def normal(std: float) -> Init:
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def scaled(init: Init, factor: float) -> Init:
  return lambda key, shape, dtype: factor * init(key, shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class constant:  # noqa: N801  (an initializer, named like `ones` and `zeros`)
  """Every entry `value`."""
  value: float

  def __call__(self, key, shape, dtype):
    del key
    return jnp.full(shape, self.value, dtype)


def _is_param(x) -> bool:
  return isinstance(x, Param)


def leaves_with_names(decls):
  """[(dotted name, Param)] in a fixed order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(decls, is_leaf=_is_param)
  return [(jax.tree_util.keystr(path, simple=True, separator="."), p) for path, p in flat]


def abstract(decls):
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), decls, is_leaf=_is_param)


def shardings(decls, mesh, rules):
  """NamedSharding per parameter, from the parameter rules of the config."""
  names = iter(name for name, _ in leaves_with_names(decls))
  return jax.tree.map(
      lambda p: sharding_lib.named(mesh, p.axes, rules, p.shape, name=f"param {next(names)}"),
      decls, is_leaf=_is_param)


def count(decls) -> int:
  return sum(math.prod(p.shape) for _, p in leaves_with_names(decls))


def init(decls, key: jax.Array):
  """Initial values; call inside jax.jit with out_shardings to create them sharded.

  Each parameter draws from its own key, folded in by its position in the tree,
  so values do not depend on the mesh.
  """
  flat, treedef = jax.tree.flatten(decls, is_leaf=_is_param)
  values = [p.init(jax.random.fold_in(key, i), p.shape, p.dtype) for i, p in enumerate(flat)]
  return jax.tree.unflatten(treedef, values)


# ---------------------------------------------------------------------------
# Parametrization: SP or µP, from the logical axes

# Logical axes whose size grows with the model's width (the size dial scales
# d_model, d_ff and the head count together; MLA's ranks should follow d_model).
WIDTH_AXES = frozenset({"embed", "mlp", "heads", "kv_heads", "q_lora", "kv_lora"})
# Leading axes that index copies of a matrix (the layer stack, the experts).
STACK_AXES = frozenset({"layers", "expert"})
CONSTANT_INITS = (ones, zeros)


def matrix_dims(p: Param):
  """(input dims, output dims) of a weight read as a matrix; None for a vector.

  Leading 'layers' and 'expert' axes index copies. Of the rest, the first is the
  input and the others the output, except that a weight whose last axis is
  'embed' (an output projection, e.g. wo: heads, head_dim -> embed) has all
  others as input.
  """
  lead = 0
  while lead < len(p.axes) and p.axes[lead] in STACK_AXES:
    lead += 1
  dims = list(range(lead, len(p.shape)))
  if len(dims) < 2:
    return None
  split = len(dims) - 1 if p.axes[-1] == "embed" and p.axes[dims[0]] != "embed" else 1
  return dims[:split], dims[split:]


def _grows(p: Param, dims, d_model: int) -> bool:
  """Whether these dims grow with width: a width axis, or an unnamed dim that is
  a whole multiple of d_model (MTP's concatenated pair of hidden states)."""
  return any(p.axes[i] in WIDTH_AXES or
             (p.axes[i] is None and p.shape[i] >= d_model and p.shape[i] % d_model == 0)
             for i in dims)


def role(p: Param, d_model: int) -> str:
  """'vector', 'input', 'hidden', 'output' or 'logits' (see the module docstring)."""
  dims = matrix_dims(p)
  if dims is None or p.init in CONSTANT_INITS or isinstance(p.init, constant):
    return "vector"
  ins, outs = dims
  wide_in, wide_out = _grows(p, ins, d_model), _grows(p, outs, d_model)
  if not wide_in:
    return "input"
  if wide_out:
    return "hidden"
  return "logits" if any(p.axes[i] == "vocab" for i in outs) else "output"


def is_mup(m) -> bool:
  return m.get("parametrization", "sp") == "mup"


def width_multiplier(m) -> float:
  """m = d_model / mup_base_width under µP; 1 under SP."""
  return m.d_model / m.mup_base_width if is_mup(m) else 1.0


# role -> (init std factor, learning-rate factor) as functions of the width multiplier
MUP_RULES = {
    "vector": lambda w: (1.0, 1.0),
    "input": lambda w: (1.0, 1.0),
    "hidden": lambda w: (w**-0.5, 1.0 / w),
    "output": lambda w: (1.0 / w, 1.0 / w),
    "logits": lambda w: (1.0, 1.0),
}


def parametrize(decls, m):
  """The declarations under model config `m`'s parametrization: unchanged under SP;
  under µP each init and `lr_scale` rescaled by its role."""
  if not is_mup(m):
    return decls
  w = width_multiplier(m)

  def rescale(p):
    std, lr = MUP_RULES[role(p, m.d_model)](w)
    return dataclasses.replace(p, init=p.init if std == 1.0 else scaled(p.init, std),
                               lr_scale=p.lr_scale * lr)

  return jax.tree.map(rescale, decls, is_leaf=_is_param)


def logit_multiplier(m) -> float:
  """What the output logits are multiplied by: 1/m under µP, 1 under SP."""
  return 1.0 / width_multiplier(m)


def attention_scale(m, d_head: int) -> float:
  """The q.k scale: 1/d_head under µP, 1/sqrt(d_head) under SP."""
  return d_head**-1.0 if is_mup(m) else d_head**-0.5


def lr_scales(decls):
  """The learning-rate multiplier of each parameter, a tree like `decls`."""
  return jax.tree.map(lambda p: p.lr_scale, decls, is_leaf=_is_param)
