"""The Hugging Face families beyond Llama and DeepSeek-V3, against transformers itself (fp32).

For each family a random tiny transformers model is built here (hidden 64, 2 layers,
vocab 128, every weight perturbed so nothing sits at its initial value), and:
  - imported, fmjax's logits equal transformers' (relative error < 1e-4);
  - fmjax's random parameters in that family's config, exported, give transformers the
    logits fmjax computes; export -> import -> export reproduces every file byte for byte;
  - greedy generation with fmjax's KV cache equals transformers' `generate`, 32 tokens;
  - MoE routing is not trivial: exchanging two experts' weights changes the logits.
The features each family exercises are fmjax model settings (tables.Format.model):
llama3 rope scaling and tied embeddings, q/k/v biases, per-head q/k norms, softmax
top-k experts, a sliding window shorter than the sequences; Gemma's GeGLU, scaled
embeddings, 1 + w norm scales and norms after each block, soft caps on attention scores
and logits that bite (caps of 2 and 3), a query scale that is not the head dim, windowed
layers mixed with full ones, and (Gemma 3) the windowed layers' own rotary theta.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmjax.hf import config_map, files as hf, tables
from fmjax.hf.safetensors_files import FormatError
from fmjax.nn import attention, cost, decoding, model
from fmjax.nn.params import leaves_with_names
from fmjax.nn.spec import ModelSpec
from fmjax.nn import sharding
from fmjax.nn import params as params_lib
from fmjax.posttrain import plan
from fmjax.train import checkpoint, inputs, state as state_lib
from fmjax.validate import validate
from test_convert import random_params, rel_err, same_files
from test_experiments import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(name):
  return load(os.path.join(REPO, "experiments", name + ".py"))


transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

V, PROMPT, NEW = 128, 6, 32
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              max_position_embeddings=64)
# Llama 3.1's rope scaling; with head dim 16 and theta 10^4, original context 64 puts
# one frequency above the high-frequency band, two in the blend, five below.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
FAMILIES = {  # name: (transformers class prefix, config fields, the fmjax settings it pins)
    "llama3": ("Llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
               dict(rope_scaling=dict(kind="llama3", factor=8.0, original_seq_len=64),
                    tie_embeddings=True)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True,
                            rope_parameters=dict(rope_type="default", rope_theta=1e6)),
              dict(attention_bias=True)),
    "qwen3": ("Qwen3", dict(tie_word_embeddings=False), dict(qk_norm=True)),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   norm_topk_prob=True, mlp_only_layers=[0]),
                  dict(qk_norm=True, moe=dict(n_routed_experts=4, first_k_dense=1))),
    "mistral": ("Mistral", dict(sliding_window=5), dict(sliding_window=5)),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=7),
                dict(sliding_window=7, moe=dict(n_routed_experts=4, experts_per_token=2))),
    "gemma": ("Gemma", dict(), dict(mlp_activation="gelu_tanh", norm_offset=1.0,
                                    scale_embeddings=True, post_norms=False)),
    # layer_types default: windowed, full
    "gemma2": ("Gemma2", dict(sliding_window=5, query_pre_attn_scalar=24,
                              final_logit_softcapping=3.0, attn_logit_softcapping=2.0),
               dict(mlp_activation="gelu_tanh", norm_offset=1.0, scale_embeddings=True,
                    post_norms=True, sliding_window=5, full_attention_every=2,
                    query_scale_dim=24, logit_softcap=3.0, attn_softcap=2.0)),
    "gemma3": ("Gemma3Text", dict(
        num_hidden_layers=3, sliding_window=5, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters=dict(full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e5),
                             sliding_attention=dict(rope_type="default", rope_theta=100.0))),
        dict(qk_norm=True, post_norms=True, norm_offset=1.0, sliding_window=5,
             full_attention_every=3, local_rope_theta=100.0, rope_theta=1e5,
             rope_scaling=dict(kind="linear", factor=2.0))),
}
MODEL_TYPES = {"llama3": "llama", "gemma3": "gemma3_text"}  # where not the family's name
MODEL_CLASSES = {"Gemma3Text": "Gemma3"}  # the causal LM class where not PREFIX + ForCausalLM


_forward = jax.jit(model.forward, static_argnums=4)  # one compile per family, shared


def fmjax_logits(params, cfg, toks):
  positions = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
  return np.asarray(_forward(params, toks, np.ones_like(toks), positions,
                             ModelSpec.from_config(cfg)))


def _perturb(m, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return m.float().eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  """(name, HF dir, HF model, tokens, HF logits, fmjax config of the imported model)."""
  name = request.param
  prefix, fields, _ = FAMILIES[name]
  torch.manual_seed(0)
  config = getattr(transformers, prefix + "Config")(**{**COMMON, **fields})
  model_class = MODEL_CLASSES.get(prefix, prefix) + "ForCausalLM"
  m = _perturb(getattr(transformers, model_class)(config), seed=1)
  m.config._attn_implementation = "eager"
  directory = str(tmp_path_factory.mktemp(name) / "hf")
  m.save_pretrained(directory, max_shard_size="100KB")
  toks = np.random.default_rng(1).integers(0, V, (2, 16)).astype(np.int32)
  with torch.no_grad():
    logits = m(torch.tensor(toks, dtype=torch.long)).logits.numpy()
  cfg = tiny_config(**hf.read_config(directory)[1])
  return name, directory, m, toks, logits, cfg


def imported_params(directory, cfg):
  arrays = dict(hf.arrays(directory, cfg.model))
  out = {}
  for key, x in arrays.items():
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


def test_an_imported_family_is_the_frozen_reference_of_dpo_and_rl(family):
  # checkpoint.init_from names the HF directory, so DPO's (and RL's KL) reference is it too.
  name, directory, _, _, _, cfg = family
  c = cfg.copy_and_resolve_references()
  c.checkpoint.init_from, c.objective.name = directory, "dpo"
  checkpoint.check_init_from(plan.reference_path(c), c.model)
  mesh = sharding.make_mesh(c.mesh)
  shardings = params_lib.shardings(model.param_decls(c.model), mesh, c.sharding.params)
  reference = inputs.load_reference(c, shardings)
  want = imported_params(directory, cfg)
  assert jax.tree.structure(reference) == jax.tree.structure(want)
  for got, expected in zip(jax.tree.leaves(reference), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_the_import_pins_the_family_settings(family):
  name, directory, _, _, _, cfg = family
  with open(os.path.join(directory, "config.json")) as f:
    assert json.load(f)["model_type"] == MODEL_TYPES.get(name, name)
  for field, value in FAMILIES[name][2].items():
    have = cfg.model[field]
    if isinstance(value, dict):
      assert {k: have[k] for k in value} == value, field
    else:
      assert have == value, field
  assert tables.format_for(cfg.model).model_type == MODEL_TYPES.get(name, name)
  # an imported model is a config fmjax trains as it is (at a vocabulary its own
  # tokenizer can have: these random models come without one)
  trainable = cfg.copy_and_resolve_references()
  trainable.model.vocab_size = 512
  validate(trainable, n_devices=8)
  # the parameter count formula holds the new parameters (biases, q/k norms)
  assert cost.param_counts(cfg.model)["total"] == sum(
      x.size for x in jax.tree.leaves(imported_params(directory, cfg)))
  # causal FLOPs count the keys a window leaves: the visible entries of each layer's mask,
  # per query (a windowed layer's or a full one's)
  T, W = 40, cfg.model.sliding_window
  visible = sum(np.asarray(attention.segment_mask(np.ones((1, T), np.int32), W if local else 0))
                .sum() / T for local in model.local_layers(cfg.model))
  per_key = 2 * 2 * cfg.model.n_heads * 16  # q.k and p.v, 2 FLOPs each
  square = cost.flops_per_token(cfg.model, T, training=False)
  causal = cost.flops_per_token(cfg.model, T, training=False, attention="causal")
  assert square - causal == pytest.approx((T * cfg.model.n_layers - visible) * per_key)


def test_import_matches_transformers(family, record_property):
  name, directory, _, toks, want, cfg = family
  err = rel_err(fmjax_logits(imported_params(directory, cfg), cfg, toks), want)
  record_property("import_rel_err", err)
  print(f"\n{name} import: relative error {err:.2e}")
  assert err < 1e-4


# Settings whose default, put back, must change a family's logits (a feature that never bit
# would pass the parity tests without being checked).
BITES = {"gemma": dict(mlp_activation="silu", scale_embeddings=False),
         "gemma2": dict(full_attention_every=0, query_scale_dim=0, logit_softcap=0.0,
                        attn_softcap=0.0),
         "gemma3": dict(full_attention_every=0, local_rope_theta=0.0)}


def test_each_gemma_feature_changes_the_logits(family):
  name, directory, _, toks, want, cfg = family
  if name not in BITES:
    pytest.skip(f"{name}: its features are checked by the parity tests alone")
  params = imported_params(directory, cfg)
  for field, default in BITES[name].items():
    changed = cfg.copy_and_resolve_references()
    changed.model[field] = default
    assert rel_err(fmjax_logits(params, changed, toks), want) > 1e-3, field


def test_export_matches_transformers_and_round_trips_byte_for_byte(family, tmp_path):
  name, _, _, toks, _, cfg = family
  params = random_params(cfg, seed=4)
  out, again = str(tmp_path / "hf"), str(tmp_path / "hf2")
  for d in (out, again):
    os.makedirs(d)
  leaves = dict(leaves_with_names(params))
  table = tables.tensor_table(cfg.model, model.param_decls(cfg.model))
  hf.save(out, cfg.model, 64, ((t.param, leaves[t.param]) for t, _ in table), 50_000)
  got = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    hf_logits = got(torch.tensor(toks, dtype=torch.long)).logits.numpy()
  err = rel_err(hf_logits, fmjax_logits(params, cfg, toks))
  print(f"\n{name} export: relative error {err:.2e}")
  assert err < 1e-4
  hf.save(again, cfg.model, 64, hf.arrays(out), 50_000)
  same_files(out, again)
  assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1


def test_greedy_generation_with_the_cache_matches_transformers(family):
  name, directory, m, toks, _, cfg = family
  prompt = toks[0, :PROMPT]
  with torch.no_grad():
    want = m.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=NEW,
                      do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
  got = decoding.generate(imported_params(directory, cfg), ModelSpec.from_config(cfg),
                          [prompt.tolist()], NEW)[0]
  assert len(got) == PROMPT + NEW
  assert got == want


def test_moe_routing_is_not_trivial(family):
  name, directory, _, toks, want, cfg = family
  if not cfg.model.moe.n_routed_experts:
    pytest.skip(f"{name} has no experts")
  params = imported_params(directory, cfg)
  w = params["moe_layers"]["w_gate"]  # (layers, experts, D, F)
  assert min(np.abs(w[:, i] - w[:, j]).max() for i in range(4) for j in range(i)) > 0.05
  swapped = jax.tree.map(np.copy, params)
  for key in ("w_gate", "w_up", "w_down"):
    swapped["moe_layers"][key][:, [0, 1]] = params["moe_layers"][key][:, [1, 0]]
  assert rel_err(fmjax_logits(swapped, cfg, toks), want) > 1e-3


@pytest.mark.parametrize("change,needle", [
    (dict(model_type="gemma3"), "model_type='gemma3' is not supported (a Gemma 3 "
     "vision-language checkpoint"),
    (dict(some_new_switch=True), "some_new_switch=True is not a qwen3 setting fmjax understands"),
    (dict(use_sliding_window=True), "use_sliding_window=True is not supported"),
    (dict(layer_types=["sliding_attention", "full_attention"]),
     "layer_types ['full_attention', 'sliding_attention'] is not supported"),
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0)),
     "llama3 rope scaling without original_max_position_embeddings"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, factor=2.0)),
     "rope scaling field factor=2.0 is not understood for rope type 'default'"),
])
def test_a_config_field_fmjax_does_not_understand_is_refused(change, needle):
  cfg = tiny_config(qk_norm=True)
  hf_cfg = config_map.to_hf_config(cfg.model, seq_len=32)
  assert hf_cfg["model_type"] == "qwen3"
  assert config_map.model_fields(hf_cfg)["qk_norm"] is True
  with pytest.raises(FormatError) as e:
    config_map.model_fields(dict(hf_cfg, **change))
  assert needle in str(e.value) and "\n" not in str(e.value)


# google/gemma-3-1b-pt's config.json as published (older keys: sliding_window_pattern,
# rope_local_base_freq; no tie_word_embeddings, which transformers takes as true for Gemma)
GEMMA3_1B = dict(
    architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", attention_bias=False,
    attn_logit_softcapping=None, final_logit_softcapping=None, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", hidden_size=1152, intermediate_size=6912,
    num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1,
    query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_local_base_freq=10000,
    rope_scaling=None, rope_theta=1000000, sliding_window=512, sliding_window_pattern=6,
    cache_implementation="hybrid", vocab_size=262144)


def test_a_published_gemma3_config_imports_with_its_layer_pattern_and_tied_embeddings():
  fields = config_map.model_fields(GEMMA3_1B)
  assert {k: fields[k] for k in ("full_attention_every", "sliding_window", "local_rope_theta",
                                 "rope_theta", "tie_embeddings", "query_scale_dim")} == dict(
      full_attention_every=6, sliding_window=512, local_rope_theta=10000.0, rope_theta=1e6,
      tie_embeddings=True, query_scale_dim=0)
  m = tiny_config(**fields).model
  assert [i for i, local in enumerate(model.local_layers(m)) if not local] == [5, 11, 17, 23]
  assert cost.param_counts(m)["total"] == 999_885_952  # Gemma 3 1B
  back = config_map.to_hf_config(m, seq_len=32768)
  assert back["layer_types"].count("full_attention") == 4 and back["tie_word_embeddings"]
  assert config_map.model_fields(back) == fields


@pytest.mark.parametrize("change,needle", [
    (dict(layer_types=["full_attention", "sliding_attention"] * 13),
     "layer_types ['full_attention', 'sliding_attention', "),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 13),
     "layer type 'chunked_attention' is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true is not supported"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0 is not supported"),
    (dict(hidden_activation="gelu"), "hidden_activation='gelu' is not supported"),
    (dict(rope_parameters=dict(sliding_attention=dict(rope_type="linear", factor=2.0,
                                                      rope_theta=1e4))),
     "rope parameters {'rope_type': 'linear'"),
])
def test_a_gemma_config_fmjax_cannot_hold_is_refused(change, needle):
  with pytest.raises(FormatError) as e:
    config_map.model_fields(dict(GEMMA3_1B, **change))
  assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fields,needle", [
    (dict(moe=dict(n_routed_experts=4, balance="aux_free")),
     "model.moe.balance='aux_free': mixtral routers have no selection bias"),
    (dict(qk_norm=True, moe=dict(n_routed_experts=4, n_shared_experts=1)),
     "model.moe.n_shared_experts=1: the qwen3_moe format"),
    (dict(moe=dict(n_routed_experts=4, first_k_dense=1)),
     "model.moe.first_k_dense=1: the mixtral format"),
    (dict(attention_bias=True, qk_norm=True), "has no place in the"),
])
def test_what_no_family_holds_is_refused_on_export(fields, needle):
  cfg = tiny_config(**fields)
  with pytest.raises(FormatError) as e:
    config_map.check_model(cfg.model)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_finetune_experiment_builds_a_family_that_trains_and_transformers_reloads(
    tmp_path, monkeypatch):
  """experiments/finetune_hf_tiny.py:qwen3: a random Qwen3 built with transformers, read as
  checkpoint.init_from reads it, one gradient step of the run's objective, exported,
  reloaded in transformers with the trained model's logits. (The whole run, 20 steps:
  the experiment's docstring; figures in the closing note of issue 21.)"""
  monkeypatch.chdir(tmp_path)
  cfg = load_experiment("finetune_hf_tiny").get_config("qwen3")
  assert cfg.checkpoint.init_from == os.path.join("runs", "hf_tiny_qwen3")
  assert cfg.model.qk_norm and cfg.model.vocab_size == 2048
  validate(cfg, n_devices=8)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
  abstract = state_lib.setup(cfg, mesh).abstract_state["params"]
  start = jax.device_get(checkpoint.restore_params(cfg.checkpoint.init_from, abstract,
                                                   cfg.model))
  toks = np.random.default_rng(3).integers(0, cfg.model.vocab_size, (2, 16)).astype(np.int32)
  spec = ModelSpec.from_config(cfg)
  positions = np.broadcast_to(np.arange(16, dtype=np.int32), toks.shape)

  def loss(p):  # next-token cross-entropy
    logits = model.forward(p, toks[:, :-1], np.ones_like(toks[:, :-1]), positions[:, :-1], spec)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1))

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  before, grads = value_and_grad(start)
  trained = jax.tree.map(lambda p, g: np.asarray(p - 0.5 * g), start, grads)
  assert value_and_grad(trained)[0] < before
  out = str(tmp_path / "hf")
  os.makedirs(out)
  leaves = dict(leaves_with_names(trained))
  table = tables.tensor_table(cfg.model, model.param_decls(cfg.model))
  hf.save(out, cfg.model, cfg.data.seq_len, ((t.param, leaves[t.param]) for t, _ in table))
  got = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  assert type(got).__name__ == "Qwen3ForCausalLM"
  with torch.no_grad():
    hf_logits = got(torch.tensor(toks, dtype=torch.long)).logits.numpy()
  assert rel_err(hf_logits, fmjax_logits(trained, cfg, toks)) < 1e-4
