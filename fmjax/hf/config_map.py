"""fmjax model config <-> Hugging Face config.json, for the formats of fmjax/hf/tables.py.

Nothing is silently dropped. A config that one side cannot express (MTP modules, a routing
the other side does not have, a rope scaling the other side does not have, a config key
fmjax does not know) stops with a one-line `FormatError` naming it.
"""

from __future__ import annotations

import math

from fmjax import config as config_lib
from fmjax.data import tokenizer as tokenizer_lib
from fmjax.hf.safetensors_files import FormatError
from fmjax.hf.tables import DEEPSEEK_V3, FORMATS, GEMMA3, MIXTRAL, QWEN3_MOE, Format, format_for
from fmjax.nn import model as model_lib
from fmjax.nn.spec import head_dim


# The mixture of experts (model.moe field -> HF key) of DeepSeek-V3. HF DeepSeek-V3
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

# Qwen3-MoE and Mixtral: softmax over every expert, the top k, no shared expert, no bias.
# model.moe field -> HF key; Mixtral always renormalises the top k, and its experts' width
# is intermediate_size. Qwen3-MoE's first dense layers are its `mlp_only_layers`.
SOFTMAX_MOE_FIELDS = {
    "qwen3_moe": {"n_routed_experts": "num_experts", "experts_per_token": "num_experts_per_tok",
                  "moe_intermediate_size": "moe_intermediate_size",
                  "norm_topk_prob": "norm_topk_prob"},
    "mixtral": {"n_routed_experts": "num_local_experts",
                "experts_per_token": "num_experts_per_tok",
                "moe_intermediate_size": "intermediate_size"},
}
SOFTMAX_ROUTING = {"score": "softmax", "n_shared_experts": 0, "n_group": 1, "topk_group": 1,
                   "routed_scaling_factor": 1.0, "moe_layer_freq": 1}
MIXTRAL_ROUTING = {"norm_topk_prob": True, "first_k_dense": 0}
# The model.moe fields the function of a checkpoint depends on (balance too if 'aux_free').
MOE_FUNCTION = (*MOE_FIELDS, *MOE_ROUTING, "dispatch")

# Model fields that are not part of the function a checkpoint holds.
NOT_STORED = ("depth", "aspect_ratio", "attention", "init_std", "dtype", "remat",
              "scan_layers", "rope_theta", "rope_scaling",  # rope: converted on their own
              "moe", "mtp_depth", "mtp_weight", "attention_impl")  # checked on their own

# Fields that are 0 in fmjax where HF writes null (no window, no soft cap).
ZERO_IS_NONE = {"sliding_window": int, "logit_softcap": float, "attn_softcap": float}


def _handled(fmt: Format) -> tuple:
  """fmjax model fields a format holds that config_map converts itself (not in `fields`)."""
  return (("full_attention_every",) if fmt.local_global else ()) + (
      ("local_rope_theta",) if fmt is GEMMA3 else ())


# HF config keys every format may carry that do not change the function: metadata, the
# token ids, sizes of generation, training switches that are off. Anything else a format
# does not read is refused, naming it.
METADATA_KEYS = ("architectures", "model_type", "transformers_version", "dtype",
                 "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id",
                 "initializer_range", "use_cache", "max_position_embeddings", "rope_theta",
                 "rope_scaling", "rope_parameters", "tie_word_embeddings", "head_dim",
                 "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
                 "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
                 "is_encoder_decoder", "tokenizer_class", "quantization_config", "auto_map",
                 "output_router_logits", "torchscript", "attention_dropout")
DEEPSEEK_KEYS = (*MOE_FIELDS.values(), *MOE_FIXED, "num_nextn_predict_layers", "qk_head_dim",
                 "rope_interleave", "num_key_value_heads", "ep_size", "aux_loss_alpha",
                 "seq_aux", "pretraining_tp", "n_routed_experts")
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                      "mscale", "mscale_all_dim", "attention_factor", "truncate"),
             "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                        "high_freq_factor")}


