"""Transformer building blocks as pure functions.

Shape suffixes: B batch, T query positions, S key positions, D model width,
N query heads, K key/value heads, H head dim, G value head dim, F MLP width,
V vocabulary. Rotary embeddings are in `fmjax.nn.rope`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x32 = x_BTD.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def attention_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """(B, 1, T, T): causal, and only within the same packed document.

  Padding (segment 0) attends to padding, so no row is empty.
  """
  T = segment_ids_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
  same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TT[None] & same_BTT)[:, None]


def causal_mask(q_positions_BT: jax.Array, num_keys: int) -> jax.Array:
  """(B, 1, T, S) for attending to a cache: key slot s is visible to a query at
  position t iff s <= t (slot s holds position s)."""
  slots_S = jnp.arange(num_keys, dtype=q_positions_BT.dtype)
  return (slots_S[None, None, :] <= q_positions_BT[:, :, None])[:, None]


def attention(q_BTNH, k_BSKH, v_BSKG, mask_B1TS, scale: float) -> jax.Array:
  """Grouped-query attention with softmax scale `scale`: output (B, T, N, G).

  Values may have another head dim than queries and keys (as in MLA). When
  they do not, jax.nn.dot_product_attention runs it, with fused kernels where
  the backend has them.
  """
  if v_BSKG.shape[-1] == q_BTNH.shape[-1]:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKG, mask=mask_B1TS, scale=scale)
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKnH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKnTS = jnp.einsum("btknh,bskh->bknts", q_BTKnH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  logits_BKnTS = jnp.where(mask_B1TS[:, :, None], logits_BKnTS, -1e30)
  probs_BKnTS = jax.nn.softmax(logits_BKnTS, axis=-1).astype(v_BSKG.dtype)
  out_BTKnG = jnp.einsum("bknts,bskg->btkng", probs_BKnTS, v_BSKG)
  return out_BTKnG.reshape(B, T, N, v_BSKG.shape[-1])


def write_rows(cache_BS, new_BT, start_B) -> jax.Array:
  """Writes each row's T new entries into its cache row at slot start_B[b]."""
  def write_row(row_S, new_T, start):
    return jax.lax.dynamic_update_slice_in_dim(row_S, new_T.astype(row_S.dtype), start, axis=0)

  return jax.vmap(write_row)(cache_BS, new_BT, start_B)


def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD) -> jax.Array:
  gate_BTF = jnp.einsum("btd,df->btf", x_BTD, w_gate_DF)
  up_BTF = jnp.einsum("btd,df->btf", x_BTD, w_up_DF)
  return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, w_down_FD)
