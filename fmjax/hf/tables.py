"""Hugging Face checkpoint formats as tables: the Llama and DeepSeek-V3 config keys and tensors.

A format is two tables: model config fields (fmjax name -> HF config key) and tensors
(`Tensor`: an fmjax parameter -> an HF tensor name, with how the layout changes, applied by
fmjax/hf/layout.py). Grouped-query models are `LlamaForCausalLM`; MLA models are
`DeepseekV3ForCausalLM`: all dense (`first_k_dense_replace` = `num_hidden_layers`) or a
mixture of experts after the first `model.moe.first_k_dense` layers. fmjax's dense and MoE
layer stacks (params['layers'], params['moe_layers']) map to HF's layer numbers.
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
  hf: str  # HF tensor name; "{i}" is the layer of a parameter stacked along "layers"
  n_in: int = 0  # a linear weight whose first n_in dims (per layer) are its input; 0: same layout
  rope: bool = False  # the last qk_rope_head_dim dims of the last axis are rotary


def _layer_tensors(stack: str, kind: str, m) -> list[Tensor]:
  """The norms and feed-forward block of the layers of one stack ('layers' or 'moe_layers')."""
  layer, s = "model.layers.{i}.", stack + "."
  out = [Tensor(s + "attn_norm", layer + "input_layernorm.weight"),
         Tensor(s + "mlp_norm", layer + "post_attention_layernorm.weight")]

  def swiglu(param: str, hf: str) -> list[Tensor]:  # gate, up and down projections
    return [Tensor(s + param + w, hf + w + "_proj.weight", n_in=1) for w in ("gate", "up", "down")]
  if kind == "dense":
    return out + swiglu("w_", layer + "mlp.")
  mlp = layer + "mlp."  # "{e}" is the routed expert
  out += [Tensor(s + "router", mlp + "gate.weight", n_in=1),
          Tensor(s + "router_bias", mlp + "gate.e_score_correction_bias")
          ] + swiglu("w_", mlp + "experts.{e}.")
  if m.moe.n_shared_experts:  # n_shared experts of width F: one SwiGLU of width n_shared * F
    out += swiglu("shared_", mlp + "shared_experts.")
  return out


def _ends(m) -> tuple[list[Tensor], list[Tensor]]:
  last = [Tensor("final_norm", "model.norm.weight")]
  if not m.tie_embeddings:
    last.append(Tensor("unembed", "lm_head.weight", n_in=1))
  return [Tensor("embed", "model.embed_tokens.weight")], last


def _llama_tensors(m) -> list[Tensor]:
  a = "model.layers.{i}.self_attn."
  first, last = _ends(m)
  return first + [Tensor(f"layers.w{x}", a + f"{x}_proj.weight", n_in=2 if x == "o" else 1)
                  for x in "qkvo"] + _layer_tensors("layers", "dense", m) + last


def _deepseek_tensors(m) -> list[Tensor]:
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


# HF tensors that are derived, not learned: read by nobody, dropped by nobody.
DERIVED = ("rotary_emb.inv_freq",)


def format_for(m) -> Format:
  return BY_ATTENTION[m.attention]


def tensor_table(m, decls) -> list[tuple[Tensor, tuple]]:
  """[(row, fmjax shape)] covering every parameter in `decls` exactly once."""
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
  stack = t.param.split(".")[0]
  layers = [i for i, kind in enumerate(model_lib.layer_kinds(m))
            if model_lib.STACKS[kind] == stack]
  experts = range(m.moe.n_routed_experts) if "{e}" in t.hf else [None]
  return [t.hf.format(i=i, e=e) for i in layers for e in experts]
