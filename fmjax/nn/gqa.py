"""Grouped-query attention (`model.attention = 'gqa'`).

N query heads share K key/value heads; rotary embeddings on the whole head.
Options (model section): `attention_bias` adds biases to the query, key and
value projections (Qwen2.5); `qk_norm` RMS-normalizes each query and key head
(learned scale per head dim) before the rotary embedding (Qwen3);
`sliding_window` limits each query to its last W positions (fmjax/nn/attention.py), in
every layer or, with `full_attention_every`, in all but every k-th (`local` says which);
`query_scale_dim` sets the softmax scale (Gemma); `attn_softcap` caps the scores.
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
from fmjax.nn import params as params_lib
from fmjax.nn.params import Param, normal, zeros
from fmjax.nn.sharding import constrain
from fmjax.nn.spec import head_dim

CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


def decls(m) -> dict:
  D, L, N, K, H = m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, head_dim(m)
  std, out_std = m.init_std, m.init_std / math.sqrt(2 * L)
  out = {
      "wq": Param((L, D, N, H), ("layers", "embed", "heads", "head_dim"), normal(std)),
      "wk": Param((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), normal(std)),
      "wv": Param((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), normal(std)),
      "wo": Param((L, N, H, D), ("layers", "heads", "head_dim", "embed"), normal(out_std)),
  }
  if m.attention_bias:
    out.update({
        "bq": Param((L, N, H), ("layers", "heads", "head_dim"), zeros),
        "bk": Param((L, K, H), ("layers", "kv_heads", "head_dim"), zeros),
        "bv": Param((L, K, H), ("layers", "kv_heads", "head_dim"), zeros),
    })
  if m.qk_norm:
    out.update({"q_head_norm": layers.norm_scale((L, H), ("layers", "head_dim"), m),
                "k_head_norm": layers.norm_scale((L, H), ("layers", "head_dim"), m)})
  return out


def cache_decls(m, batch: int, length: int) -> dict:
  shape = (m.n_layers, batch, length, m.n_kv_heads, head_dim(m))
  dtype = jnp.dtype(m.dtype)
  return {"k": Param(shape, CACHE_AXES, zeros, dtype), "v": Param(shape, CACHE_AXES, zeros, dtype)}


def rope_dim(m) -> int:
  return head_dim(m)


def apply(p, x_BTD, cos, sin, segment_ids_BT, spec, cache=None, start_B=None, absorbed=False,
          local=True):
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
  if m.attention_bias:
    q_BTNH = q_BTNH + p["bq"].astype(dt)
    k_BTKH = k_BTKH + p["bk"].astype(dt)
    v_BTKH = v_BTKH + p["bv"].astype(dt)
  q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"), rules)
  k_BTKH = constrain(k_BTKH, ("batch", "seq", "kv_heads", "head_dim"), rules)
  if m.qk_norm:
    q_BTNH = layers.norm(q_BTNH, p["q_head_norm"], m)
    k_BTKH = layers.norm(k_BTKH, p["k_head_norm"], m)
  q_BTNH = rope.apply(q_BTNH, cos, sin)
  k_BTKH = rope.apply(k_BTKH, cos, sin)
  # The softmax scale: 1/sqrt(head dim or model.query_scale_dim) (1/that under µP), times
  # YaRN's sharpening.
  scale = params_lib.attention_scale(m, m.query_scale_dim or q_BTNH.shape[-1]) * (
      rope.softmax_scale_factor(m.rope_scaling))
  if cache is None:
    o_BTNH = attention.attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, scale, spec, local)
  else:
    cache = {"k": layers.write_rows(cache["k"], k_BTKH, start_B),
             "v": layers.write_rows(cache["v"], v_BTKH, start_B)}
    cache = {k: constrain(c, CACHE_AXES[1:], rules) for k, c in cache.items()}
    o_BTNH = attention.attend_cached(q_BTNH, cache["k"].astype(dt), cache["v"].astype(dt),
                                     layers.positions(start_B, q_BTNH.shape[1]), scale, spec,
                                     local)
  return jnp.einsum("btnh,nhd->btd", o_BTNH, p["wo"].astype(dt)), cache
