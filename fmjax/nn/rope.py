"""Rotary position embeddings, and their scaling for longer contexts.

Layout: 'rotate half'. Dimension i of the first half pairs with dimension
i + H/2 (HF Llama's layout). DeepSeek-V3's HF checkpoints store the rotary
dims of q and k interleaved instead (pairs 2i, 2i+1). The two layouts differ
only by a fixed permutation of a projection's output columns, so an exporter
permutes the rotary columns of `wq`/`wq_b` and of `wkv_a`; nothing else changes.

Context extension (`model.rope_scaling`), for a model trained at
`original_seq_len` that should work at `factor` times that:
  linear: every frequency divided by factor (position interpolation);
  ntk:    theta raised to theta * factor^(H/(H-2)) ("NTK-aware");
  yarn:   frequencies that turn fewer than `beta_slow` times over the
          original context are divided by factor, those that turn more than
          `beta_fast` times are kept, with a linear ramp between; and the
          softmax is sharpened by mscale^2, mscale = 0.1 * m * ln(factor) + 1
          (DeepSeek-V3's `softmax_scale * mscale * mscale`; HF's YaRN
          multiplies cos and sin by mscale, which is the same thing);
  llama3: (Llama 3.1+) frequencies whose wavelength exceeds original_seq_len /
          low_freq_factor are divided by factor, those shorter than
          original_seq_len / high_freq_factor are kept, and between them
          1/factor and 1 are blended by (original_seq_len / wavelength -
          low_freq_factor) / (high_freq_factor - low_freq_factor).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(dim: int, theta: float, scaling) -> np.ndarray:
  """The dim/2 angular frequencies (radians per position), after scaling (None: none)."""
  kind, factor = (scaling.kind, float(scaling.factor)) if scaling else ("none", 1.0)
  if kind == "ntk":
    theta = theta * factor ** (dim / (dim - 2))
  inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if kind == "linear":
    inv_freq = inv_freq / factor
  elif kind == "yarn":
    low, high = _yarn_correction_range(scaling.beta_fast, scaling.beta_slow, dim, theta,
                                       scaling.original_seq_len)
    keep = 1.0 - np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
    inv_freq = inv_freq / factor * (1.0 - keep) + inv_freq * keep
  elif kind == "llama3":
    inv_freq = _llama3(inv_freq, factor, scaling.low_freq_factor, scaling.high_freq_factor,
                       scaling.original_seq_len)
  return inv_freq.astype(np.float32)


def _llama3(inv_freq, factor, low_freq_factor, high_freq_factor, original_seq_len):
  wavelength = 2 * math.pi / inv_freq
  keep = (original_seq_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
  keep = np.clip(keep, 0.0, 1.0)  # 0 past the low-frequency wavelength, 1 before the high
  return inv_freq / factor * (1.0 - keep) + inv_freq * keep


def _yarn_correction_range(beta_fast, beta_slow, dim, theta, original_seq_len):
  """Frequency indices [low, high] between which YaRN ramps from keeping to interpolating."""

  def index_for(rotations):  # the index whose frequency turns `rotations` times
    return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = math.floor(index_for(beta_fast))
  high = math.ceil(index_for(beta_slow))
  return max(low, 0), min(high, dim - 1)


def softmax_scale_factor(scaling) -> float:
  """What YaRN multiplies the softmax scale by (1 for other kinds)."""
  if scaling.kind != "yarn" or scaling.factor <= 1 or not scaling.mscale:
    return 1.0
  mscale = 0.1 * scaling.mscale * math.log(scaling.factor) + 1.0
  return mscale * mscale


def angles(positions_BT: jax.Array, inv_freq_h: np.ndarray):
  """cos and sin of the rotary angles, each (B, T, h) in float32."""
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
  return jnp.cos(angles_BTh), jnp.sin(angles_BTh)


def apply(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
  """Rotates each head's two halves by the angles of its position."""
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)