def check_model(m) -> Format:
  """The format for model config `m`; FormatError if `m` asks for what the format cannot hold."""
  fmt = format_for(m)
  default = config_lib.base().model
  known = set(fmt.fields) | set(fmt.unused) | set(NOT_STORED) | set(fmt.model) | set(
      _handled(fmt))
  for name in m.keys():  # fields added later convert once a table row holds them
    if name not in known and m[name] != default.get(name):
      raise FormatError(f"model.{name}={m[name]!r} has no place in the {fmt.model_type} "
                        f"format ({fmt.architecture}); fmjax cannot convert this model yet")
  for name, want in fmt.model.items():
    if m[name] != want:
      have = [f.model_type for f in FORMATS.values() if f.model.get(name, m[name]) == m[name]
              and f.attention == m.attention]
      raise FormatError(f"model.{name}={m[name]!r} has no place in the {fmt.model_type} "
                        f"format ({fmt.architecture}), the closest to this model; "
                        f"{_and(have) or 'no format'} hold it, with other settings")
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


def _and(names: list) -> str:
  return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]])) if names else ""


def _check_moe(m, fmt: Format):
  e = m.moe
  if fmt.moe is None:
    raise FormatError(f"model.moe.n_routed_experts={e.n_routed_experts}: the {fmt.model_type} "
                      f"format has no mixture of experts")
  if fmt is not DEEPSEEK_V3:
    _check_softmax_moe(m, fmt)
    return
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


def _check_softmax_moe(m, fmt: Format):
  e, name = m.moe, fmt.model_type
  routing = dict(SOFTMAX_ROUTING, **(MIXTRAL_ROUTING if fmt is MIXTRAL else {}))
  stored = {*SOFTMAX_MOE_FIELDS[name], *routing, *MOE_NOT_STORED, "first_k_dense"}
  default = config_lib.base().model.moe
  for field in e.keys():
    if field not in stored and e[field] != default.get(field):
      raise FormatError(f"model.moe.{field}={e[field]!r} has no place in the {name} format")
  for field, want in routing.items():
    if e[field] != want:
      raise FormatError(f"model.moe.{field}={e[field]!r}: the {name} format ({fmt.architecture}) "
                        f"routes with {field}={want!r} only (softmax over every expert, top "
                        "k, no shared or grouped experts); set it to convert")
  if e.balance == "aux_free":
    raise FormatError(f"model.moe.balance='aux_free': {name} routers have no selection bias "
                      "to hold fmjax's; use balance='aux' or 'none' to convert")


