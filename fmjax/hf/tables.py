"""Hugging Face checkpoint formats as tables: config keys and tensors of each family.

A format is two tables: model config fields (fmjax name -> HF config key) and tensors
(`Tensor`: an fmjax parameter -> an HF tensor name, with how the layout changes, applied by
fmjax/hf/layout.py). Each family's architectural features are fmjax model settings that
its `Format.model` pins (`attention_bias`, `qk_norm`, `sliding_window`, the MoE routing);
the forward pass knows the settings, never the family. Grouped-query families:

  llama       LlamaForCausalLM (Llama 2, 3.x; rope scaling linear, yarn or llama3)
  qwen2       Qwen2ForCausalLM (Qwen2.5): biases on q, k and v
  qwen3       Qwen3ForCausalLM: RMSNorm over each query and key head
  mistral     MistralForCausalLM: a sliding window
  qwen3_moe   Qwen3MoeForCausalLM: qwen3's attention, softmax top-k experts, no shared one
  mixtral     MixtralForCausalLM: softmax top-k experts (normalised), a sliding window
  gemma       GemmaForCausalLM: GeGLU, embeddings x sqrt(d_model), RMSNorm scales 1 + w
  gemma2      Gemma2ForCausalLM: gemma's, plus norms after attention and MLP, soft-capped
              attention scores and logits, windowed layers alternating with full ones
  gemma3_text Gemma3ForCausalLM: gemma2's without the soft caps, plus per-head q/k norms,
              one full-attention layer in six, the windowed layers' own rotary theta

MLA models are `DeepseekV3ForCausalLM`: all dense (`first_k_dense_replace` =
`num_hidden_layers`) or a mixture of experts after the first `model.moe.first_k_dense`
layers. fmjax's dense and MoE layer stacks (params['layers'], params['moe_layers']) map to
HF's layer numbers. An export takes the first format (in FORMATS' order) whose pinned
settings the model has.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from fmjax.hf.safetensors_files import FormatError
from fmjax.nn import model as model_lib
from fmjax.nn.params import leaves_with_names


@dataclasses.dataclass(frozen=True)
class Tensor:
  param: str  # dotted fmjax parameter name, e.g. "layers.wq"
  hf: str  # HF tensor name; "{i}" is the layer of a parameter stacked along "layers"; "": none
  n_in: int = 0  # a linear weight whose first n_in dims (per layer) are its input; 0: same layout
  rope: bool = False  # the last qk_rope_head_dim dims of the last axis are rotary
  flat: bool = False  # HF holds it as one vector (a bias of heads x head dim)


def _swiglu(s: str, param: str, hf: str, names=("gate", "up", "down"), suffix="_proj"):
  """Gate, up and down projections."""
  return [Tensor(s + param + w, hf + h + suffix + ".weight", n_in=1)
          for w, h in zip(("gate", "up", "down"), names)]


def _layer_tensors(stack: str, kind: str, m, fmt) -> list[Tensor]:
  """The norms and feed-forward block of the layers of one stack ('layers' or 'moe_layers')."""
  layer, s = "model.layers.{i}.", stack + "."
  out = [Tensor(s + name, layer + hf + ".weight") for name, hf in fmt.norms.items()]
  if kind == "dense":
    return out + _swiglu(s, "w_", layer + "mlp.")
  if fmt.moe == "mixtral":  # "{e}" is the routed expert
    mlp = layer + "block_sparse_moe."
    return out + [Tensor(s + "router", mlp + "gate.weight", n_in=1),
                  Tensor(s + "router_bias", "")] + _swiglu(
                      s, "w_", mlp + "experts.{e}.", names=("w1", "w3", "w2"), suffix="")
  mlp = layer + "mlp."
  bias = mlp + "gate.e_score_correction_bias" if fmt.moe == "deepseek" else ""
  out += [Tensor(s + "router", mlp + "gate.weight", n_in=1),
          Tensor(s + "router_bias", bias)] + _swiglu(s, "w_", mlp + "experts.{e}.")
  if m.moe.n_shared_experts:  # n_shared experts of width F: one SwiGLU of width n_shared * F
    out += _swiglu(s, "shared_", mlp + "shared_experts.")
  return out


def _ends(m) -> tuple[list[Tensor], list[Tensor]]:
  last = [Tensor("final_norm", "model.norm.weight")]
  if not m.tie_embeddings:
    last.append(Tensor("unembed", "lm_head.weight", n_in=1))
  return [Tensor("embed", "model.embed_tokens.weight")], last


def _gqa_tensors(m, fmt) -> list[Tensor]:
  a = "model.layers.{i}.self_attn."
  out, last = _ends(m)
  for kind in model_lib.stack_sizes(m):  # dense layers first, then the MoE layers
    s = model_lib.STACKS[kind] + "."
    out += [Tensor(s + f"w{x}", a + f"{x}_proj.weight", n_in=2 if x == "o" else 1)
            for x in "qkvo"]
    if m.attention_bias:
      out += [Tensor(s + f"b{x}", a + f"{x}_proj.bias", flat=True) for x in "qkv"]
    if m.qk_norm:
      out += [Tensor(s + f"{x}_head_norm", a + f"{x}_norm.weight") for x in "qk"]
    out += _layer_tensors(s[:-1], kind, m, fmt)
  return out + last


def _deepseek_tensors(m, fmt) -> list[Tensor]:
  a = "model.layers.{i}.self_attn."
  out, last = _ends(m)
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
            Tensor(s + "wo", a + "o_proj.weight", n_in=2)] + _layer_tensors(s[:-1], kind, m, fmt)
  return out + last


@dataclasses.dataclass(frozen=True)
class Format:
  model_type: str
  architecture: str
  attention: str  # the fmjax model.attention it holds
  fields: dict  # fmjax model field -> HF config key, copied as they are
  unused: tuple  # fmjax model fields this format does not read
  tensors: Callable  # (m, format) -> [Tensor]
  fixed: dict  # HF config values the format writes, and requires when reading
  model: dict = dataclasses.field(default_factory=dict)  # fmjax model settings it pins
  moe: str | None = None  # its mixture of experts: 'deepseek', 'qwen3_moe', 'mixtral'; None
  norms: dict = dataclasses.field(default_factory=lambda: dict(LLAMA_NORMS))  # fmjax -> HF
  # Layers with a sliding window and with full attention, as HF's `layer_types`; the period
  # of full-attention layers when a config has no layer_types (0: none of this format's)
  local_global: int = 0
  tied_by_default: bool = False  # what transformers assumes without tie_word_embeddings
  rope: tuple = ("none", "linear", "yarn", "llama3")  # the rope_scaling kinds it holds
  # HF config keys it reads and writes beyond `fields` and `fixed` (config_map handles them)
  keys: tuple = ()


LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
# Gemma 2/3 name the norm after attention "post_attention_layernorm"
SANDWICH_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                  "mlp_norm": "pre_feedforward_layernorm",
                  "mlp_post_norm": "post_feedforward_layernorm"}

SHARED_FIELDS = {"vocab_size": "vocab_size", "d_model": "hidden_size",
                 "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                 "d_ff": "intermediate_size", "tie_embeddings": "tie_word_embeddings",
                 "norm_eps": "rms_norm_eps"}
GQA_FIELDS = dict(SHARED_FIELDS, n_kv_heads="num_key_value_heads", head_dim="head_dim")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim")
GQA_OPTIONS = ("attention_bias", "qk_norm", "sliding_window")  # what MLA has none of
# The layer of Llama and of every family but Gemma: SwiGLU, plain embeddings, RMSNorm scales w
LLAMA_LAYER = dict(mlp_activation="silu", norm_offset=0.0, post_norms=False,
                   scale_embeddings=False)
GEMMA_LAYER = dict(mlp_activation="gelu_tanh", norm_offset=1.0, scale_embeddings=True)
PLAIN = dict(LLAMA_LAYER, attention_bias=False, qk_norm=False, sliding_window=0)
GEMMA_KEYS = ("use_bidirectional_attention", "cache_implementation")
QWEN = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")

LLAMA = Format(
    model_type="llama", architecture="LlamaForCausalLM", attention="gqa", fields=GQA_FIELDS,
    unused=MLA_FIELDS, tensors=_gqa_tensors, model=PLAIN,
    fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "pretraining_tp": 1})

QWEN2 = Format(
    model_type="qwen2", architecture="Qwen2ForCausalLM", attention="gqa", fields=GQA_FIELDS,
    unused=MLA_FIELDS, tensors=_gqa_tensors, model=dict(PLAIN, attention_bias=True),
    fixed={"hidden_act": "silu", "use_sliding_window": False}, keys=QWEN)

QWEN3 = Format(
    model_type="qwen3", architecture="Qwen3ForCausalLM", attention="gqa", fields=GQA_FIELDS,
    unused=MLA_FIELDS, tensors=_gqa_tensors, model=dict(PLAIN, qk_norm=True),
    fixed={"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False},
    keys=QWEN)

MISTRAL = Format(
    model_type="mistral", architecture="MistralForCausalLM", attention="gqa",
    fields=dict(GQA_FIELDS, sliding_window="sliding_window"), unused=MLA_FIELDS,
    tensors=_gqa_tensors, model=dict(LLAMA_LAYER, attention_bias=False, qk_norm=False),
    fixed={"hidden_act": "silu"})

QWEN3_MOE = Format(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", attention="gqa",
    fields=GQA_FIELDS, unused=MLA_FIELDS, tensors=_gqa_tensors, model=dict(PLAIN, qk_norm=True),
    fixed={"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
           "decoder_sparse_step": 1}, moe="qwen3_moe", keys=QWEN[:3] + ("mlp_only_layers",))

MIXTRAL = Format(
    model_type="mixtral", architecture="MixtralForCausalLM", attention="gqa",
    # intermediate_size is the experts' width: d_ff is not held (every layer is MoE)
    fields=dict({k: v for k, v in GQA_FIELDS.items() if k != "d_ff"},
                sliding_window="sliding_window"), unused=MLA_FIELDS + ("d_ff",),
    tensors=_gqa_tensors, model=dict(LLAMA_LAYER, attention_bias=False, qk_norm=False),
    fixed={"hidden_act": "silu", "router_jitter_noise": 0.0}, moe="mixtral")

DEEPSEEK_V3 = Format(
    model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM", attention="mla",
    fields=dict(SHARED_FIELDS, **{f: f for f in MLA_FIELDS}),
    unused=("n_kv_heads", "head_dim"), tensors=_deepseek_tensors, model=PLAIN, moe="deepseek",
    rope=("none", "linear", "yarn"),
    # HF DeepSeek-V3 normalizes the MLA latents with eps 1e-6 whatever rms_norm_eps is,
    # so a model converts exactly only with norm_eps 1e-6.
    fixed={"hidden_act": "silu", "attention_bias": False, "rms_norm_eps": 1e-6})

GEMMA = Format(
    model_type="gemma", architecture="GemmaForCausalLM", attention="gqa", fields=GQA_FIELDS,
    unused=MLA_FIELDS, tensors=_gqa_tensors,
    model=dict(GEMMA_LAYER, post_norms=False, attention_bias=False, qk_norm=False,
               sliding_window=0),
    fixed={"hidden_act": "gelu_pytorch_tanh", "attention_bias": False}, keys=GEMMA_KEYS,
    tied_by_default=True)

GEMMA2_FIELDS = dict(GQA_FIELDS, sliding_window="sliding_window",
                     query_scale_dim="query_pre_attn_scalar",
                     logit_softcap="final_logit_softcapping")
GEMMA2 = Format(
    model_type="gemma2", architecture="Gemma2ForCausalLM", attention="gqa",
    fields=dict(GEMMA2_FIELDS, attn_softcap="attn_logit_softcapping"), unused=MLA_FIELDS,
    tensors=_gqa_tensors, model=dict(GEMMA_LAYER, post_norms=True, attention_bias=False,
                                     qk_norm=False),
    fixed={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
    keys=GEMMA_KEYS + ("layer_types",), norms=SANDWICH_NORMS, local_global=2,
    tied_by_default=True)

# transformers' Gemma 3 ignores attn_logit_softcapping: it must be null
GEMMA3 = Format(
    model_type="gemma3_text", architecture="Gemma3ForCausalLM", attention="gqa",
    fields=GEMMA2_FIELDS, unused=MLA_FIELDS, tensors=_gqa_tensors,
    model=dict(GEMMA_LAYER, post_norms=True, attention_bias=False, qk_norm=True),
    fixed={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
           "attn_logit_softcapping": None},
    keys=GEMMA_KEYS + ("layer_types", "sliding_window_pattern", "_sliding_window_pattern",
                       "rope_local_base_freq"),
    norms=SANDWICH_NORMS, local_global=6, tied_by_default=True)

# In the order an export tries them.
FORMATS = {f.model_type: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL, QWEN3_MOE, MIXTRAL,
                                     DEEPSEEK_V3, GEMMA, GEMMA2, GEMMA3)}


# HF tensors that are derived, not learned: read by nobody, dropped by nobody.
DERIVED = ("rotary_emb.inv_freq",)


def format_for(m) -> Format:
  """The format an export of model config `m` writes: the first whose pinned settings `m`
  has (fmjax.hf.config_map.check_model says what else it cannot hold)."""
  moe = bool(m.moe.n_routed_experts)
  fits = [f for f in FORMATS.values() if f.attention == m.attention and
          (f.moe is not None or not moe) and all(m[k] == v for k, v in f.model.items())]
  if not fits:  # the first of its attention kind names what it lacks
    return next(f for f in FORMATS.values() if f.attention == m.attention)
  return next((f for f in fits if (f.moe is not None) == moe), fits[0])


def tensor_table(m, decls) -> list[tuple[Tensor, tuple]]:
  """[(row, fmjax shape)] covering every parameter in `decls` exactly once."""
  fmt = format_for(m)
  shapes = {name: p.shape for name, p in leaves_with_names(decls)}
  rows = fmt.tensors(m, fmt)
  missing = sorted(set(shapes) - {r.param for r in rows})
  if missing:
    raise FormatError(f"fmjax parameter {missing[0]} has no place in the {fmt.model_type} "
                      "format; fmjax cannot convert this model yet")
  return [(r, shapes[r.param]) for r in rows]


def hf_names(t: Tensor, m) -> list[str]:
  """The HF tensor names of a row, in the order of `np.ndindex(shape[:_lead(t)])`: one per
  layer of a stacked parameter (its stack's layers), and per expert within it."""
  if not t.hf:  # not stored (an MoE router bias that format has not)
    return []
  if "{i}" not in t.hf:
    return [t.hf]
  stack = t.param.split(".")[0]
  layers = [i for i, kind in enumerate(model_lib.layer_kinds(m))
            if model_lib.STACKS[kind] == stack]
  experts = range(m.moe.n_routed_experts) if "{e}" in t.hf else [None]
  return [t.hf.format(i=i, e=e) for i in layers for e in experts]
