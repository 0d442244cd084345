"""What the model reads: the model section of an experiment and the activation rules.

`ModelSpec.from_config(cfg)` is built once, in setup; the model, its blocks,
attention, MoE and dispatch take it, never the whole experiment. It is frozen
and hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from fmjax.nn.sharding import parse_axes


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  model: ml_collections.FrozenConfigDict  # the `model` section: sizes, attention, MoE, ...
  activations: ml_collections.FrozenConfigDict  # logical axis -> mesh axes of activations
  expert_axes: tuple[str, ...] = ("expert",)  # mesh axes the experts are split over
  mlp_axes: tuple[str, ...] = ("tensor",)  # mesh axes the experts' width is split over

  @classmethod
  def from_config(cls, cfg) -> ModelSpec:
    """The spec of an experiment config (its `model` and `sharding` sections)."""
    params = cfg.sharding.params
    return cls(model=ml_collections.FrozenConfigDict(cfg.model),
               activations=ml_collections.FrozenConfigDict(cfg.sharding.activations),
               expert_axes=parse_axes(params.expert), mlp_axes=parse_axes(params.mlp))


def head_dim(m) -> int:
  """The query/key/value head dim of grouped-query attention (model section `m`)."""
  return m.head_dim or m.d_model // m.n_heads
