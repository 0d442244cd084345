"""Hugging Face import and export (fmjax.convert, fmjax.hf) against transformers itself.

Exported fmjax models give the same logits in transformers (LlamaForCausalLM,
DeepseekV3ForCausalLM); random transformers models give the same logits in
fmjax once imported; export -> import -> export reproduces every file byte for
byte. transformers and the CPU build of torch come from the `hf` test extra;
the tests that need them are skipped without it.
"""

import filecmp
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from fmjax.train import checkpoint, loop, state as state_lib
from fmjax import config as config_lib, convert
from fmjax.hf import config_map, files as hf, safetensors_files as st, tables
from fmjax.hf.safetensors_files import FormatError
from fmjax.nn import model, sharding
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLA = dict(attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, norm_eps=1e-6)
YARN = dict(kind="yarn", factor=4.0, original_seq_len=8, beta_fast=32.0, beta_slow=1.0)
# DeepSeek-V3's routing: sigmoid scores, the router bias in the selection, group-limited
MOE = dict(n_routed_experts=4, n_shared_experts=1, experts_per_token=2, moe_intermediate_size=24,
           first_k_dense=1, score="sigmoid", n_group=2, topk_group=1, norm_topk_prob=True,
           routed_scaling_factor=2.5, balance="aux_free")

EXPORT_CASES = {
    "llama": dict(),
    "llama_tied_headdim_yarn": dict(tie_embeddings=True, head_dim=32,
                                    rope_scaling=dict(YARN, mscale=0.5)),
    "deepseek_qlora_yarn": dict(MLA, rope_scaling=dict(YARN, mscale=1.0)),
    "deepseek_tied_linear": dict(MLA, q_lora_rank=0, tie_embeddings=True,
                                 rope_scaling=dict(kind="linear", factor=2.0)),
    # 3 layers: dense, then 2 MoE (4 routed experts top-2 in 2 groups, 1 shared)
    "deepseek_moe": dict(MLA, n_layers=3, moe=MOE),
}


def random_params(cfg, seed):
  """Every parameter random (norm scales too), so a swapped or misplaced tensor shows."""
  decls = model.param_decls(cfg.model)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (1.0 if p.init is params_lib.ones else 0.0) +
                      rng.normal(0, 0.1, p.shape).astype(np.float32), decls,
                      is_leaf=lambda x: isinstance(x, params_lib.Param))


def make_workdir(path, cfg, params, step=5):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config_lib.to_json(cfg))
  with checkpoint.Checkpointer(os.path.join(path, "checkpoints"), keep=1, async_save=False) as ckpt:
    ckpt.save(step, {"step": np.int32(step), "params": params})
  return path


def tokens(vocab, seed=1, shape=(2, 16)):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def fmjax_logits(params, cfg, toks):
  """fmjax's logits for `toks` under `cfg` exactly as given (its dispatch included)."""
  positions = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
  forward = jax.jit(lambda p, t: model.forward(p, t, np.ones_like(toks), positions,
                                                      ModelSpec.from_config(cfg)))
  return np.asarray(forward(params, toks))


def hf_logits(directory, toks):
  import torch
  import transformers
  m = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    return m(torch.tensor(toks, dtype=torch.long)).logits.numpy()


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def read_params(directory, cfg):
  """The parameters an fmjax directory holds, as numpy (one device)."""
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
  s = state_lib.setup(cfg, mesh)
  return jax.device_get(checkpoint.restore_params(directory, s.abstract_state["params"]))


def same_files(a, b):
  names = sorted(os.listdir(a))
  assert names == sorted(os.listdir(b))
  mismatch = filecmp.cmpfiles(a, b, names, shallow=False)[1:]
  assert mismatch == ([], []), mismatch


