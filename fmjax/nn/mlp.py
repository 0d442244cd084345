"""The dense feed-forward block: SwiGLU, or GeGLU with `model.mlp_activation="gelu_tanh"`.

A block's MLP is a module with `decls(m)` (per-layer parameters, stacked
along 'layers') and `apply(p, x_BTD, spec)`; a mixture of experts is another.
"""

from __future__ import annotations

import math

from fmjax.nn import layers
from fmjax.nn.params import Param, normal


def decls(m) -> dict:
  D, L, F = m.d_model, m.n_layers, m.d_ff
  std, out_std = m.init_std, m.init_std / math.sqrt(2 * L)
  return {
      "w_gate": Param((L, D, F), ("layers", "embed", "mlp"), normal(std)),
      "w_up": Param((L, D, F), ("layers", "embed", "mlp"), normal(std)),
      "w_down": Param((L, F, D), ("layers", "mlp", "embed"), normal(out_std)),
  }


def apply(p, x_BTD, spec):
  dt = x_BTD.dtype
  return layers.gated_mlp(x_BTD, p["w_gate"].astype(dt), p["w_up"].astype(dt),
                          p["w_down"].astype(dt), spec.model.mlp_activation)
