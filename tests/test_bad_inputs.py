"""The bad-input catalogue: every mistake stops the run with a one-line message naming
the bad value, a non-zero exit status, and no file in the workdir changed.

Most cases call `fmjax.main.train` (what the command line runs once its flags
are parsed) in this process; the flag cases run the command line itself.
Hugging Face directories are given as `checkpoint.init_from`.
"""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from conftest import tiny_config, tree_hash
from fmjax.train import checkpoint, workdir as workdir_lib
from fmjax import convert, main as main_lib
from fmjax.hf import safetensors_files as hf
from fmjax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512


def config(data_dir, **model):
  c = tiny_config(vocab_size=VOCAB, **model)
  c.data.update(data_dir=data_dir, eval_batches=1)
  c.optimizer.update(warmup_steps=1, decay_steps=2)
  c.train.update(steps=2, log_every=1, eval_every=0, sample_tokens=0, progress=False)
  c.checkpoint.update(every=1, keep=2)
  return c


@pytest.fixture(scope="module")
def built_data(data_dir):
  tokenizer_lib.load_or_train(data_dir, VOCAB)  # builds the corpus too
  return data_dir


@pytest.fixture(scope="module")
def trained(built_data, tmp_path_factory):
  """A workdir with checkpoints at steps 1 and 2."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  assert main_lib.train(config(built_data), workdir) == 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  """A private copy of the trained workdir."""
  path = str(tmp_path / "run")
  shutil.copytree(trained, path)
  return path


def expect_refusal(capsys, workdir, cfg, needle, status=2, allow_config_change=False):
  before = tree_hash(workdir)
  capsys.readouterr()
  assert main_lib.train(cfg, workdir, allow_config_change) == status
  err = capsys.readouterr().err.strip()
  last = err.splitlines()[-1]
  assert last.startswith("fmjax: "), err
  assert needle in last, err
  assert tree_hash(workdir) == before, "the workdir changed"
  return last


def with_value(cfg, path, value):
  """`cfg` with `path` set to `value`, whatever its type (as a saved config could have it)."""
  d = cfg.to_dict()
  *parents, leaf = path.split(".")
  node = d
  for p in parents:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(d)


# -- config values and mesh shapes: caught before anything is read --------------------

CONFIG_CASES = [
    ("train.nonfinite", "sometimes", "train.nonfinite='sometimes' is not one of skip, restore, halt"),
    ("train.nonfinite_max_consecutive", 0, "train.nonfinite_max_consecutive=0 must be > 0"),
    ("train.spike_decay", 1.0, "train.spike_decay=1.0 must be in (0, 1)"),
    ("train.spike_zscore", -1.0, "train.spike_zscore=-1.0 must be >= 0"),
    ("checkpoint.keep", 0, "checkpoint.keep=0 must be > 0"),
    ("checkpoint.every", -5, "checkpoint.every=-5 must be >= 0"),
    ("data.tokenizer", "wordpiece", "data.tokenizer='wordpiece' is not one of bpe, unigram"),
    ("optimizer.wsd_decay_fraction", 0.0, "optimizer.wsd_decay_fraction=0.0 must be in (0, 1]"),
    ("model.head_dim", 7, "head dim 7 must be even"),
    ("model.rope_theta", 0.0, "model.rope_theta=0.0 must be > 0"),
    ("train.log_every", 0, "train.log_every=0 must be > 0"),
    ("model.d_model", "64", "model.d_model='64' has type str, expected int"),
    ("objective.z_loss", -1.0, "objective.z_loss=-1.0 must be >= 0"),
    ("data.num_workers", -1, "data.num_workers=-1 must be >= 0"),
    ("model.vocab_size", 300, "model.vocab_size=300 is below 326"),
    ("checkpoint.evry", 5, "unknown config field checkpoint.evry (did you mean checkpoint.every?)"),
]

MESH_CASES = [
    ("mesh.fsdp", -1, "mesh: only one axis may be -1, got data, fsdp"),
    ("mesh.data", 3, "mesh: fixed axes multiply to 3, which does not divide the 8 devices"),
    ("mesh.tensor", 16, "mesh: fixed axes multiply to 16, which does not divide the 8 devices"),
    ("mesh.expert", 0, "mesh.expert=0: axis sizes must be >= 1"),
    ("sharding.params.embed", "fsdp,fsdp", "sharding.params.embed='fsdp,fsdp' repeats a mesh axis"),
    ("train.batch_size", 4, "microbatch size 4 (train.batch_size/train.microbatches) is not divisible by the 8 batch shards"),
]


@pytest.mark.parametrize("path,value,needle", CONFIG_CASES + MESH_CASES,
                         ids=[c[0] for c in CONFIG_CASES + MESH_CASES])
def test_bad_config_value(capsys, trained, built_data, path, value, needle):
  cfg = with_value(config(built_data), path, value)
  if path == "mesh.data":
    cfg.mesh.fsdp = -1
  expect_refusal(capsys, trained, cfg, needle)


def test_mesh_that_cannot_split_the_kv_heads(capsys, trained, built_data):
  cfg = config(built_data)
  cfg.mesh.update(data=1, tensor=-1)  # 2 KV heads over 8 tensor shards
  expect_refusal(capsys, trained, cfg, "does not split over mesh axes tensor (8 ways)")


# -- data files -----------------------------------------------------------------------


@pytest.fixture
def data_copy(built_data, tmp_path):
  path = str(tmp_path / "data")
  shutil.copytree(built_data, path)
  return path


def _train_file(data_dir):
  return os.path.join(data_dir, "kjv", "1.0.0", "kjv-train.array_record-00000-of-00001")


def _garbage_tokenizer(d):
  with open(tokenizer_lib.model_path(d, VOCAB), "wb") as f:
    f.write(b"not a sentencepiece model")
  return "could not parse ModelProto"


def _truncated_corpus(d):
  os.truncate(_train_file(d), os.path.getsize(_train_file(d)) // 2)
  return "Riegeli"


def _garbage_dataset_info(d):
  with open(os.path.join(d, "kjv", "1.0.0", "dataset_info.json"), "w") as f:
    f.write("{not json")
  return "JSON"


def _file_instead_of_directory(d):
  shutil.rmtree(d)
  with open(d, "w") as f:
    f.write("a file")
  return "Not a directory"


@pytest.mark.parametrize("damage", [_garbage_tokenizer, _truncated_corpus,
                                    _garbage_dataset_info, _file_instead_of_directory],
                         ids=lambda f: f.__name__.strip("_"))
def test_unreadable_data(capsys, trained, data_copy, damage):
  detail = damage(data_copy)
  last = expect_refusal(capsys, trained, config(data_copy), f"data.data_dir={data_copy}",
                        status=1)
  assert detail in last


def test_tokenizer_larger_than_the_model_vocabulary(capsys, trained, data_copy):
  # A 1024-piece tokenizer where the 512-piece one should be.
  model = tokenizer_lib.train(data_copy, 1024)
  with open(tokenizer_lib.model_path(data_copy, VOCAB), "wb") as f:
    f.write(model)
  assert spm.SentencePieceProcessor(model_proto=model).vocab_size() == 1024
  expect_refusal(capsys, trained, config(data_copy),
                 "has 1024 pieces but the model's vocab_size is 512")


# -- the workdir and its checkpoints --------------------------------------------------


@pytest.mark.parametrize("change,needle", [
    (dict(d_model=96), "has shape (512, 64) for params/embed but the config needs (512, 96)"),
    (dict(n_layers=3), "has shape (2, 64) for params/layers/attn_norm but the config needs (3, 64)"),
    (dict(tie_embeddings=True), "has shape (64, 512) for params/unembed but the config needs no array"),
], ids=["d_model", "n_layers", "tie_embeddings"])
def test_resume_with_another_model_shape(capsys, workdir, built_data, change, needle):
  expect_refusal(capsys, workdir, config(built_data, **change), needle,
                 allow_config_change=True)


def test_resume_with_another_optimizer(capsys, workdir, built_data):
  cfg = config(built_data)
  cfg.optimizer.name = "lion"
  expect_refusal(capsys, workdir, cfg, "for opt_state/inner_state/1/0/nu/embed but the config "
                 "needs no array", allow_config_change=True)


def test_resume_with_a_different_config_is_refused(capsys, workdir, built_data):
  cfg = config(built_data, d_model=96)
  cfg.optimizer.lr = 0.5
  expect_refusal(capsys, workdir, cfg, "was made by a different config (model.d_model: 64 -> 96; "
                 "optimizer.lr: 0.001 -> 0.5)")


def test_unreadable_saved_config(capsys, workdir, built_data):
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{truncated")
  expect_refusal(capsys, workdir, config(built_data), "config.json is unreadable")


def test_workdir_in_use(capsys, workdir, built_data):
  with workdir_lib.lock(workdir):
    expect_refusal(capsys, workdir, config(built_data), f"is in use by process {os.getpid()}",
                   status=1)


def test_every_checkpoint_corrupt(capsys, workdir, built_data):
  for step in ("1", "2"):
    os.remove(os.path.join(workdir, "checkpoints", step, "state", "_METADATA"))
  last = expect_refusal(capsys, workdir, config(built_data), "no usable checkpoint in", status=1)
  assert "tried steps 2, 1" in last


def test_checkpoint_with_non_finite_values_is_never_written(tmp_path, trained, built_data):
  import jax
  import jax.numpy as jnp
  from fmjax.nn import sharding
  from fmjax.train import state as state_lib

  cfg = config(built_data)
  s = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
  with checkpoint.Checkpointer(os.path.join(trained, "checkpoints"), keep=2) as ckpt:
    state = ckpt.restore(2, s.abstract_state)
  state["params"]["final_norm"] = state["params"]["final_norm"].at[0].set(jnp.inf)
  target = str(tmp_path / "ckpt")
  with checkpoint.Checkpointer(target, keep=2) as ckpt:
    with pytest.raises(checkpoint.NonFiniteCheckpoint, match="the state at step 3 has NaN or Inf"):
      ckpt.save(3, jax.block_until_ready(state))
  assert os.listdir(target) == []


# -- Hugging Face directories as checkpoint.init_from --------------------------------


@pytest.fixture(scope="module")
def hf_dir(trained, tmp_path_factory):
  """The trained model exported in the Llama format, in several safetensors files."""
  out = str(tmp_path_factory.mktemp("hf") / "llama")
  convert.to_hf(trained, out, max_shard_bytes=200_000)
  assert os.path.isfile(os.path.join(out, hf.INDEX))
  return out


def rewrite_weights(directory, change):
  """Applies `change` to the dict of every tensor, and writes them back as one file."""
  reader = hf.Reader(directory)
  tensors = {name: reader.get(name) for name in sorted(reader.names())}
  change(tensors)
  for name in os.listdir(directory):
    if name.endswith(".safetensors") or name == hf.INDEX:
      os.remove(os.path.join(directory, name))
  writer = hf.Writer(directory, [(n, x.dtype, x.shape) for n, x in tensors.items()], 1 << 40)
  for name, x in tensors.items():
    writer.write(name, x)
  writer.close()


def _edit_config(**changes):
  def damage(d):
    with open(os.path.join(d, "config.json")) as f:
      c = json.load(f)
    c.update(changes)
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump(c, f)
  return damage


def _garbage_config(d):
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write("{not json")


def _no_weights(d):
  for name in os.listdir(d):
    if name.endswith(".safetensors") or name == hf.INDEX:
      os.remove(os.path.join(d, name))


def _missing_shard(d):
  os.remove(os.path.join(d, sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[-1]))


def _truncated_shard(d):
  path = os.path.join(d, sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[0])
  os.truncate(path, os.path.getsize(path) - 100)


def _drop(name):
  return lambda d: rewrite_weights(d, lambda t: t.pop(name))


def _add(name, shape):
  return lambda d: rewrite_weights(d, lambda t: t.update({name: np.zeros(shape, np.float32)}))


def _reshape(name):
  return lambda d: rewrite_weights(d, lambda t: t.update({name: t[name][:-1]}))


HF_CASES = {
    "garbage_config": (_garbage_config, "config.json is unreadable (JSONDecodeError"),
    "another_architecture": (_edit_config(model_type="phi3"), "model_type='phi3' is not "
                             "supported; fmjax converts llama, qwen2, qwen3, mistral, qwen3_moe, "
                             "mixtral, deepseek_v3, gemma, gemma2, gemma3_text models"),
    "rope_longrope": (_edit_config(rope_scaling=dict(rope_type="longrope", factor=8.0)),
                      "rope scaling type 'longrope' is not supported; fmjax has linear, yarn, "
                      "llama3"),
    "unknown_field": (_edit_config(some_switch=1), "some_switch=1 is not a llama setting fmjax "
                      "understands; nothing is dropped silently"),
    "biases": (_edit_config(attention_bias=True), "attention_bias=True is not supported"),
    "moe_softmax": (_edit_config(model_type="deepseek_v3", n_routed_experts=8,
                                 first_k_dense_replace=1, scoring_func="softmax"),
                    "scoring_func='softmax' is not supported; fmjax converts DeepSeek-V3 "
                    "mixtures of experts with scoring_func='sigmoid'"),
    "quantized": (_edit_config(quantization_config={"quant_method": "fp8"}),
                  "quantized checkpoints (quantization_config) are not supported"),
    "another_model": (_edit_config(num_hidden_layers=3), "model.n_layers=2 but the checkpoint in"),
    "no_weights": (_no_weights, "no model.safetensors or model.safetensors.index.json in"),
    "missing_shard": (_missing_shard, "safetensors is missing"),
    "truncated_shard": (_truncated_shard, "is not a readable safetensors file"),
    "missing_tensor": (_drop("model.layers.1.mlp.up_proj.weight"),
                       "has no tensor model.layers.1.mlp.up_proj.weight (for fmjax's layers.w_up)"),
    "wrong_shape": (_reshape("model.norm.weight"), "tensor model.norm.weight in {d} has shape "
                    "[63] but its config.json needs [64]"),
    "extra_tensor": (_add("model.layers.0.self_attn.q_proj.bias", (64,)),
                     "tensor model.layers.0.self_attn.q_proj.bias has no place in fmjax's llama "
                     "model; nothing is dropped silently"),
    "mtp": (_add("model.layers.2.eh_proj.weight", (64, 128)),
            "multi-token prediction (MTP) modules (model.layers.2.eh_proj.weight, ...) are not "
            "supported"),
}


@pytest.mark.parametrize("damage,needle", HF_CASES.values(), ids=HF_CASES.keys())
def test_hf_directories(capsys, hf_dir, built_data, tmp_path, damage, needle):
  copy = str(tmp_path / "hf")
  shutil.copytree(hf_dir, copy)
  damage(copy)
  cfg = config(built_data)
  cfg.checkpoint.init_from = copy
  expect_refusal(capsys, str(tmp_path / "run"), cfg, needle.format(d=copy))


def test_non_finite_hf_weights_are_not_imported(hf_dir, tmp_path):
  copy = str(tmp_path / "hf")
  shutil.copytree(hf_dir, copy)
  rewrite_weights(copy, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__(
      (3, 4), np.nan))
  with pytest.raises(hf.FormatError, match="model.layers.1.mlp.up_proj.weight in .* has NaN"):
    convert.from_hf(copy, str(tmp_path / "back"))
  assert os.listdir(tmp_path) == ["hf"]  # nothing written, no temporary left


# -- the command line ---------------------------------------------------------------


def run_main(*args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "fmjax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture
def experiment_that_raises(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(arg=None):\n  raise ValueError('no such variant: ' + str(arg))\n")
  return str(path)


CLI_CASES = [
    (["--config.train.steps=ten"], "--config.train.steps=ten"),
    (["--no_such_flag"], "no_such_flag"),
    (["--config.train.nonfinite=sometimes"], "train.nonfinite='sometimes'"),
    (["--allow_config_change=maybe"], "maybe"),
    ("broken", "no such variant: big"),
    ("no_workdir", "--workdir is required"),
]


@pytest.mark.parametrize("flags,needle", CLI_CASES, ids=[
    "steps_not_an_int", "unknown_flag", "nonfinite_policy", "bool_flag", "experiment_raises",
    "no_workdir"])
def test_bad_command_line(trained, experiment_that_raises, flags, needle):
  args = ["--config=experiments/pretrain_tiny.py", f"--workdir={trained}"]
  if flags == "broken":
    args = [f"--config={experiment_that_raises}:big", f"--workdir={trained}"]
  elif flags == "no_workdir":
    args = args[:1]
  else:
    args += flags
  before = tree_hash(trained)
  r = run_main(*args)
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("fmjax: ") and needle in last, r.stderr
  assert tree_hash(trained) == before
