"""Transformer building blocks as pure functions.

Shape suffixes: B batch, T query positions, S key positions, D model width,
N query heads, K key/value heads, H head dim, G value head dim, F MLP width,
V vocabulary. Rotary embeddings are in `fmjax.nn.rope`, attention kernels in
`fmjax.nn.attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x32 = x_BTD.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def write_rows(cache_BS, new_BT, start_B) -> jax.Array:
  """Writes each row's T new entries into its cache row at slot start_B[b]."""
  def write_row(row_S, new_T, start):
    return jax.lax.dynamic_update_slice_in_dim(row_S, new_T.astype(row_S.dtype), start, axis=0)

  return jax.vmap(write_row)(cache_BS, new_BT, start_B)


def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD) -> jax.Array:
  gate_BTF = jnp.einsum("btd,df->btf", x_BTD, w_gate_DF)
  up_BTF = jnp.einsum("btd,df->btf", x_BTD, w_up_DF)
  return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, w_down_FD)


def positions(start_B, length: int) -> jax.Array:
  """(B, T): positions start_B[b] + [0, T) of T new tokens per row."""
  return start_B[:, None] + jnp.arange(length, dtype=start_B.dtype)
