"""Hugging Face checkpoints: the Llama and DeepSeek-V3 formats, and their safetensors files.

A format is two tables: model config fields (fmjax name -> HF config key) and
tensors (`Tensor`: an fmjax parameter -> an HF tensor name, with how the
layout changes). Grouped-query models are `LlamaForCausalLM`; MLA models are
`DeepseekV3ForCausalLM`: all dense (`first_k_dense_replace` =
`num_hidden_layers`) or a mixture of experts after the first
`model.moe.first_k_dense` layers. fmjax's dense and MoE layer stacks
(params['layers'], params['moe_layers']) map to HF's layer numbers; the
router is `mlp.gate.weight`, its bias `mlp.gate.e_score_correction_bias`,
routed expert e `mlp.experts.{e}.*`, and the shared experts (one SwiGLU of
n_shared_experts x moe_intermediate_size in both) `mlp.shared_experts.*`.
HF DeepSeek-V3 routes with sigmoid scores, the bias in the selection only,
groups scored by their two best experts and every layer after the first k an
MoE layer: fmjax's score='sigmoid', balance='aux_free', moe_layer_freq=1.

Layout changes, all exact (no arithmetic on values):
  - HF linear weights are (out, in); fmjax's are (in..., out...): a reshape and
    a transpose (`Tensor.n_in` is how many leading dims are the input);
  - fmjax stacks layers along a leading axis; HF names each layer's tensor;
  - DeepSeek-V3 checkpoints store the rotary dims of the query and of the
    shared rotary key interleaved (pairs 2i, 2i+1), fmjax in rotate-half
    order (i, i + R/2): `Tensor.rope` permutes those columns.

Nothing is silently dropped. A config that one side cannot express (MTP
modules, softmax router scores, moe_layer_freq > 1, an MoE without shared
experts, a rope scaling the other side does not have, biases, a tensor no
table row reads) stops with a one-line `FormatError` naming it.

Files are read and written one tensor at a time (fmjax/hf/safetensors_files.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from fmjax import config as config_lib
from fmjax.data import tokenizer as tokenizer_lib
from fmjax.hf.safetensors_files import INDEX, WEIGHTS, DTYPES, FormatError, Reader, Writer, read_json


# -- the tables ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
  param: str  # dotted fmjax parameter name, e.g. "layers.wq"
  hf: str  # HF tensor name; "{i}" is the layer of a parameter stacked along "layers"
  n_in: int = 0  # a linear weight whose first n_in dims (per layer) are its input; 0: same layout
  rope: bool = False  # the last qk_rope_head_dim dims of the last axis are rotary


def _layer_tensors(stack: str, kind: str, m) -> list[Tensor]:
  """The norms and feed-forward block of the layers of one stack ('layers' or 'moe_layers')."""
  layer, s = "model.layers.{i}.", stack + "."
  out = [Tensor(s + "attn_norm", layer + "input_layernorm.weight"),
         Tensor(s + "mlp_norm", layer + "post_attention_layernorm.weight")]
  if kind == "dense":
    return out + [Tensor(s + "w_gate", layer + "mlp.gate_proj.weight", n_in=1),
                  Tensor(s + "w_up", layer + "mlp.up_proj.weight", n_in=1),
                  Tensor(s + "w_down", layer + "mlp.down_proj.weight", n_in=1)]
  mlp = layer + "mlp."  # "{e}" is the routed expert
  out += [Tensor(s + "router", mlp + "gate.weight", n_in=1),
          Tensor(s + "router_bias", mlp + "gate.e_score_correction_bias"),
          Tensor(s + "w_gate", mlp + "experts.{e}.gate_proj.weight", n_in=1),
          Tensor(s + "w_up", mlp + "experts.{e}.up_proj.weight", n_in=1),
          Tensor(s + "w_down", mlp + "experts.{e}.down_proj.weight", n_in=1)]
  if m.moe.n_shared_experts:  # n_shared experts of width F: one SwiGLU of width n_shared * F
    out += [Tensor(s + "shared_gate", mlp + "shared_experts.gate_proj.weight", n_in=1),
            Tensor(s + "shared_up", mlp + "shared_experts.up_proj.weight", n_in=1),
            Tensor(s + "shared_down", mlp + "shared_experts.down_proj.weight", n_in=1)]
  return out


def _ends(m) -> tuple[list[Tensor], list[Tensor]]:
  last = [Tensor("final_norm", "model.norm.weight")]
  if not m.tie_embeddings:
    last.append(Tensor("unembed", "lm_head.weight", n_in=1))
  return [Tensor("embed", "model.embed_tokens.weight")], last


def _llama_tensors(m) -> list[Tensor]:
  a = "model.layers.{i}.self_attn."
  first, last = _ends(m)
  return first + [Tensor("layers.wq", a + "q_proj.weight", n_in=1),
                  Tensor("layers.wk", a + "k_proj.weight", n_in=1),
                  Tensor("layers.wv", a + "v_proj.weight", n_in=1),
                  Tensor("layers.wo", a + "o_proj.weight", n_in=2)
                  ] + _layer_tensors("layers", "dense", m) + last


def _deepseek_tensors(m) -> list[Tensor]:
  from fmjax.nn import model as model_lib
  a = "model.layers.{i}.self_attn."
  first, last = _ends(m)
  out = first
  for kind in model_lib.stack_sizes(m):  # dense layers first, then the MoE layers
    s = model_lib.STACKS[kind] + "."
    if m.q_lora_rank:
      out += [Tensor(s + "wq_a", a + "q_a_proj.weight", n_in=1),
              Tensor(s + "q_norm", a + "q_a_layernorm.weight"),
              Tensor(s + "wq_b", a + "q_b_proj.weight", n_in=1, rope=True)]
    else:
      out += [Tensor(s + "wq", a + "q_proj.weight", n_in=1, rope=True)]
    out += [Tensor(s + "wkv_a", a + "kv_a_proj_with_mqa.weight", n_in=1, rope=True),
            Tensor(s + "kv_norm", a + "kv_a_layernorm.weight"),
            Tensor(s + "wkv_b", a + "kv_b_proj.weight", n_in=1),
            Tensor(s + "wo", a + "o_proj.weight", n_in=2)] + _layer_tensors(s[:-1], kind, m)
  return out + last


@dataclasses.dataclass(frozen=True)
class Format:
  model_type: str
  architecture: str
  attention: str  # the fmjax model.attention it holds
  fields: dict  # fmjax model field -> HF config key, copied as they are
  unused: tuple  # fmjax model fields this attention kind does not read
  tensors: Callable  # m -> [Tensor]
  fixed: dict  # HF config values the format writes, and requires when reading


SHARED_FIELDS = {"vocab_size": "vocab_size", "d_model": "hidden_size",
                 "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                 "d_ff": "intermediate_size", "tie_embeddings": "tie_word_embeddings",
                 "norm_eps": "rms_norm_eps"}
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim")

LLAMA = Format(
    model_type="llama", architecture="LlamaForCausalLM", attention="gqa",
    fields=dict(SHARED_FIELDS, n_kv_heads="num_key_value_heads", head_dim="head_dim"),
    unused=MLA_FIELDS, tensors=_llama_tensors,
    fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False})

DEEPSEEK_V3 = Format(
    model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM", attention="mla",
    fields=dict(SHARED_FIELDS, **{f: f for f in MLA_FIELDS}),
    unused=("n_kv_heads", "head_dim"), tensors=_deepseek_tensors,
    # HF DeepSeek-V3 normalizes the MLA latents with eps 1e-6 whatever rms_norm_eps is,
    # so a model converts exactly only with norm_eps 1e-6.
    fixed={"hidden_act": "silu", "attention_bias": False, "rms_norm_eps": 1e-6})

FORMATS = {f.model_type: f for f in (LLAMA, DEEPSEEK_V3)}
BY_ATTENTION = {f.attention: f for f in FORMATS.values()}

# The mixture of experts (model.moe field -> HF key), in DeepSeek-V3 only. HF
# DeepSeek-V3 routes as fmjax does with score='sigmoid', moe_layer_freq=1 and
# the router bias in the selection (balance='aux_free', HF's "noaux_tc"); it
# scores a group of experts by its two best, as fmjax does for sigmoid scores.
MOE_FIELDS = {"n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
              "experts_per_token": "num_experts_per_tok",
              "moe_intermediate_size": "moe_intermediate_size",
              "first_k_dense": "first_k_dense_replace", "n_group": "n_group",
              "topk_group": "topk_group", "norm_topk_prob": "norm_topk_prob",
              "routed_scaling_factor": "routed_scaling_factor"}
# HF config values of an MoE model (written; required when present on reading).
MOE_FIXED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
# model.moe fields fmjax must have for that routing; balance is set on import, and
# on export a bias that fmjax's selection does not use (balance != 'aux_free') is
# written as zeros.
MOE_ROUTING = {"score": "sigmoid", "moe_layer_freq": 1}
# model.moe fields of training and execution only (dispatch: HF DeepSeek-V3 drops
# no tokens, so its logits are those of fmjax's dropless dispatch).
MOE_NOT_STORED = ("balance", "aux_loss_coef", "aux_loss_scope", "router_z_loss_coef",
                  "bias_update_rate", "dispatch", "capacity_factor", "grouped_matmul")

# Model fields that are not part of the function a checkpoint holds.
NOT_STORED = ("depth", "aspect_ratio", "attention", "init_std", "dtype", "remat",
              "scan_layers", "rope_theta", "rope_scaling",  # rope: converted on their own
              "moe", "mtp_depth", "mtp_weight")  # checked on their own
# HF tensors that are derived, not learned: read by nobody, dropped by nobody.
DERIVED = ("rotary_emb.inv_freq",)


# -- configs ---------------------------------------------------------------------------


def format_for(m) -> Format:
  return BY_ATTENTION[m.attention]


def check_model(m) -> Format:
  """The format for model config `m`; FormatError if `m` asks for what the format cannot hold."""
  fmt = format_for(m)
  default = config_lib.base().model
  known = set(fmt.fields) | set(fmt.unused) | set(NOT_STORED)
  for name in m.keys():  # fields added later convert once a table row holds them
    if name not in known and m[name] != default.get(name):
      raise FormatError(f"model.{name}={m[name]!r} has no place in the {fmt.model_type} "
                        f"format ({fmt.architecture}); fmjax cannot convert this model yet")
  if m.mtp_depth:
    raise FormatError(f"model.mtp_depth={m.mtp_depth}: multi-token prediction (MTP) modules "
                      "are not converted; export a model without them")
  if m.moe.n_routed_experts:
    _check_moe(m, fmt)
  for field, key in fmt.fields.items():
    if key in fmt.fixed and m[field] != fmt.fixed[key]:
      raise FormatError(f"model.{field}={m[field]!r}: the {fmt.model_type} format holds only "
                        f"{fmt.fixed[key]!r} (its MLA latent norms use it whatever the config "
                        "says); set it to that")
  _rope_to_hf(m, fmt)  # raises on a kind the format does not have
  return fmt


def _check_moe(m, fmt: Format):
  e = m.moe
  if fmt is not DEEPSEEK_V3:
    raise FormatError(f"model.moe.n_routed_experts={e.n_routed_experts}: the {fmt.model_type} "
                      f"format has no mixture of experts; MoE models convert to deepseek_v3, "
                      "which needs model.attention='mla'")
  default = config_lib.base().model.moe
  for name in e.keys():  # a field added later converts once a table holds it
    if name not in MOE_FIELDS and name not in MOE_ROUTING and name not in MOE_NOT_STORED \
        and e[name] != default.get(name):
      raise FormatError(f"model.moe.{name}={e[name]!r} has no place in the deepseek_v3 format")
  for name, want in MOE_ROUTING.items():
    if e[name] != want:
      what = {"score": "routes with sigmoid scores only",
              "moe_layer_freq": "makes every layer after the first_k_dense MoE"}[name]
      raise FormatError(f"model.moe.{name}={e[name]!r}: HF DeepSeek-V3 {what}; set "
                        f"model.moe.{name}={want!r} to convert")
  if not e.n_shared_experts:
    raise FormatError("model.moe.n_shared_experts=0: HF DeepSeek-V3 MoE layers always have "
                      "shared experts; fmjax converts MoE models with at least one")
  if e.n_routed_experts // e.n_group < 2:
    raise FormatError(f"model.moe.n_group={e.n_group} with {e.n_routed_experts} experts: HF "
                      "DeepSeek-V3 scores a group by its two best experts, so a group needs "
                      "at least 2")


def to_hf_config(m, seq_len: int, dtype: str = "float32") -> dict:
  """The HF config.json of model config `m` (checked with `check_model` first)."""
  fmt = check_model(m)
  c = {"architectures": [fmt.architecture], "model_type": fmt.model_type}
  for field, key in fmt.fields.items():
    c[key] = m[field]
  if fmt is LLAMA:
    c["head_dim"] = config_lib.head_dim(m)
  else:
    c.update(q_lora_rank=m.q_lora_rank or None, num_key_value_heads=m.n_heads,
             qk_head_dim=m.qk_nope_head_dim + m.qk_rope_head_dim, head_dim=m.qk_rope_head_dim,
             rope_interleave=True, num_nextn_predict_layers=0)
    if m.moe.n_routed_experts:
      c.update({key: m.moe[field] for field, key in MOE_FIELDS.items()}, **MOE_FIXED)
    else:  # every layer dense: no experts (n_routed_experts only has to be valid)
      c.update(first_k_dense_replace=m.n_layers, n_routed_experts=1, n_shared_experts=0,
               num_experts_per_tok=1, n_group=1, topk_group=1, moe_intermediate_size=m.d_ff)
  c.update(fmt.fixed)
  rope_theta, scaling = _rope_to_hf(m, fmt)
  c.update(rope_theta=rope_theta, rope_scaling=scaling,
           max_position_embeddings=(
               int(round(scaling["original_max_position_embeddings"] * scaling["factor"]))
               if scaling and scaling["rope_type"] == "yarn" else seq_len),
           bos_token_id=tokenizer_lib.BOS_ID, eos_token_id=tokenizer_lib.EOS_ID,
           pad_token_id=tokenizer_lib.PAD_ID, initializer_range=m.init_std,
           torch_dtype=dtype, use_cache=True)
  return c


def model_fields(hf_cfg: dict, where: str = "config.json") -> dict:
  """The fmjax model fields of an HF config dict; FormatError for what fmjax cannot hold."""
  fmt = _format_of(hf_cfg, where)
  first_dense = hf_cfg.get("first_k_dense_replace") or 0
  moe = (fmt is DEEPSEEK_V3 and bool(hf_cfg.get("n_routed_experts"))
         and first_dense < hf_cfg.get("num_hidden_layers", 0))
  moe_fields = _moe_fields(hf_cfg, where) if moe else None  # its refusals name the feature
  for key, want in fmt.fixed.items():
    have = hf_cfg.get(key, want)
    if have != want:
      raise FormatError(f"{where}: {key}={have!r} is not supported; fmjax converts "
                        f"{fmt.model_type} models with {key}={want!r} only")
  if hf_cfg.get("quantization_config"):
    raise FormatError(f"{where}: quantized checkpoints (quantization_config) are not "
                      "supported; dequantize to float32 or bfloat16 first")
  out = {"attention": fmt.attention}
  for field, key in fmt.fields.items():
    if key not in hf_cfg and field not in ("head_dim", "q_lora_rank", "tie_embeddings"):
      raise FormatError(f"{where}: {key} is missing")
    out[field] = hf_cfg.get(key)
  out["tie_embeddings"] = bool(hf_cfg.get("tie_word_embeddings", False))
  if fmt is LLAMA:
    hd = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
    out["head_dim"] = 0 if hd * hf_cfg["num_attention_heads"] == hf_cfg["hidden_size"] else hd
    out["n_kv_heads"] = hf_cfg.get("num_key_value_heads") or hf_cfg["num_attention_heads"]
  else:
    out["q_lora_rank"] = hf_cfg.get("q_lora_rank") or 0
  if moe:
    out["moe"] = moe_fields
  out["norm_eps"] = float(out["norm_eps"])
  out["rope_theta"], out["rope_scaling"] = _rope_from_hf(hf_cfg, fmt, where)
  return out


def _moe_fields(hf_cfg: dict, where: str) -> dict:
  """The model.moe fields of an HF DeepSeek-V3 MoE config."""
  for key, want in MOE_FIXED.items():
    have = hf_cfg.get(key, want)
    if have != want:
      raise FormatError(f"{where}: {key}={have!r} is not supported; fmjax converts DeepSeek-V3 "
                        f"mixtures of experts with {key}={want!r} (as transformers runs them)")
  for key in MOE_FIELDS.values():
    if hf_cfg.get(key) is None:
      raise FormatError(f"{where}: {key} is missing (needed for the mixture of experts)")
  if not hf_cfg["n_shared_experts"]:
    raise FormatError(f"{where}: n_shared_experts=0 is not supported; fmjax converts "
                      "mixtures of experts with at least one shared expert")
  out = dict(config_lib.base().model.moe)
  out.update({field: hf_cfg[key] for field, key in MOE_FIELDS.items()}, **MOE_ROUTING)
  out.update(balance="aux_free",  # the router bias takes part in the selection
             norm_topk_prob=bool(out["norm_topk_prob"]),
             routed_scaling_factor=float(out["routed_scaling_factor"]))
  return out


def _format_of(hf_cfg: dict, where: str) -> Format:
  kind = hf_cfg.get("model_type")
  if kind not in FORMATS:
    raise FormatError(f"{where}: model_type={kind!r} is not supported; fmjax converts "
                      f"{' and '.join(FORMATS)} models")
  return FORMATS[kind]


# -- rotary embeddings -----------------------------------------------------------------


def _mscale(factor: float, m: float) -> float:
  """YaRN's attention temperature term (fmjax.nn.rope.softmax_scale_factor is its square)."""
  return 1.0 if factor <= 1 or not m else 0.1 * m * math.log(factor) + 1.0