def to_hf_config(m, seq_len: int, dtype: str = "float32") -> dict:
  """The HF config.json of model config `m` (checked with `check_model` first)."""
  fmt = check_model(m)
  c = {"architectures": [fmt.architecture], "model_type": fmt.model_type,
       **{key: m[field] for field, key in fmt.fields.items()}}
  if fmt.attention == "gqa":
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
  for field in ZERO_IS_NONE:
    if field in fmt.fields:
      c[fmt.fields[field]] = m[field] or None
  if "query_scale_dim" in fmt.fields:  # fmjax's 0 is the head dim
    c["query_pre_attn_scalar"] = m.query_scale_dim or head_dim(m)
  if fmt.local_global:
    c["layer_types"] = ["sliding_attention" if local else "full_attention"
                        for local in model_lib.local_layers(m)]
  elif "layer_types" in fmt.keys:
    c.update(sliding_window=None, max_window_layers=m.n_layers,
             layer_types=["full_attention"] * m.n_layers)
  if fmt.moe in SOFTMAX_MOE_FIELDS:
    e = m.moe
    c.update({key: e[field] for field, key in SOFTMAX_MOE_FIELDS[fmt.moe].items()},
             router_aux_loss_coef=e.aux_loss_coef if e.balance == "aux" else 0.0)
    if fmt is QWEN3_MOE:
      c["mlp_only_layers"] = list(range(e.first_k_dense))
  c.update(fmt.fixed, attention_dropout=0.0)
  rope_theta, scaling = _rope_to_hf(m, fmt)
  if fmt is GEMMA3:  # the windowed layers' rotary theta
    c["rope_local_base_freq"] = m.local_rope_theta or m.rope_theta
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
  if fmt.moe in SOFTMAX_MOE_FIELDS:
    moe_fields = _softmax_moe_fields(hf_cfg, fmt, where)
  for key, want in dict(fmt.fixed, attention_dropout=0.0).items():
    have = hf_cfg.get(key, want)
    if have != want:
      raise FormatError(f"{where}: {key}={have!r} is not supported; fmjax converts "
                        f"{fmt.model_type} models with {key}={want!r} only")
  if hf_cfg.get("quantization_config"):
    raise FormatError(f"{where}: quantized checkpoints (quantization_config) are not "
                      "supported; dequantize to float32 or bfloat16 first")
  if hf_cfg.get("use_bidirectional_attention"):
    raise FormatError(f"{where}: use_bidirectional_attention=true is not supported; fmjax "
                      "converts causal language models")
  out = {"attention": fmt.attention, **fmt.model}
  optional = ("head_dim", "q_lora_rank", "tie_embeddings") + (
      () if fmt.local_global else ("sliding_window",))
  for field, key in fmt.fields.items():
    if key not in hf_cfg and field not in optional:
      raise FormatError(f"{where}: {key} is missing")
    out[field] = hf_cfg.get(key)
    if field in ZERO_IS_NONE:
      out[field] = ZERO_IS_NONE[field](out[field] or 0)
  # transformers' default where config.json leaves it out: tied for Gemma, untied otherwise
  out["tie_embeddings"] = bool(hf_cfg.get("tie_word_embeddings", fmt.tied_by_default))
  if fmt.attention == "gqa":
    hd = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
    out["head_dim"] = 0 if hd * hf_cfg["num_attention_heads"] == hf_cfg["hidden_size"] else hd
    out["n_kv_heads"] = hf_cfg.get("num_key_value_heads") or hf_cfg["num_attention_heads"]
  else:
    out["q_lora_rank"] = hf_cfg.get("q_lora_rank") or 0
  if "query_scale_dim" in fmt.fields:
    q = out["query_scale_dim"]
    if q != int(q) or q <= 0:
      raise FormatError(f"{where}: query_pre_attn_scalar={q!r} is not supported; fmjax scales "
                        "queries by 1/sqrt of a positive whole number")
    out["query_scale_dim"] = 0 if q == (out["head_dim"] or out["d_model"] // out["n_heads"]) \
        else int(q)
  if fmt.local_global:
    out["full_attention_every"], windowed = _local_global(hf_cfg, fmt, where)
    if not windowed:  # every layer attends to the whole context
      out["sliding_window"] = 0
  if moe_fields:
    out["moe"] = moe_fields
  out["norm_eps"] = float(out["norm_eps"])
  rope_cfg = hf_cfg
  if fmt is GEMMA3:
    rope_cfg, local_theta = _gemma3_rope(hf_cfg, where)
    out["local_rope_theta"] = local_theta if out["sliding_window"] else 0.0
  out["rope_theta"], out["rope_scaling"] = _rope_from_hf(rope_cfg, fmt, where)
  _check_keys(hf_cfg, fmt, where)  # after the checks whose messages name a feature
  return out


def _local_global(hf_cfg: dict, fmt: Format, where: str) -> tuple[int, bool]:
  """(model.full_attention_every, whether any layer is windowed) from HF's layer_types.

  fmjax's pattern is every k-th layer full, the others windowed (or all of one kind);
  transformers' default without layer_types is that with k = its sliding_window_pattern.
  """
  n = hf_cfg.get("num_hidden_layers", 0)
  types = hf_cfg.get("layer_types")
  if types is None:
    k = (hf_cfg.get("sliding_window_pattern") or hf_cfg.get("_sliding_window_pattern")
         or fmt.local_global)
    types = ["full_attention" if (i + 1) % k == 0 else "sliding_attention" for i in range(n)]
  unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
  if unknown or len(types) != n:
    what = f"layer type {unknown[0]!r}" if unknown else f"{len(types)} layer_types for {n} layers"
    raise FormatError(f"{where}: {what} is not supported; fmjax has full_attention and "
                      "sliding_attention, one per layer")
  local = [t == "sliding_attention" for t in types]
  if any(local) and not hf_cfg.get("sliding_window"):
    raise FormatError(f"{where}: sliding_attention layers without a sliding_window")
  if all(local) or not any(local):
    return 0, any(local)
  k = local.index(False) + 1
  if local != [(i + 1) % k != 0 for i in range(n)]:
    raise FormatError(f"{where}: layer_types {types} is not supported; fmjax's full-attention "
                      "layers are every k-th (k-1, 2k-1, ...), the others windowed")
  return k, True


def _gemma3_rope(hf_cfg: dict, where: str) -> tuple[dict, float]:
  """(a config whose rope fields are the full-attention layers', the windowed layers' theta).

  transformers 5 writes rope_parameters per layer type; older configs rope_theta,
  rope_scaling (of the full-attention layers) and rope_local_base_freq.
  """
  rp = hf_cfg.get("rope_parameters") or {}
  if "full_attention" in rp or "sliding_attention" in rp:
    local = dict(rp.get("sliding_attention") or {})
    full = dict(rp.get("full_attention") or {})
  else:
    local = {"rope_type": "default", "rope_theta": hf_cfg.get("rope_local_base_freq", 10000.0)}
    full = dict(hf_cfg.get("rope_scaling") or {}, **rp)
    full.setdefault("rope_theta", hf_cfg.get("rope_theta", 1_000_000.0))
  if local.get("rope_type", "default") != "default" or set(local) - {"rope_type", "rope_theta"}:
    raise FormatError(f"{where}: rope parameters {local} of the sliding_attention layers are "
                      "not supported; fmjax rotates windowed layers with a plain theta")
  rest = {k: v for k, v in hf_cfg.items() if k not in ("rope_parameters", "rope_scaling")}
  return dict(rest, rope_parameters=full), float(local.get("rope_theta", 10000.0))


def _check_keys(hf_cfg: dict, fmt: Format, where: str):
  """Every key of `hf_cfg` is one the format reads, or metadata (METADATA_KEYS)."""
  known = {*fmt.fields.values(), *fmt.fixed, *fmt.keys, *METADATA_KEYS}
  if fmt is DEEPSEEK_V3:
    known.update(DEEPSEEK_KEYS)
  if fmt.moe in SOFTMAX_MOE_FIELDS:
    known.update(SOFTMAX_MOE_FIELDS[fmt.moe].values(), ("router_aux_loss_coef", "num_experts",
                                                         "num_local_experts"))
  for key in hf_cfg:
    if key not in known:
      raise FormatError(f"{where}: {key}={hf_cfg[key]!r} is not a {fmt.model_type} setting "
                        "fmjax understands; nothing is dropped silently, so it was not converted")
  if "layer_types" in fmt.keys and not fmt.local_global and hf_cfg.get("layer_types"):
    kinds = sorted(set(hf_cfg["layer_types"]))
    if kinds != ["full_attention"]:
      raise FormatError(f"{where}: layer_types {kinds} is not supported; fmjax converts "
                        f"{fmt.model_type} models whose layers are all full_attention")


def _softmax_moe_fields(hf_cfg: dict, fmt: Format, where: str) -> dict:
  """The model.moe fields of a Qwen3-MoE or Mixtral config."""
  keys = dict(SOFTMAX_MOE_FIELDS[fmt.moe])
  if fmt is QWEN3_MOE and "num_experts" not in hf_cfg:  # how transformers 5 writes it
    keys["n_routed_experts"] = "num_local_experts"
  for key in keys.values():
    if hf_cfg.get(key) is None:
      raise FormatError(f"{where}: {key} is missing (needed for the mixture of experts)")
  out = dict(config_lib.base().model.moe)
  out.update({field: hf_cfg[key] for field, key in keys.items()}, **SOFTMAX_ROUTING,
             dispatch="dropless")
  if fmt is MIXTRAL:
    out.update(MIXTRAL_ROUTING)
  else:
    n = hf_cfg.get("num_hidden_layers", 0)
    dense = sorted(hf_cfg.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))) or len(dense) >= n:
      raise FormatError(f"{where}: mlp_only_layers={dense} is not supported; fmjax's dense "
                        "layers are the first k (and at least one layer is MoE)")
    out.update(first_k_dense=len(dense), norm_topk_prob=bool(out["norm_topk_prob"]))
  coef = float(hf_cfg.get("router_aux_loss_coef") or 0.0)
  out.update(balance="aux" if coef else "none", aux_loss_coef=coef or out["aux_loss_coef"])
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


