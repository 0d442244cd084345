"""One Transformer layer: `x + attention(norm(x))`, then `x + mlp(norm(x))`.

With `model.post_norms` (Gemma 2/3) each block's output is normalized too before
it is added: `x + norm(attention(norm(x)))`, `x + norm(mlp(norm(x)))`.

The attention kind is `model.attention` (fmjax/nn/gqa.py or fmjax/nn/mla.py); the
feed-forward kind is 'dense' (fmjax/nn/mlp.py) or 'moe' (fmjax/nn/moe.py). A stack
of n layers of one kind declares its parameters with a leading 'layers' axis
of size n; fmjax/nn/model.py runs the stacks, fmjax/nn/mtp.py reuses the layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmjax.nn import gqa, layers, mla, mlp, moe, rope
from fmjax.nn.params import Param
from fmjax.nn.sharding import constrain

ATTENTION = {"gqa": gqa, "mla": mla}
FEED_FORWARD = {"dense": mlp, "moe": moe}


def rope_angles(positions_BT, m, local: bool = False):
  """cos, sin of the rotary embedding at these positions, for the attention kind of `m`.

  local=True: for the layers with a sliding window, which rotate with
  `model.local_rope_theta` and no rope scaling when it is set (Gemma 3).
  """
  dim = ATTENTION[m.attention].rope_dim(m)
  if local and m.local_rope_theta:
    return rope.angles(positions_BT, rope.inv_frequencies(dim, m.local_rope_theta, None))
  return rope.angles(positions_BT, rope.inv_frequencies(dim, m.rope_theta, m.rope_scaling))


def layer_rope(positions_BT, m):
  """The rotary tables a layer picks from: (cos, sin), or ((cos, sin) of the
  full-attention layers, (cos, sin) of the windowed ones) with model.local_rope_theta."""
  full = rope_angles(positions_BT, m)
  if not (m.local_rope_theta and m.sliding_window):
    return full
  return full, rope_angles(positions_BT, m, local=True)


def _pick_rope(tables, m, local):
  if not (m.local_rope_theta and m.sliding_window):
    return tables
  (cos, sin), (cos_l, sin_l) = tables
  if isinstance(local, bool):
    return (cos_l, sin_l) if local else (cos, sin)
  return jnp.where(local, cos_l, cos), jnp.where(local, sin_l, sin)


def restack(decls, n: int):
  """The same declarations with n along the leading 'layers' axis."""
  return jax.tree.map(lambda p: dataclasses.replace(p, shape=(n,) + p.shape[1:]), decls,
                      is_leaf=lambda x: isinstance(x, Param))


def decls(m, kind: str, n: int) -> dict:
  """A stack of n layers of feed-forward `kind`; initial scales follow model.n_layers."""
  D, L = m.d_model, m.n_layers
  norms = ("attn_norm", "mlp_norm") + (("attn_post_norm", "mlp_post_norm") if m.post_norms
                                       else ())
  out = {name: layers.norm_scale((L, D), ("layers", "embed"), m) for name in norms}
  return restack({**out, **ATTENTION[m.attention].decls(m), **FEED_FORWARD[kind].decls(m)}, n)


def apply(x_BTD, p, rope_tables, segment_ids_BT, spec, kind: str, cache=None, start_B=None,
          absorbed=False, local=True):
  """One layer; `p` (and `cache`) hold its slice of the stack.

  Attention is within each packed document of `segment_ids_BT`, or, with a
  cache (and no segment ids), over the cache up to each new token's position.
  `rope_tables` come from `layer_rope`. `local`: whether this layer keeps
  model.sliding_window (a bool, or a traced one inside a scan over layers that
  mix windowed and full attention); without a window it changes nothing.

  Returns (x_BTD, cache, statistics): MoE routing statistics (fmjax.nn.moe.STATS)
  for a 'moe' layer, None for a dense one.
  """
  m, rules = spec.model, spec.activations
  cos, sin = _pick_rope(rope_tables, m, local)
  with jax.named_scope("attention"):
    h_BTD = layers.norm(x_BTD, p["attn_norm"], m)
    a_BTD, cache = ATTENTION[m.attention].apply(p, h_BTD, cos, sin, segment_ids_BT, spec, cache,
                                                start_B, absorbed, local)
    if m.post_norms:
      a_BTD = layers.norm(a_BTD, p["attn_post_norm"], m)
    x_BTD = constrain(x_BTD + a_BTD, ("batch", "seq", "embed"), rules)
  with jax.named_scope("moe" if kind == "moe" else "mlp"):
    h_BTD = layers.norm(x_BTD, p["mlp_norm"], m)
    if kind == "moe":  # decoding (with a cache) never drops tokens
      y_BTD, stats = moe.apply(p, h_BTD, spec, dropless=True if cache is not None else None)
    else:
      y_BTD, stats = mlp.apply(p, h_BTD, spec), None
    if m.post_norms:
      y_BTD = layers.norm(y_BTD, p["mlp_post_norm"], m)
    x_BTD = constrain(x_BTD + y_BTD, ("batch", "seq", "embed"), rules)
  return x_BTD, cache, stats
