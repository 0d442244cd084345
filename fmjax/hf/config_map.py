"""fmjax model config <-> Hugging Face config.json, for the formats of fmjax/hf/tables.py.

Nothing is silently dropped. A config that one side cannot express (MTP modules, softmax
router scores, moe_layer_freq > 1, an MoE without shared experts, a rope scaling the other
side does not have, biases) stops with a one-line `FormatError` naming it.
"""

from __future__ import annotations

import math

from fmjax import config as config_lib
from fmjax.data import tokenizer as tokenizer_lib
from fmjax.hf.safetensors_files import FormatError
from fmjax.hf.tables import DEEPSEEK_V3, FORMATS, LLAMA, Format, format_for
from fmjax.nn.spec import head_dim


# The mixture of experts (model.moe field -> HF key), in DeepSeek-V3 only. HF DeepSeek-V3
# routes as fmjax does with score='sigmoid', moe_layer_freq=1 and the router bias in the
# selection (balance='aux_free', HF's "noaux_tc"); it scores a group of experts by its two
# best, as fmjax does for sigmoid scores; every layer after the first k is an MoE layer.
MOE_FIELDS = {"n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
              "experts_per_token": "num_experts_per_tok",
              "moe_intermediate_size": "moe_intermediate_size",
              "first_k_dense": "first_k_dense_replace", "n_group": "n_group",
              "topk_group": "topk_group", "norm_topk_prob": "norm_topk_prob",
              "routed_scaling_factor": "routed_scaling_factor"}
# HF config values of an MoE model (written; required when present on reading).
MOE_FIXED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
# model.moe fields fmjax must have for that routing; balance is set on import, and on export
# a bias that fmjax's selection does not use (balance != 'aux_free') is written as zeros.
MOE_ROUTING = {"score": "sigmoid", "moe_layer_freq": 1}
# model.moe fields of training and execution only.
MOE_NOT_STORED = ("balance", "aux_loss_coef", "aux_loss_scope", "router_z_loss_coef",
                  "bias_update_rate", "dispatch", "capacity_factor", "grouped_matmul")
# model.moe fields an import sets so that fmjax computes the function transformers does:
# the router bias takes part in the selection, and no token is dropped (HF DeepSeek-V3
# runs every token through its experts; capacity dispatch would drop the overflow).
MOE_IMPORTED = {"balance": "aux_free", "dispatch": "dropless"}

# Model fields that are not part of the function a checkpoint holds.
NOT_STORED = ("depth", "aspect_ratio", "attention", "init_std", "dtype", "remat",
              "scan_layers", "rope_theta", "rope_scaling",  # rope: converted on their own
              "moe", "mtp_depth", "mtp_weight")  # checked on their own


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
    if name not in {*MOE_FIELDS, *MOE_ROUTING, *MOE_NOT_STORED} and e[name] != default.get(name):
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
  c = {"architectures": [fmt.architecture], "model_type": fmt.model_type,
       **{key: m[field] for field, key in fmt.fields.items()}}
  if fmt is LLAMA:
    c["head_dim"] = head_dim(m)
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
  out.update({field: hf_cfg[key] for field, key in MOE_FIELDS.items()}, **MOE_ROUTING,
             **MOE_IMPORTED)
  out.update(norm_topk_prob=bool(out["norm_topk_prob"]),
             routed_scaling_factor=float(out["routed_scaling_factor"]))
  return out


def _format_of(hf_cfg: dict, where: str) -> Format:
  kind = hf_cfg.get("model_type")
  if kind not in FORMATS:
    raise FormatError(f"{where}: model_type={kind!r} is not supported; fmjax converts "
                      f"{' and '.join(FORMATS)} models")
  return FORMATS[kind]


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
  factor = float(hf_cfg["max_position_embeddings"] / original if factor is None else factor)
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
