"""Transformer building blocks as pure functions.

Shape suffixes: B batch, T query positions, S key positions, D model width,
N query heads, K key/value heads, H head dim, G value head dim, F MLP width,
V vocabulary. Rotary embeddings are in `fmjax.nn.rope`, attention kernels in
`fmjax.nn.attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.nn.params import Param, constant, ones


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
  """x / rms(x) * (offset + scale), in float32."""
  x32 = x_BTD.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale = scale_D.astype(jnp.float32)
  return (y * (scale + offset if offset else scale)).astype(x_BTD.dtype)


def norm(x_BTD: jax.Array, scale_D: jax.Array, m) -> jax.Array:
  """The model's RMSNorm (`model.norm_eps`, `model.norm_offset`) of x with a learned scale."""
  return rms_norm(x_BTD, scale_D, m.norm_eps, m.norm_offset)


def norm_scale(shape: tuple[int, ...], axes: tuple[str, ...], m) -> Param:
  """The declaration of a norm's learned scale: (norm_offset + w) starts at 1."""
  return Param(shape, axes, ones if not m.norm_offset else constant(1.0 - m.norm_offset))


def write_rows(cache_BS, new_BT, start_B) -> jax.Array:
  """Writes each row's T new entries into its cache row at slot start_B[b]."""
  def write_row(row_S, new_T, start):
    return jax.lax.dynamic_update_slice_in_dim(row_S, new_T.astype(row_S.dtype), start, axis=0)

  return jax.vmap(write_row)(cache_BS, new_BT, start_B)


ACTIVATIONS = {"silu": jax.nn.silu,  # SwiGLU
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}  # GeGLU (Gemma)


def gated_mlp(x_BTD, w_gate_DF, w_up_DF, w_down_FD, activation: str = "silu") -> jax.Array:
  """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu_tanh."""
  gate_BTF = jnp.einsum("btd,df->btf", x_BTD, w_gate_DF)
  up_BTF = jnp.einsum("btd,df->btf", x_BTD, w_up_DF)
  return jnp.einsum("btf,fd->btd", ACTIVATIONS[activation](gate_BTF) * up_BTF, w_down_FD)


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap): x squashed smoothly into (-cap, cap); x itself if cap is 0."""
  return cap * jnp.tanh(x / cap) if cap else x


def positions(start_B, length: int) -> jax.Array:
  """(B, T): positions start_B[b] + [0, T) of T new tokens per row."""
  return start_B[:, None] + jnp.arange(length, dtype=start_B.dtype)