# Families fmjax refuses, and why (a feature the fmjax model does not have).
NOT_YET = {
    "gemma3": "a Gemma 3 vision-language checkpoint (Gemma3ForConditionalGeneration); fmjax "
              "converts Gemma 3 language models, model_type 'gemma3_text' (Gemma3ForCausalLM)",
}


def _format_of(hf_cfg: dict, where: str) -> Format:
  kind = hf_cfg.get("model_type")
  if kind not in FORMATS:
    why = f" ({NOT_YET[kind]})" if kind in NOT_YET else ""
    raise FormatError(f"{where}: model_type={kind!r} is not supported{why}; fmjax converts "
                      f"{', '.join(FORMATS)} models")
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
  if r.kind == "llama3" and r.kind in fmt.rope:
    return m.rope_theta, {"rope_type": "llama3", "factor": r.factor,
                          "low_freq_factor": r.low_freq_factor,
                          "high_freq_factor": r.high_freq_factor,
                          "original_max_position_embeddings": r.original_seq_len}
  raise FormatError(f"model.rope_scaling.kind={r.kind!r} has no equivalent in the "
                    f"{fmt.model_type} format (HF's 'dynamic' NTK changes with the sequence "
                    f"length); use {', '.join(k for k in fmt.rope if k != 'none')}")


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
  if kind in ROPE_KEYS:
    extra = sorted(set(rp) - {"rope_type", "type", "rope_theta", "partial_rotary_factor",
                              *ROPE_KEYS[kind]})
    if extra:
      raise FormatError(f"{where}: rope scaling field {extra[0]}={rp[extra[0]]!r} is not "
                        f"understood for rope type {kind!r}; nothing is dropped silently")
  if kind == "default":
    return theta, none
  factor = rp.get("factor")
  if kind == "llama3" and kind in fmt.rope:
    for key in ROPE_KEYS["llama3"]:
      if rp.get(key) is None:
        raise FormatError(f"{where}: llama3 rope scaling without {key}")
    return theta, dict(none, kind="llama3", factor=float(factor),
                       original_seq_len=int(rp["original_max_position_embeddings"]),
                       low_freq_factor=float(rp["low_freq_factor"]),
                       high_freq_factor=float(rp["high_freq_factor"]))
  if kind == "linear" and factor:
    return theta, dict(none, kind="linear", factor=float(factor))
  if kind != "yarn":
    what = "linear rope scaling without a factor" if kind == "linear" else (
        f"rope scaling type {kind!r}")
    raise FormatError(f"{where}: {what} is not supported; fmjax has "
                      f"{', '.join(k for k in fmt.rope if k != 'none')}")
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