@pytest.mark.parametrize("case", EXPORT_CASES, ids=str)
def test_export_matches_transformers_and_round_trips(case, tmp_path):
  pytest.importorskip("transformers")
  cfg = tiny_config(**EXPORT_CASES[case])
  params = random_params(cfg, seed=0)
  workdir = make_workdir(str(tmp_path / "run"), cfg, params)
  out = str(tmp_path / "hf")
  # tiny shards: the index and several files are exercised
  assert convert.to_hf(workdir, out, max_shard_bytes=100_000, tokenizer="none") == 5
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == [tables.format_for(cfg.model).architecture]
  assert os.path.isfile(os.path.join(out, st.INDEX))
  toks = tokens(cfg.model.vocab_size)
  dropless = dropless_config(cfg)  # HF DeepSeek-V3 drops no tokens
  assert rel_err(hf_logits(out, toks), fmjax_logits(params, dropless, toks)) < 1e-4

  convert.from_hf(out, str(tmp_path / "back"))
  back_cfg = convert.load_workdir_config(str(tmp_path / "back"))
  unused = tables.format_for(cfg.model).unused  # fields the attention kind does not read
  assert ({k: v for k, v in back_cfg.model.items() if k not in unused} ==
          {k: v for k, v in dropless.model.items() if k not in unused})
  jax.tree.map(np.testing.assert_array_equal, read_params(str(tmp_path / "back"), cfg), params)
  convert.to_hf(str(tmp_path / "back"), str(tmp_path / "hf2"), max_shard_bytes=100_000,
                tokenizer="none")
  same_files(out, str(tmp_path / "hf2"))


def dropless_config(cfg):
  """`cfg` with dropless dispatch (a copy), the function an HF DeepSeek-V3 model computes."""
  cfg = cfg.copy_and_resolve_references()
  if cfg.model.moe.n_routed_experts:
    cfg.model.moe.dispatch = "dropless"
  return cfg


def random_hf_model(kind, tmp_path, dtype="float32"):
  """A random transformers model saved in sharded safetensors; its float32 logits."""
  import torch
  import transformers
  torch.manual_seed(0)
  common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False)
  if kind == "llama":
    config = transformers.LlamaConfig(
        **common, num_key_value_heads=2,
        rope_parameters=dict(rope_type="yarn", rope_theta=5000.0, factor=2.0,
                             original_max_position_embeddings=8), max_position_embeddings=16)
    m = transformers.LlamaForCausalLM(config)
  else:
    experts = dict(first_k_dense_replace=2, n_routed_experts=1, n_group=1, topk_group=1,
                   num_experts_per_tok=1)
    if kind == "deepseek_moe":  # layer 0 dense, 1 and 2 MoE
      common.update(num_hidden_layers=3)
      experts = dict(first_k_dense_replace=1, n_routed_experts=6, n_shared_experts=2,
                     moe_intermediate_size=16, num_experts_per_tok=2, n_group=3, topk_group=2,
                     norm_topk_prob=False, routed_scaling_factor=1.5)
    config = transformers.DeepseekV3Config(
        **common, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, **experts, num_nextn_predict_layers=0,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                             mscale_all_dim=1.0, original_max_position_embeddings=8),
        max_position_embeddings=32)
    m = transformers.DeepseekV3ForCausalLM(config)
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.1 * torch.randn_like(p))
    for name, b in m.named_buffers():  # the router bias (a buffer in transformers)
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn_like(b))
  m = m.to(getattr(torch, dtype)).float().eval()  # the values the file will hold
  out = str(tmp_path / f"{kind}_hf")
  m.to(getattr(torch, dtype)).save_pretrained(out, max_shard_size="100KB")
  toks = tokens(512)
  with torch.no_grad():
    logits = m.float()(torch.tensor(toks, dtype=torch.long)).logits.numpy()
  return out, toks, logits


@pytest.mark.parametrize("kind,dtype", [("llama", "float32"), ("deepseek", "bfloat16")])
def test_import_matches_transformers(kind, dtype, tmp_path):
  pytest.importorskip("transformers")
  directory, toks, want = random_hf_model(kind, tmp_path, dtype)
  assert os.path.isfile(os.path.join(directory, st.INDEX))
  imported = _imported(directory, tmp_path)
  cfg = convert.load_workdir_config(imported)  # the config the import wrote, as it is
  assert rel_err(fmjax_logits(read_params(imported, cfg), cfg, toks), want) < 1e-4


