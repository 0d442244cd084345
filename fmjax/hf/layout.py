"""Layout changes between fmjax parameters and HF tensors, all exact (no arithmetic on values).

  - HF linear weights are (out, in); fmjax's are (in..., out...): a reshape and
    a transpose (`Tensor.n_in` is how many leading dims are the input);
  - fmjax stacks layers along a leading axis; HF names each layer's tensor;
  - a bias over heads x head dim is one vector in HF (`Tensor.flat`);
  - DeepSeek-V3 checkpoints store the rotary dims of the query and of the
    shared rotary key interleaved (pairs 2i, 2i+1), fmjax in rotate-half
    order (i, i + R/2): `Tensor.rope` permutes those columns.
"""

from __future__ import annotations

import math

import numpy as np

from fmjax.hf.tables import Tensor, hf_names


def _rope_order(R: int) -> np.ndarray:
  """HF interleaved position j holds fmjax rotate-half dim order[j]: 0, R/2, 1, R/2+1, ..."""
  return np.stack([np.arange(R // 2), np.arange(R // 2) + R // 2], axis=-1).reshape(-1)


def _permute_rope(x: np.ndarray, R: int, to_hf: bool) -> np.ndarray:
  order = _rope_order(R) if to_hf else np.argsort(_rope_order(R))
  cols = np.concatenate([np.arange(x.shape[-1] - R), x.shape[-1] - R + order])
  return x[..., cols]


def hf_shape(t: Tensor, shape: tuple) -> tuple:
  """The HF shape of one layer's slice of shape `shape`."""
  if t.flat:
    return (math.prod(shape),)
  return (math.prod(shape[t.n_in:]), math.prod(shape[:t.n_in])) if t.n_in else tuple(shape)


def to_hf(t: Tensor, x: np.ndarray, m) -> np.ndarray:
  """One layer's slice of an fmjax parameter in HF layout (C order)."""
  if t.rope:
    x = _permute_rope(x, m.qk_rope_head_dim, to_hf=True)
  if t.n_in:
    x = x.reshape(hf_shape(t, x.shape)[::-1]).T
  return np.ascontiguousarray(x.reshape(hf_shape(t, x.shape)) if t.flat else x)


def from_hf(t: Tensor, y: np.ndarray, shape: tuple, m, interleaved: bool) -> np.ndarray:
  """The inverse of `to_hf`: an HF tensor as one layer's slice of shape `shape`."""
  x = y.T.reshape(shape) if t.n_in else y.reshape(shape)
  if t.rope and interleaved:
    x = _permute_rope(x, m.qk_rope_head_dim, to_hf=False)
  return x


def _lead(t: Tensor) -> int:
  """Leading axes of the fmjax parameter that HF spreads over names: layer, then expert."""
  return ("{i}" in t.hf) + ("{e}" in t.hf)


def _slices(t: Tensor, shape: tuple, m):
  """(HF name, index into the fmjax parameter) of each HF tensor of a row."""
  return zip(hf_names(t, m), np.ndindex(*shape[:_lead(t)]))
