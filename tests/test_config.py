"""Config validation: each mistake gets a one-line error naming the field."""

import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from fmjax.validate import validate
from fmjax import config as config_lib
from fmjax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(cfg, path, value):
  *parents, leaf = path.split(".")
  node = cfg
  for p in parents:
    if p not in node:
      node[p] = {}
    node = node[p]
  node[leaf] = value


BAD = [
    ("model.d_modle", 64, "unknown config field model.d_modle (did you mean model.d_model?)"),
    ("trian.steps", 3, "unknown config field trian"),
    ("model.n_heads", 5, "model.n_heads=5 does not divide model.d_model=64"),
    ("model.n_kv_heads", 3, "model.n_kv_heads=3 must divide model.n_heads=4"),
    ("model.dtype", "float16", "model.dtype='float16' is not one of float32, bfloat16"),
    ("model.remat", "some", "model.remat='some' is not one of none, full, dots"),
    ("model.vocab_size", 0, "model.vocab_size=0 must be > 0"),
    ("model.vocab_size", 300, "model.vocab_size=300 is below 326"),
    ("optimizer.schedule", "linear", "optimizer.schedule='linear' is not one of cosine, wsd, constant"),
    ("optimizer.name", "sgd", "optimizer.name='sgd' is not one of adamw, lion"),
    ("optimizer.lr", -1.0, "optimizer.lr=-1.0 must be > 0"),
    ("optimizer.min_lr_ratio", 2.0, "optimizer.min_lr_ratio=2.0 must be in [0, 1]"),
    ("train.steps", 0, "train.steps=0 must be > 0"),
    ("train.microbatches", 3, "train.microbatches=3 must divide train.batch_size=8"),
    ("train.batch_size", 12, "microbatch size 12 (train.batch_size/train.microbatches) is not divisible by the 8 batch shards"),
    ("mesh.tensor", 3, "mesh: fixed axes multiply to 3, which does not divide the 8 devices"),
    ("mesh.fsdp", 0, "mesh.fsdp=0: axis sizes must be >= 1"),
    ("sharding.params.embed", "fsdb", "sharding.params.embed='fsdb' names mesh axis 'fsdb'"),
    ("sharding.activations.batch", "data,data", "sharding.activations.batch='data,data' repeats a mesh axis"),
    ("data.seq_len", 1, "data.seq_len=1 must be >= 2"),
    ("data.mixture", "c4", "data.mixture='c4': unknown source 'c4'"),
    ("objective.name", "ppo", "objective.name='ppo' is not one of next_token, sft, dpo, contrastive"),
    ("objective.ce_chunk", 24, "objective.ce_chunk=24 must divide data.seq_len=32"),
    ("objective.ce_chunk", -8, "objective.ce_chunk=-8 must be >= 0"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[b[0] for b in BAD])
def test_invalid_field_names_itself(path, value, message):
  cfg = tiny_config()
  _set(cfg, path, value)
  with pytest.raises(config_lib.ConfigError) as e:
    validate(cfg, n_devices=8)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_wrong_type_from_a_saved_config():
  cfg = config_lib.from_json(config_lib.to_json(tiny_config()).replace('"d_model": 64', '"d_model": "64"'))
  with pytest.raises(config_lib.ConfigError, match="model.d_model='64' has type str, expected int"):
    validate(cfg, n_devices=8)


def test_mesh_product_must_match_devices():
  cfg = tiny_config()
  cfg.mesh.update(data=2, fsdp=2, tensor=1)
  with pytest.raises(config_lib.ConfigError, match="needs 4 devices but 8 are present"):
    validate(cfg, n_devices=8)


def test_mesh_minus_one_takes_the_rest():
  cfg = tiny_config()
  cfg.mesh.update(data=-1, fsdp=2, tensor=2)
  assert validate(cfg, n_devices=8) == dict(data=2, fsdp=2, expert=1, tensor=2)


def test_colliding_logical_axes_are_rejected():
  from fmjax.nn import sharding
  rules = {"embed": "fsdp", "heads": "fsdp,tensor"}
  with pytest.raises(config_lib.ConfigError, match="'embed' and 'heads' both map to mesh axis 'fsdp'"):
    sharding.spec(("embed", "heads"), rules, "param wq")


def test_config_changes_ignore_resumable_fields():
  old = tiny_config().to_dict()
  new = tiny_config()
  new.train.steps = 99
  new.mesh.fsdp = 2
  assert main_lib.config_changes(old, new.to_dict()) == []
  new.optimizer.lr = 0.5
  assert main_lib.config_changes(old, new.to_dict()) == ["optimizer.lr: 0.001 -> 0.5"]


def run_main(*args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "fmjax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


CLI_ERRORS = [
    (["--config.model.d_modle=3"], "unknown config field"),
    (["--config.model.d_model=abc"], "--config.model.d_model=abc"),
    (["--config.model.n_heads=5"], "model.n_heads=5 does not divide model.d_model=192"),
    (["--config.mesh.data=3"], "mesh data=3"),
    (["--config.model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
]


@pytest.mark.parametrize("flags,message", CLI_ERRORS, ids=[f[0][0] for f in CLI_ERRORS])
def test_cli_errors_exit_nonzero_and_leave_workdir_untouched(tmp_path, flags, message):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("precious")
  before = sorted(os.listdir(workdir))
  r = run_main("--config=experiments/pretrain_tiny.py", f"--workdir={workdir}", *flags)
  assert r.returncode != 0
  assert message in r.stderr, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("fmjax:"), r.stderr
  assert sorted(os.listdir(workdir)) == before
  assert (workdir / "keep.txt").read_text() == "precious"


def test_cli_missing_experiment_file(tmp_path):
  r = run_main("--config=experiments/nope.py", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2
  assert "--config=experiments/nope.py: no such experiment file" in r.stderr
  assert not (tmp_path / "w").exists()
