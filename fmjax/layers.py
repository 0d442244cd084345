"""Transformer building blocks as pure functions.

Shape suffixes: B batch, T query positions, S key positions, D model width,
N query heads, K key/value heads, H head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x32 = x_BTD.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def rope_angles(positions_BT: jax.Array, head_dim: int, theta: float):
  """cos and sin of the rotary angles, each (B, T, H/2), in float32."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
  """Rotates the two halves of each head (the 'rotate half' layout)."""
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def attention_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """(B, 1, T, T): causal, and only within the same packed document.

  Padding (segment 0) attends to padding, so no row is empty.
  """
  T = segment_ids_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
  same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TT[None] & same_BTT)[:, None]


def attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS) -> jax.Array:
  """Grouped-query attention; fused kernels are used where the backend has them."""
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS)


def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD) -> jax.Array:
  gate_BTF = jnp.einsum("btd,df->btf", x_BTD, w_gate_DF)
  up_BTF = jnp.einsum("btd,df->btf", x_BTD, w_up_DF)
  return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, w_down_FD)