def test_an_imported_deepseek_moe_gives_transformers_logits_through_every_path(tmp_path):
  """from-hf's config, and init_from=HF_DIR with read_config's fields, run model.forward
  as transformers does: dropless dispatch, the (non-zero) router bias in the selection."""
  pytest.importorskip("transformers")
  directory, toks, want = random_hf_model("deepseek_moe", tmp_path)
  bias = st.Reader(directory).get("model.layers.1.mlp.gate.e_score_correction_bias")
  assert np.abs(bias).min() > 0
  imported = _imported(directory, tmp_path)
  cfg = convert.load_workdir_config(imported)  # what fmjax.sample and init_from=DIR read
  assert cfg.model.moe.dispatch == "dropless" and cfg.model.moe.balance == "aux_free"
  params = read_params(imported, cfg)
  assert rel_err(fmjax_logits(params, cfg, toks), want) < 1e-4

  direct = tiny_config(**hf.read_config(directory)[1])  # checkpoint.init_from=HF_DIR
  checkpoint.check_init_from(directory, direct.model)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
  abstract = state_lib.setup(direct, mesh).abstract_state["params"]
  hf_params = jax.device_get(checkpoint.restore_params(directory, abstract, direct.model))
  assert rel_err(fmjax_logits(hf_params, direct, toks), want) < 1e-4

  # capacity dispatch drops tokens of this model, so it computes another function,
  # and init_from refuses it
  capacity = direct.copy_and_resolve_references()
  capacity.model.moe.dispatch = "capacity"
  assert rel_err(fmjax_logits(hf_params, capacity, toks), want) > 1e-2
  with pytest.raises(FormatError, match=r"^model.moe.dispatch='capacity' drops tokens that "
                                        r"transformers runs through the experts of .*; set "
                                        r"model.moe.dispatch='dropless'"):
    checkpoint.check_init_from(directory, capacity.model)


def _imported(directory, tmp_path):
  out = str(tmp_path / "imported")
  convert.from_hf(directory, out)
  return out


def test_the_tokenizer_exports_for_transformers(tok, tmp_path):
  transformers = pytest.importorskip("transformers")
  hf.write_tokenizer(str(tmp_path), tok.path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in ["And God said, Let there be light.", "  two  spaces\n\tand a tab",
               "héllo wörld ✓ 日本語", "def f(x):\n    return x + 1\n"]:
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text)
    assert hf_tok.decode(ids) == text
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
      tok.bos_id, tok.eos_id, tok.pad_id)


def test_init_from_an_hf_directory(tmp_path, data_dir):
  cfg = tiny_config(vocab_size=512)
  cfg.data.update(data_dir=data_dir, mixture="synthetic", eval_batches=1)
  cfg.train.update(steps=1, log_every=1, eval_every=0, sample_tokens=0, progress=False)
  cfg.checkpoint.update(every=0, keep=1)
  params = random_params(cfg, seed=3)
  hf_dir = str(tmp_path / "hf")
  convert.to_hf(make_workdir(str(tmp_path / "src"), cfg, params), hf_dir, tokenizer="none")

  other = tiny_config(vocab_size=512, n_layers=3)
  other.checkpoint.init_from = hf_dir
  with pytest.raises(FormatError, match="model.n_layers=3 but the checkpoint in .* has 2"):
    checkpoint.check_init_from(hf_dir, other.model)

  cfg.checkpoint.init_from = hf_dir
  loop.run(cfg, str(tmp_path / "run"))
  s = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
  with checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=1) as ckpt:
    after = jax.device_get(ckpt.restore(1, s.abstract_state))
  assert int(after["step"]) == 1
  # one AdamW step of lr 1e-3 from the HF parameters, not from a random init
  for a, p in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(params)):
    assert np.abs(a - p).max() < 2.5e-3


@pytest.mark.parametrize("model_fields,needle", [
    (dict(rope_scaling=dict(kind="ntk", factor=2.0)),
     "model.rope_scaling.kind='ntk' has no equivalent in the llama format"),
    (dict(MLA, norm_eps=1e-5), "model.norm_eps=1e-05: the deepseek_v3 format holds only 1e-06"),
    (dict(n_experts=8), "model.n_experts=8 has no place in the llama format"),
    (dict(moe=dict(MOE)), "model.moe.score='sigmoid': the mixtral format (MixtralForCausalLM) "
     "routes with score='softmax' only"),
    (dict(qk_norm=True, sliding_window=8), "model.qk_norm=True has no place in the llama "
     "format (LlamaForCausalLM), the closest to this model; qwen3, qwen3_moe and "
     "gemma3_text hold it"),
    (dict(MLA, moe=dict(MOE, score="softmax")), "model.moe.score='softmax': HF DeepSeek-V3 "
     "routes with sigmoid scores only"),
    (dict(MLA, moe=dict(MOE, moe_layer_freq=2)), "model.moe.moe_layer_freq=2: HF DeepSeek-V3 "
     "makes every layer after the first_k_dense MoE"),
    (dict(MLA, moe=dict(MOE, n_shared_experts=0)), "model.moe.n_shared_experts=0: HF "
     "DeepSeek-V3 MoE layers always have shared experts"),
    (dict(MLA, moe=dict(MOE, n_group=4, topk_group=2)), "model.moe.n_group=4 with 4 experts"),
    (dict(MLA, mtp_depth=1), "model.mtp_depth=1: multi-token prediction (MTP) modules are not "
     "converted"),
], ids=["ntk", "mla_norm_eps", "a_field_no_table_holds", "moe_in_gqa", "qk_norm_and_window",
         "moe_softmax",
        "moe_layer_freq", "moe_no_shared", "moe_groups_of_one", "mtp"])
