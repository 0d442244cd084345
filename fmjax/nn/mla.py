"""Multi-head latent attention, as in DeepSeek-V2/V3 (`model.attention = 'mla'`).

Keys and values come from one low-rank latent c (kv_lora_rank C) per token;
position enters through a separate rotary key k_rope (qk_rope_head_dim R)
shared by all N heads:

  queries   q = wq_b(rms_norm(wq_a x))  (or wq x when q_lora_rank = 0),
            split per head into q_nope (dn) and q_rope (R, rotated)
  latent    [c, k_rope] = wkv_a x;  c = rms_norm(c);  k_rope rotated
  keys      k = [wkv_b^k c (per head, dn), k_rope (shared)]
  values    v = wkv_b^v c (per head, dv)
  output    wo(softmax(q.k * scale) v),  scale = (dn + R)^-1/2 * yarn mscale^2

The decoding cache holds only c and k_rope: C + R numbers per token per layer.
The absorbed form never expands keys or values: wkv_b^k folds into the query
(q_nope wkv_b^k, in latent space) and wkv_b^v into the output, so attention
runs over the cached latent directly. That is what decoding uses; prefill and
training expand, which is cheaper when there are many queries.

Names map to DeepSeek-V3's (HF DeepseekV3): wq_a = q_a_proj, q_norm =
q_a_layernorm, wq_b = q_b_proj (wq = q_proj), wkv_a = kv_a_proj_with_mqa
(latent first, then the rotary key), kv_norm = kv_a_layernorm, wkv_b =
kv_b_proj (per head: nope key, then value), wo = o_proj. Weights here are
(in, out...) and the rotary dims use the rotate-half layout (see fmjax.nn.rope).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fmjax.nn import attention, layers, rope
from fmjax.nn import params as params_lib
from fmjax.nn.params import Param, normal, zeros
from fmjax.nn.sharding import constrain


def decls(m) -> dict:
  D, L, N = m.d_model, m.n_layers, m.n_heads
  Q, C, R = m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim
  dn, dv = m.qk_nope_head_dim, m.v_head_dim
  std, out_std = m.init_std, m.init_std / math.sqrt(2 * L)
  if Q:
    query = {
        "wq_a": Param((L, D, Q), ("layers", "embed", "q_lora"), normal(std)),
        "q_norm": layers.norm_scale((L, Q), ("layers", "q_lora"), m),
        "wq_b": Param((L, Q, N, dn + R), ("layers", "q_lora", "heads", "head_dim"), normal(std)),
    }
  else:
    query = {"wq": Param((L, D, N, dn + R), ("layers", "embed", "heads", "head_dim"), normal(std))}
  return dict(query, **{
      "wkv_a": Param((L, D, C + R), ("layers", "embed", "kv_lora"), normal(std)),
      "kv_norm": layers.norm_scale((L, C), ("layers", "kv_lora"), m),
      "wkv_b": Param((L, C, N, dn + dv), ("layers", "kv_lora", "heads", "head_dim"), normal(std)),
      "wo": Param((L, N, dv, D), ("layers", "heads", "head_dim", "embed"), normal(out_std)),
  })


def cache_decls(m, batch: int, length: int) -> dict:
  L, C, R, dtype = m.n_layers, m.kv_lora_rank, m.qk_rope_head_dim, jnp.dtype(m.dtype)
  return {
      "latent": Param((L, batch, length, C), ("layers", "batch", "seq", "kv_lora"), zeros, dtype),
      "k_rope": Param((L, batch, length, R), ("layers", "batch", "seq", "head_dim"), zeros, dtype),
  }


def rope_dim(m) -> int:
  return m.qk_rope_head_dim


def softmax_scale(m) -> float:
  return params_lib.attention_scale(m, m.qk_nope_head_dim + m.qk_rope_head_dim) * \
      rope.softmax_scale_factor(m.rope_scaling)


def queries(p, x_BTD, cos, sin, spec):
  """q_nope (B, T, N, dn) and the rotated q_rope (B, T, N, R)."""
  m, rules = spec.model, spec.activations
  dt = x_BTD.dtype
  if m.q_lora_rank:
    cq_BTQ = jnp.einsum("btd,dq->btq", x_BTD, p["wq_a"].astype(dt))
    cq_BTQ = layers.norm(cq_BTQ, p["q_norm"], m)
    q_BTNH = jnp.einsum("btq,qnh->btnh", cq_BTQ, p["wq_b"].astype(dt))
  else:
    q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, p["wq"].astype(dt))
  q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"), rules)
  dn = m.qk_nope_head_dim
  return q_BTNH[..., :dn], rope.apply(q_BTNH[..., dn:], cos, sin)


def latents(p, x_BTD, cos, sin, spec):
  """The normed latent c (B, T, C) and the rotated shared key k_rope (B, T, R)."""
  m, rules = spec.model, spec.activations
  kv_BTc = jnp.einsum("btd,dc->btc", x_BTD, p["wkv_a"].astype(x_BTD.dtype))
  kv_BTc = constrain(kv_BTc, ("batch", "seq", "kv_lora"), rules)
  C = m.kv_lora_rank
  c_BTC = layers.norm(kv_BTc[..., :C], p["kv_norm"], m)
  k_rope_BTR = rope.apply(kv_BTc[..., None, C:], cos, sin)[:, :, 0]
  return c_BTC, k_rope_BTR


def attend_expanded(p, q_nope_BTNd, q_rope_BTNR, c_BSC, k_rope_BSR, attend, spec):
  """Attention with keys and values expanded from the latent: (B, T, N, dv).

  `attend(q, k, v, scale)` is the attention itself (packed rows or a cache).
  """
  m, rules = spec.model, spec.activations
  dt, dn = c_BSC.dtype, m.qk_nope_head_dim
  wkv_b_CNh = p["wkv_b"].astype(dt)
  k_nope_BSNd = jnp.einsum("bsc,cnd->bsnd", c_BSC, wkv_b_CNh[..., :dn])
  v_BSNG = jnp.einsum("bsc,cng->bsng", c_BSC, wkv_b_CNh[..., dn:])
  k_nope_BSNd = constrain(k_nope_BSNd, ("batch", "seq", "heads", "head_dim"), rules)
  v_BSNG = constrain(v_BSNG, ("batch", "seq", "heads", "head_dim"), rules)
  k_rope_BSNR = jnp.broadcast_to(k_rope_BSR[:, :, None], k_nope_BSNd.shape[:3] + k_rope_BSR.shape[-1:])
  q_BTNH = jnp.concatenate([q_nope_BTNd, q_rope_BTNR], axis=-1)
  k_BSNH = jnp.concatenate([k_nope_BSNd, k_rope_BSNR], axis=-1)
  return attend(q_BTNH, k_BSNH, v_BSNG, softmax_scale(m))


def attend_absorbed(p, q_nope_BTNd, q_rope_BTNR, c_BSC, k_rope_BSR, attend, spec):
  """The same attention computed in latent space: (B, T, N, dv).

  q.k = (q_nope wkv_b^k) . c + q_rope . k_rope, and p.v = (p.c) wkv_b^v, so this
  is multi-query attention with one key [c, k_rope] and one value c per slot.
  """
  m = spec.model
  dt, dn = c_BSC.dtype, m.qk_nope_head_dim
  wkv_b_CNh = p["wkv_b"].astype(dt)
  q_lat_BTNC = jnp.einsum("btnd,cnd->btnc", q_nope_BTNd, wkv_b_CNh[..., :dn])
  q_BTNH = jnp.concatenate([q_lat_BTNC, q_rope_BTNR], axis=-1)
  k_BS1H = jnp.concatenate([c_BSC, k_rope_BSR], axis=-1)[:, :, None]
  o_lat_BTNC = attend(q_BTNH, k_BS1H, c_BSC[:, :, None], softmax_scale(m))
  return jnp.einsum("btnc,cng->btng", o_lat_BTNC, wkv_b_CNh[..., dn:])


def apply(p, x_BTD, cos, sin, segment_ids_BT, spec, cache=None, start_B=None, absorbed=False,
          local=True):
  """Attention output (B, T, D), and the cache with this step's latents.

  Without a cache, queries attend causally to the latents of their own packed
  document (`segment_ids_BT`); with one, the new latents are written at slots
  start_B[b] + [0, T) and each query attends to the slots up to its position.
  `absorbed` picks the latent-space form; both give the same numbers.
  """
  rules = spec.activations
  q_nope_BTNd, q_rope_BTNR = queries(p, x_BTD, cos, sin, spec)
  c_BSC, k_rope_BSR = latents(p, x_BTD, cos, sin, spec)
  if cache is None:
    attend = lambda q, k, v, scale: attention.attend(q, k, v, segment_ids_BT, scale, spec,
                                                                   local)
  else:
    positions_BT = layers.positions(start_B, x_BTD.shape[1])
    attend = lambda q, k, v, scale: attention.attend_cached(
        q, k, v, positions_BT, scale, spec, local)
    cache = {"latent": layers.write_rows(cache["latent"], c_BSC, start_B),
             "k_rope": layers.write_rows(cache["k_rope"], k_rope_BSR, start_B)}
    cache = {"latent": constrain(cache["latent"], ("batch", "seq", "kv_lora"), rules),
             "k_rope": constrain(cache["k_rope"], ("batch", "seq", "head_dim"), rules)}
    c_BSC, k_rope_BSR = cache["latent"].astype(x_BTD.dtype), cache["k_rope"].astype(x_BTD.dtype)
  form = attend_absorbed if absorbed else attend_expanded
  o_BTNG = form(p, q_nope_BTNd, q_rope_BTNR, c_BSC, k_rope_BSR, attend, spec)
  return jnp.einsum("btng,ngd->btd", o_BTNG, p["wo"].astype(x_BTD.dtype)), cache

