"""One Transformer layer: `x + attention(norm(x))`, then `x + mlp(norm(x))`.

The attention kind is `model.attention` (fmjax/nn/gqa.py or fmjax/nn/mla.py); the
feed-forward kind is 'dense' (fmjax/nn/mlp.py) or 'moe' (fmjax/nn/moe.py). A stack
of n layers of one kind declares its parameters with a leading 'layers' axis
of size n; fmjax/nn/model.py runs the stacks, fmjax/nn/mtp.py reuses the layer.
"""

from __future__ import annotations

import dataclasses

import jax

from fmjax.nn import gqa, layers, mla, mlp, moe, rope
from fmjax.nn.params import Param, ones
from fmjax.nn.sharding import constrain

ATTENTION = {"gqa": gqa, "mla": mla}
FEED_FORWARD = {"dense": mlp, "moe": moe}


def rope_angles(positions_BT, m):
  """cos, sin of the rotary embedding at these positions, for the attention kind of `m`."""
  dim = ATTENTION[m.attention].rope_dim(m)
  return rope.angles(positions_BT, rope.inv_frequencies(dim, m.rope_theta, m.rope_scaling))


def restack(decls, n: int):
  """The same declarations with n along the leading 'layers' axis."""
  return jax.tree.map(lambda p: dataclasses.replace(p, shape=(n,) + p.shape[1:]), decls,
                      is_leaf=lambda x: isinstance(x, Param))


def decls(m, kind: str, n: int) -> dict:
  """A stack of n layers of feed-forward `kind`; initial scales follow model.n_layers."""
  D, L = m.d_model, m.n_layers
  return restack({
      "attn_norm": Param((L, D), ("layers", "embed"), ones),
      **ATTENTION[m.attention].decls(m),
      "mlp_norm": Param((L, D), ("layers", "embed"), ones),
      **FEED_FORWARD[kind].decls(m),
  }, n)


def apply(x_BTD, p, cos, sin, segment_ids_BT, spec, kind: str, cache=None, start_B=None,
          absorbed=False):
  """One layer; `p` (and `cache`) hold its slice of the stack.

  Attention is within each packed document of `segment_ids_BT`, or, with a
  cache (and no segment ids), over the cache up to each new token's position.

  Returns (x_BTD, cache, statistics): MoE routing statistics (fmjax.nn.moe.STATS)
  for a 'moe' layer, None for a dense one.
  """
  m, rules = spec.model, spec.activations
  with jax.named_scope("attention"):
    h_BTD = layers.rms_norm(x_BTD, p["attn_norm"], m.norm_eps)
    a_BTD, cache = ATTENTION[m.attention].apply(p, h_BTD, cos, sin, segment_ids_BT, spec, cache,
                                                start_B, absorbed)
    x_BTD = constrain(x_BTD + a_BTD, ("batch", "seq", "embed"), rules)
  with jax.named_scope("moe" if kind == "moe" else "mlp"):
    h_BTD = layers.rms_norm(x_BTD, p["mlp_norm"], m.norm_eps)
    if kind == "moe":  # decoding (with a cache) never drops tokens
      y_BTD, stats = moe.apply(p, h_BTD, spec, dropless=True if cache is not None else None)
    else:
      y_BTD, stats = mlp.apply(p, h_BTD, spec), None
    x_BTD = constrain(x_BTD + y_BTD, ("batch", "seq", "embed"), rules)
  return x_BTD, cache, stats