def _rope_to_hf(m, fmt: Format):
  """(rope_theta, rope_scaling or None) for an HF config."""
  r = m.rope_scaling
  if r.kind == "none":
    return m.rope_theta, None
  if r.kind == "linear":
    return m.rope_theta, {"rope_type": "linear", "type": "linear", "factor": r.factor}
  if r.kind == "yarn":
    s = {"rope_type": "yarn", "type": "yarn", "factor": r.factor,
         "original_max_position_embeddings": r.original_seq_len,
         "beta_fast": r.beta_fast, "beta_slow": r.beta_slow}
    if fmt is DEEPSEEK_V3:  # softmax scale * mscale(mscale_all_dim)^2, cos and sin * 1
      s.update(mscale=r.mscale, mscale_all_dim=r.mscale, attention_factor=1.0)
    else:  # cos and sin * attention_factor: q.k * attention_factor^2 (mscale: for fmjax)
      s.update(attention_factor=_mscale(r.factor, r.mscale), mscale=r.mscale)
    return m.rope_theta, s
  raise FormatError(f"model.rope_scaling.kind={r.kind!r} has no equivalent in the "
                    f"{fmt.model_type} format (HF's 'dynamic' NTK changes with the sequence "
                    "length); use linear or yarn")


def _rope_from_hf(hf_cfg: dict, fmt: Format, where: str):
  """(rope_theta, fmjax rope_scaling dict) from an HF config, old or new style."""
  rp = dict(hf_cfg.get("rope_scaling") or {})
  rp.update(hf_cfg.get("rope_parameters") or {})
  theta = float(rp.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))
  kind = rp.get("rope_type", rp.get("type")) or "default"
  none = dict(config_lib.base().model.rope_scaling)
  if rp.get("partial_rotary_factor", 1.0) != 1.0:
    raise FormatError(f"{where}: partial_rotary_factor={rp['partial_rotary_factor']} is "
                      "not supported")
  if fmt is DEEPSEEK_V3 and kind != "yarn" and rp.get("mscale_all_dim"):
    raise FormatError(f"{where}: mscale_all_dim with rope type {kind!r} is not supported "
                      "(fmjax sharpens the softmax for yarn only)")
  if kind == "default":
    return theta, none
  factor = rp.get("factor")
  if kind == "linear" and factor:
    return theta, dict(none, kind="linear", factor=float(factor))
  if kind != "yarn":
    what = "linear rope scaling without a factor" if kind == "linear" else (
        f"rope scaling type {kind!r}")
    raise FormatError(f"{where}: {what} is not supported; fmjax has linear and yarn")
  if rp.get("truncate", True) is False:
    raise FormatError(f"{where}: yarn with truncate=false is not supported")
  original = int(rp["original_max_position_embeddings"])
  if factor is None:
    factor = hf_cfg["max_position_embeddings"] / original
  factor = float(factor)
  mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
  af = rp.get("attention_factor")
  if af is None:  # what transformers infers
    af = (_mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all
          else _mscale(factor, 1.0))
  total = af * (_mscale(factor, mscale_all) if fmt is DEEPSEEK_V3 and mscale_all else 1.0)
  # fmjax multiplies the softmax by mscale(factor, m)^2: find m
  candidates = [c for c in (mscale, mscale_all, 1.0, 0.0) if c is not None]
  m = next((float(c) for c in candidates if math.isclose(_mscale(factor, c), total,
                                                          rel_tol=1e-12)), None)
  if m is None:
    if factor <= 1:
      raise FormatError(f"{where}: yarn with factor {factor} <= 1 and attention factor "
                        f"{total} is not supported")
    m = (total - 1.0) / (0.1 * math.log(factor))
  return theta, dict(none, kind="yarn", factor=factor, original_seq_len=original,
                     beta_fast=float(rp.get("beta_fast") or 32.0),
                     beta_slow=float(rp.get("beta_slow") or 1.0), mscale=m)