def test_what_a_format_cannot_hold_is_refused(tmp_path, model_fields, needle):
  cfg = tiny_config()
  cfg.model.update(model_fields)  # n_experts stands for any field added without a table row
  with pytest.raises(FormatError, match="^" + re.escape(needle)) as e:
    config_map.check_model(cfg.model)
  assert "\n" not in str(e.value)


def test_the_command_line(tmp_path, capsys, monkeypatch):
  cfg = tiny_config()
  make_workdir(str(tmp_path / "run"), cfg, random_params(cfg, 0))
  r = subprocess.run([sys.executable, "-m", "fmjax.convert", "to-hf", "--workdir=run", "--out=hf",
                      "--tokenizer=none", "--dtype=bfloat16"], cwd=tmp_path,
                     env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  assert "wrote hf from checkpoint 5 of run" in r.stdout
  monkeypatch.chdir(tmp_path)
  assert convert.main(["from-hf", "--hf=hf", "--out=back"]) == 0
  back = read_params(str(tmp_path / "back"), cfg)
  assert back["embed"].dtype == np.float32  # bfloat16 on disk, float32 in fmjax
  np.testing.assert_allclose(back["embed"], random_params(cfg, 0)["embed"], rtol=1e-2)
  # errors: one line, exit status 1, nothing written
  capsys.readouterr()
  assert convert.main(["from-hf", "--hf=run", "--out=x"]) == 1
  assert capsys.readouterr().err == f"fmjax: no {st.WEIGHTS} or {st.INDEX} in run\n"
  assert convert.main(["to-hf", "--workdir=run", "--out=hf", "--tokenizer=none"]) == 1
  assert capsys.readouterr().err.startswith(f"fmjax: --out={tmp_path / 'hf'} exists and is not empty")
  assert convert.main(["to-hf", "--workdir=run", "--out=y", "--step=4", "--tokenizer=none"]) == 1
  assert "fmjax: no checkpoint 4 in" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_a_router_bias_fmjax_does_not_select_with_exports_as_zeros(tmp_path):
  """With balance='aux' fmjax's selection ignores the bias; HF's always adds it."""
  pytest.importorskip("transformers")
  cfg = tiny_config(**MLA, moe=dict(MOE, balance="aux", first_k_dense=0))
  params = random_params(cfg, seed=2)
  assert np.abs(params["moe_layers"]["router_bias"]).min() > 0
  out = str(tmp_path / "hf")
  convert.to_hf(make_workdir(str(tmp_path / "run"), cfg, params), out, tokenizer="none")
  reader = st.Reader(out)
  assert not reader.get("model.layers.0.mlp.gate.e_score_correction_bias").any()
  toks = tokens(cfg.model.vocab_size)
  assert rel_err(hf_logits(out, toks), fmjax_logits(params, dropless_config(cfg), toks)) < 1e-4
  _, fields = hf.read_config(out)  # imported, the (zero) bias selects: the same routing
  assert fields["moe"]["balance"] == "aux_free"


@pytest.mark.parametrize("change,needle", [
    (dict(scoring_func="softmax"), "scoring_func='softmax' is not supported"),
    (dict(topk_method="greedy"), "topk_method='greedy' is not supported"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2 is not supported"),
    (dict(n_shared_experts=0), "n_shared_experts=0 is not supported"),
    (dict(n_group=None), "n_group is missing"),
])
def test_an_hf_mixture_of_experts_fmjax_cannot_hold_is_refused(change, needle):
  hf_cfg = config_map.to_hf_config(tiny_config(**MLA, n_layers=3, moe=MOE).model, seq_len=32)
  want = tiny_config(moe=dict(MOE, dispatch="dropless")).model.moe
  assert config_map.model_fields(hf_cfg)["moe"] == dict(want)
  with pytest.raises(FormatError, match=re.escape(needle)) as e:
    config_map.model_fields(dict(hf_cfg, **change))
  assert "\n" not in str(e.value)
