"""The size dial and the training horizon: one number sets the model, one the run length.

Size dial (`model.depth` > 0), in the spirit of nanoGPT/nanochat's depth dial:

  n_layers   = depth
  d_model    = depth * model.aspect_ratio
  head_dim   = model.head_dim, or 64 when it is 0
  n_heads    = n_kv_heads = d_model / head_dim
  d_ff       = 8/3 * d_model rounded up to a multiple of head_dim (SwiGLU with the
               parameters of a 4 * d_model MLP)

Training horizon: `train.steps` directly, or exactly one of
  train.tokens            tokens to train on,
  train.tokens_per_param  tokens per parameter (total parameters, as Chinchilla counts),
  train.flops             a training-FLOP budget, divided by the config's own FLOPs
                          per token (fmjax.nn.cost.flops_per_token, the 6N rule plus attention),
each rounded to the nearest whole step of train.batch_size * data.seq_len tokens.

`resolve` returns a copy with the dial and the horizon written out as explicit
fields, so the saved config.json records exactly what was trained.
"""

from __future__ import annotations

import math

from fmjax import config as config_lib
from fmjax.nn import cost

HORIZONS = ("tokens", "tokens_per_param", "flops")


def apply_depth(m) -> None:
  """Writes the dial's model fields into model config `m` (in place)."""
  if m.depth < 0:
    raise config_lib.ConfigError(f"model.depth={m.depth} must be >= 0 (0 turns the size dial off)")
  if not m.depth:
    return
  hd = m.head_dim or 64
  if m.aspect_ratio <= 0 or m.aspect_ratio % hd:
    raise config_lib.ConfigError(
        f"model.aspect_ratio={m.aspect_ratio} must be a positive multiple of the head dim "
        f"{hd}, so that d_model = depth * aspect_ratio splits into whole heads")
  d = m.depth * m.aspect_ratio
  m.update(n_layers=m.depth, d_model=d, head_dim=hd, n_heads=d // hd, n_kv_heads=d // hd,
           d_ff=hd * math.ceil(8 * d / 3 / hd))


def tokens_per_step(cfg) -> int:
  return cfg.train.batch_size * cfg.data.seq_len


def apply_horizon(cfg) -> None:
  """Sets train.steps from whichever horizon field is given (in place)."""
  t = cfg.train
  given = [h for h in HORIZONS if t[h]]
  for h in HORIZONS:
    if t[h] < 0:
      raise config_lib.ConfigError(f"train.{h}={t[h]} must be >= 0 (0: not used)")
  if len(given) > 1:
    raise config_lib.ConfigError(
        f"train.{given[0]} and train.{given[1]} both set the training horizon; keep one")
  if not given:
    return
  h = given[0]
  if h == "tokens":
    tokens = t.tokens
  elif h == "tokens_per_param":
    tokens = t.tokens_per_param * cost.param_counts(cfg.model)["total"]
  else:
    tokens = t.flops / cost.flops_per_token(cfg.model, cfg.data.seq_len)
  steps = round(tokens / tokens_per_step(cfg))
  if steps < 1:
    raise config_lib.ConfigError(
        f"train.{h}={t[h]:g} is less than one step of {tokens_per_step(cfg)} tokens; "
        "raise it or shrink train.batch_size")
  t.steps = steps


def resolve(cfg):
  """A copy of `cfg` with the size dial and the horizon written out."""
  cfg = config_lib.from_json(config_lib.to_json(cfg))
  for section, names in (("model", ("depth", "aspect_ratio")), ("train", HORIZONS)):
    for name in names:  # experiment files written before these fields existed
      if name not in cfg[section]:
        raise config_lib.ConfigError(f"missing config field {section}.{name}; start the "
                                     "experiment from fmjax.config.base()")
  apply_depth(cfg.model)
  apply_horizon(cfg)
  return cfg