# -- tensors ---------------------------------------------------------------------------


def _rope_order(R: int) -> np.ndarray:
  """HF interleaved position j holds fmjax rotate-half dim order[j]: 0, R/2, 1, R/2+1, ..."""
  return np.stack([np.arange(R // 2), np.arange(R // 2) + R // 2], axis=-1).reshape(-1)


def _permute_rope(x: np.ndarray, R: int, to_hf: bool) -> np.ndarray:
  order = _rope_order(R) if to_hf else np.argsort(_rope_order(R))
  cols = np.concatenate([np.arange(x.shape[-1] - R), x.shape[-1] - R + order])
  return x[..., cols]


def hf_shape(t: Tensor, shape: tuple) -> tuple:
  """The HF shape of one layer's slice of shape `shape`."""
  if not t.n_in:
    return tuple(shape)
  return (math.prod(shape[t.n_in:]), math.prod(shape[:t.n_in]))


def to_hf(t: Tensor, x: np.ndarray, m) -> np.ndarray:
  """One layer's slice of an fmjax parameter in HF layout (C order)."""
  if t.rope:
    x = _permute_rope(x, m.qk_rope_head_dim, to_hf=True)
  if t.n_in:
    x = x.reshape(hf_shape(t, x.shape)[::-1]).T
  return np.ascontiguousarray(x)


def from_hf(t: Tensor, y: np.ndarray, shape: tuple, m, interleaved: bool) -> np.ndarray:
  """The inverse of `to_hf`: an HF tensor as one layer's slice of shape `shape`."""
  x = y.T.reshape(shape) if t.n_in else y.reshape(shape)
  if t.rope and interleaved:
    x = _permute_rope(x, m.qk_rope_head_dim, to_hf=False)
  return x


def tensor_table(m, decls) -> list[tuple[Tensor, tuple]]:
  """[(row, fmjax shape)] covering every parameter in `decls` exactly once."""
  from fmjax.nn.params import leaves_with_names
  fmt = format_for(m)
  shapes = {name: p.shape for name, p in leaves_with_names(decls)}
  rows = fmt.tensors(m)
  missing = sorted(set(shapes) - {r.param for r in rows})
  if missing:
    raise FormatError(f"fmjax parameter {missing[0]} has no place in the {fmt.model_type} "
                      "format; fmjax cannot convert this model yet")
  return [(r, shapes[r.param]) for r in rows]


def hf_names(t: Tensor, m) -> list[str]:
  """The HF tensor names of a row, in the order of `np.ndindex(shape[:_lead(t)])`: one per
  layer of a stacked parameter (its stack's layers), and per expert within it."""
  if "{i}" not in t.hf:
    return [t.hf]
  from fmjax.nn import model as model_lib
  stack = t.param.split(".")[0]
  layers = [i for i, kind in enumerate(model_lib.layer_kinds(m))
            if model_lib.STACKS[kind] == stack]
  experts = range(m.moe.n_routed_experts) if "{e}" in t.hf else [None]
  return [t.hf.format(i=i, e=e) for i in layers for e in experts]


def _lead(t: Tensor) -> int:
  """Leading axes of the fmjax parameter that HF spreads over names: layer, then expert."""
  return ("{i}" in t.hf) + ("{e}" in t.hf)


def _slices(t: Tensor, shape: tuple, m):
  """(HF name, index into the fmjax parameter) of each HF tensor of a row."""
  return zip(hf_names(t, m), np.ndindex(*shape[:_lead(t)]))


# -- whole directories -----------------------------------------------------------------


def is_hf_dir(path: str) -> bool:
  """A directory with HF weights, or whose config.json has a model_type (fmjax's has not)."""
  path = os.path.expanduser(path)
  if any(os.path.isfile(os.path.join(path, f)) for f in (WEIGHTS, INDEX)):
    return True
  try:
    return "model_type" in read_json(os.path.join(path, "config.json"))
  except FormatError:
    return False


def read_config(directory: str) -> tuple[dict, dict]:
  """(HF config dict, fmjax model fields) of an HF directory."""
  where = os.path.join(directory, "config.json")
  hf_cfg = read_json(where)
  return hf_cfg, model_fields(hf_cfg, where)


def save(directory: str, m, seq_len: int, arrays: Iterator[tuple[str, np.ndarray]],
         max_shard_bytes: int = 2 << 30, dtype: str = "float32"):
  """Writes config.json and the weights of model `m` into `directory` (which exists).

  `arrays` yields (fmjax parameter name, its whole value) in the order of
  `tensor_table`; each is written out layer by layer before the next is drawn.
  """
  from fmjax.nn import model as model_lib
  table = tensor_table(m, model_lib.param_decls(m))
  out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
  specs = [(name, out_dtype, hf_shape(t, shape[_lead(t):]))
           for t, shape in table for name in hf_names(t, m)]
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(to_hf_config(m, seq_len, dtype), f, indent=2)
  writer = Writer(directory, specs, max_shard_bytes)
  for t, shape in table:
    name, x = next(arrays)
    assert name == t.param and x.shape == shape, (name, t.param, x.shape, shape)
    if name.endswith(".router_bias") and m.moe.balance != "aux_free":
      x = np.zeros_like(x)  # fmjax's selection does not use it; HF's always does
    for hf_name, idx in _slices(t, shape, m):
      writer.write(hf_name, to_hf(t, x[idx], m).astype(out_dtype, copy=False))
    del x  # before the next parameter is read
  writer.close()


def check(directory: str, m=None) -> tuple[dict, Reader, list]:
  """Checks an HF directory against its own config (or `m`) without reading weights.

  Returns (model fields, reader, tensor table). Raises FormatError naming the
  first problem: unreadable files, a config fmjax cannot hold, a model other
  than `m`, a missing tensor or one of another shape, a tensor no row reads.
  """
  from fmjax.nn import model as model_lib
  directory = os.path.expanduser(directory)
  reader = Reader(directory)
  _, fields = read_config(directory)
  if m is not None:
    _check_same_model(directory, fields, m)
  else:
    m = config_lib.base().model
    m.update(fields)
  table = tensor_table(m, model_lib.param_decls(m))
  wanted = set()
  for t, shape in table:
    for name in hf_names(t, m):
      wanted.add(name)
      if name not in reader.entries:
        raise FormatError(f"{directory} has no tensor {name} (for fmjax's {t.param})")
      need = hf_shape(t, shape[_lead(t):])
      code = reader.entries[name][1]
      if code not in DTYPES:
        raise FormatError(f"tensor {name} in {directory} has dtype {code}; fmjax reads "
                          f"{', '.join(DTYPES)} (dequantize first)")
      if reader.shape(name) != need:
        raise FormatError(f"tensor {name} in {directory} has shape {list(reader.shape(name))} "
                          f"but its config.json needs {list(need)}")
  if m.tie_embeddings and "lm_head.weight" in reader.entries:
    wanted.add("lm_head.weight")  # allowed if it equals the embedding (checked when read)
  extra = sorted(n for n in reader.names() - wanted if not n.endswith(DERIVED))
  if extra:
    mtp = [n for n in extra if n.startswith(f"model.layers.{m.n_layers}.")]
    what = (f"multi-token prediction (MTP) modules ({mtp[0]}, ...) are not supported"
            if mtp else f"tensor {extra[0]}{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}"
            f" has no place in fmjax's {format_for(m).model_type} model")
    raise FormatError(f"{directory}: {what}; nothing is dropped silently, so it was not "
                      "converted")
  return fields, reader, table


def _check_same_model(directory, fields, m):
  for name, value in _flat(fields):
    have = m[name] if "." not in name else m[name.split(".")[0]][name.split(".")[1]]
    if have != value:
      raise FormatError(f"model.{name}={have!r} but the checkpoint in {directory} has "
                        f"{value!r}; set the model from fmjax.hf.formats.read_config({directory!r})[1]")


def _flat(fields):
  for name, value in fields.items():
    if name == "rope_scaling":
      keys = {"none": ("kind",), "linear": ("kind", "factor")}.get(value["kind"], value.keys())
      for k in keys:
        yield f"rope_scaling.{k}", value[k]
    elif name == "moe":  # what the checkpoint's function depends on
      for k in (*MOE_FIELDS, *MOE_ROUTING, "balance"):
        yield f"moe.{k}", value[k]
    elif name != "head_dim" or fields["attention"] == "gqa":
      yield name, value


def arrays(directory: str, m=None) -> Iterator[tuple[str, np.ndarray]]:
  """(fmjax parameter name, float32 value) of an HF directory, one parameter at a time."""
  fields, reader, table = check(directory, m)
  if m is None:
    m = config_lib.base().model
    m.update(fields)
  hf_cfg = read_json(os.path.join(os.path.expanduser(directory), "config.json"))
  interleaved = hf_cfg.get("rope_interleave", True)
  for t, shape in table:
    x = np.empty(shape, np.float32)
    one = shape[_lead(t):]
    for name, idx in _slices(t, shape, m):
      y = from_hf(t, reader.get(name), one, m, interleaved)
      if not np.isfinite(y).all():
        raise FormatError(f"tensor {name} in {directory} has NaN or Inf values")
      x[idx] = y
    if t.param == "embed" and m.tie_embeddings and "lm_head.weight" in reader.entries:
      if not np.array_equal(reader.get("lm_head.weight").astype(np.float32), x):
        raise FormatError(f"{directory}: lm_head.weight differs from the embedding but "
                          "tie_word_embeddings is true; fmjax would drop it")
    yield t.param, x


def load_params(directory: str, m, abstract_params):
  """The parameters of an HF directory, sharded like `abstract_params` (for init_from)."""
  import jax
  from fmjax.nn.params import leaves_with_names
  targets = dict(zip([n for n, _ in leaves_with_names(abstract_params)],
                     jax.tree.leaves(abstract_params)))
  values = {}
  for name, x in arrays(directory, m):
    target = targets[name]
    values[name] = jax.make_array_from_callback(x.shape, target.sharding, lambda idx: x[idx])
  flat, treedef = jax.tree.flatten(abstract_params)
  return jax.tree.unflatten(treedef, [values[n] for n, _ in leaves_with_names(abstract_params)])


def write_tokenizer(directory: str, model_file: str):
  """The sentencepiece model beside the weights, as HF's Llama tokenizer reads it."""
  import shutil
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=model_file)
  shutil.copyfile(model_file, os.path.join(directory, "tokenizer.model"))
  special = {k: sp.id_to_piece(i) for k, i in (("bos_token", sp.bos_id()),
                                               ("eos_token", sp.eos_id()),
                                               ("unk_token", sp.unk_id()),
                                               ("pad_token", sp.pad_id())) if i >= 0}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(dict(special, tokenizer_class="LlamaTokenizer", add_bos_token=True,
                   add_eos_token=False, legacy=False, add_prefix_space=False,
                   model_max_length=1 << 30), f, indent=2)
