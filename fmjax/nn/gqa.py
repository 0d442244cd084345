"""Grouped-query attention (`model.attention = 'gqa'`).

N query heads share K key/value heads; rotary embeddings on the whole head.
The decoding cache holds each layer's keys and values:
2 x K x H numbers per token per layer.

Every attention kind has this module's interface (see fmjax/nn/mla.py):
  decls(m)                   per-layer parameters, stacked along 'layers'
  cache_decls(m, B, S)       per-layer decoding cache, stacked along 'layers'
  rope_dim(m)                how many dims of a head rotate
  apply(p, x_BTD, cos, sin, segment_ids_BT, spec, cache, start_B, absorbed)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fmjax.nn import attention, layers, rope
from fmjax.nn.params import Param, normal, zeros
from fmjax.nn.sharding import constrain
from fmjax.nn.spec import head_dim

CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


def decls(m) -> dict:
  D, L, N, K, H = m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, head_dim(m)
  std, out_std = m.init_std, m.init_std / math.sqrt(2 * L)
  return {
      "wq": Param((L, D, N, H), ("layers", "embed", "heads", "head_dim"), normal(std)),
      "wk": Param((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), normal(std)),
      "wv": Param((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), normal(std)),
      "wo": Param((L, N, H, D), ("layers", "heads", "head_dim", "embed"), normal(out_std)),
  }


def cache_decls(m, batch: int, length: int) -> dict:
  shape = (m.n_layers, batch, length, m.n_kv_heads, head_dim(m))
  dtype = jnp.dtype(m.dtype)
  return {"k": Param(shape, CACHE_AXES, zeros, dtype), "v": Param(shape, CACHE_AXES, zeros, dtype)}


def rope_dim(m) -> int:
  return head_dim(m)


def apply(p, x_BTD, cos, sin, segment_ids_BT, spec, cache=None, start_B=None, absorbed=False):
  """Attention output (B, T, D), and the cache with this step's keys and values.

  Without a cache, queries attend causally to the keys of their own packed
  document (`segment_ids_BT`). With one, the new keys and values are written
  at slots start_B[b] + [0, T) of each row, and each query attends to the
  slots up to its own position. GQA has no absorbed form; `absorbed` is ignored.
  """
  del absorbed
  m, rules = spec.model, spec.activations
  dt = x_BTD.dtype
  q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, p["wq"].astype(dt))
  k_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, p["wk"].astype(dt))
  v_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, p["wv"].astype(dt))
  q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"), rules)
  k_BTKH = constrain(k_BTKH, ("batch", "seq", "kv_heads", "head_dim"), rules)
  q_BTNH = rope.apply(q_BTNH, cos, sin)
  k_BTKH = rope.apply(k_BTKH, cos, sin)
  scale = q_BTNH.shape[-1]**-0.5 * rope.softmax_scale_factor(m.rope_scaling)
  if cache is None:
    o_BTNH = attention.attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale, spec)
  else:
    cache = {"k": layers.write_rows(cache["k"], k_BTKH, start_B),
             "v": layers.write_rows(cache["v"], v_BTKH, start_B)}
    cache = {k: constrain(c, CACHE_AXES[1:], rules) for k, c in cache.items()}
    o_BTNH = attention.attend_cached(q_BTNH, cache["k"].astype(dt), cache["v"].astype(dt),
                                     layers.positions(start_B, q_BTNH.shape[1]), scale, spec)
  return jnp.einsum("btnh,nhd->btd", o_BTNH, p["wo"].astype(dt)), cache
