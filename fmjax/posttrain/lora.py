"""Low-rank adapters (LoRA) on chosen weights of any model.

`lora.targets` is a comma-separated list of regular expressions searched in
the dotted parameter names ("layers.wq", "layers.w_down", "unembed", ...);
every matching weight W gets two adapters, declared like any parameter:

  A: (in..., r)   with W's input axes, so it is sharded like W's input
  B: (r, out...)  with W's output axes, zeros at init (so LoRA starts as a no-op)

stacked along 'layers' when W is. W is read as a matrix (in x out): its first
axis after 'layers' is the input, the rest the output, except that a weight
whose last axis is 'embed' (an output projection) has all other axes as input.
The model sees W + (alpha / r) A B (`merge`): the adapters apply to any
attention or MLP kind, any objective, and training, evaluation and decoding
alike, without the model code knowing. The same `merge` exports a run as
plain weights. The base weights are frozen (fmjax.posttrain.plan): they get no
gradient and no optimizer state.

Merging costs one (in x out) matrix product per adapted weight and step,
independent of batch size, and the weight gradient of W is computed as in
full fine-tuning (then contracted into A and B); what LoRA saves here is
optimizer memory and checkpoint size, not step time.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from fmjax.nn import params as params_lib
from fmjax.nn.params import Param, normal, zeros


def patterns(text: str) -> list[str]:
  return [p.strip() for p in text.split(",") if p.strip()]


def targets(model_decls, lora_cfg) -> list[tuple[str, Param]]:
  """[(dotted name, Param)] of the weights the config adapts (matrices only)."""
  pats = [re.compile(p) for p in patterns(lora_cfg.targets)]
  return [(name, p) for name, p in params_lib.leaves_with_names(model_decls)
          if _matrix_axes(p) is not None and any(r.search(name) for r in pats)]


def _matrix_axes(p: Param):
  """(stacked?, input dims, output dims) of a weight read as a matrix; None if it is not one."""
  stacked = bool(p.axes) and p.axes[0] == "layers"
  dims = list(range(1 if stacked else 0, len(p.shape)))
  if len(dims) < 2:
    return None
  split = len(dims) - 1 if p.axes[-1] == "embed" and p.axes[dims[0]] != "embed" else 1
  return stacked, dims[:split], dims[split:]


def decls(model_decls, lora_cfg) -> dict:
  """Adapter declarations, nested like the weights they adapt: {"layers": {"wq": {"a", "b"}}}."""
  out: dict = {}
  r = lora_cfg.rank
  for name, p in targets(model_decls, lora_cfg):
    stacked, ins, outs = _matrix_axes(p)
    lead = (p.shape[0],) if stacked else ()
    lead_axes = ("layers",) if stacked else ()
    fan_in = math.prod(p.shape[i] for i in ins)
    node = out
    for key in name.split(".")[:-1]:
      node = node.setdefault(key, {})
    node[name.split(".")[-1]] = {
        "a": Param(lead + tuple(p.shape[i] for i in ins) + (r,),
                   lead_axes + tuple(p.axes[i] for i in ins) + (None,),
                   normal(1.0 / math.sqrt(fan_in))),
        "b": Param(lead + (r,) + tuple(p.shape[i] for i in outs),
                   lead_axes + (None,) + tuple(p.axes[i] for i in outs), zeros),
    }
  return out


def merge(params: dict, lora_cfg) -> dict:
  """The parameters the model reads: each adapted W replaced by W + (alpha / r) A B.

  `params` without a "lora" entry come back unchanged.
  """
  if "lora" not in params:
    return params
  scale = lora_cfg.alpha / lora_cfg.rank
  adapters = params["lora"]

  def merged(w, ab):
    a, b = ab["a"], ab["b"]
    lead = a.ndim + b.ndim - 2 - w.ndim  # 1 when stacked along 'layers'
    a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))  # (in, r)
    b2 = b.reshape(b.shape[:lead + 1] + (-1,))  # (r, out)
    delta = jnp.einsum("...ir,...ro->...io", a2, b2).reshape(w.shape)
    return w + (scale * delta).astype(w.dtype)

  def walk(node, ad):
    if isinstance(ad, dict) and set(ad) == {"a", "b"} and not isinstance(node, dict):
      return merged(node, ad)
    return {k: walk(v, ad[k]) if k in ad else v for k, v in node.items()}

  return walk({k: v for k, v in params.items() if k != "lora"}, adapters)

