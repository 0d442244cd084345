"""init_from: a run starts from another run's parameters (stage 2), with a fresh optimizer."""

import json
import os

import jax
import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (the experiment files import fmjax.config)

from conftest import tiny_config
from fmjax.train import checkpoint, loop, state as state_lib
from fmjax import config as config_lib
from fmjax.nn import sharding
from fmjax.data import synthetic
from fmjax.validate import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """A workdir holding one checkpoint of a random state (step 7) made on a data=8 mesh."""
  cfg, seed = tiny_config(vocab_size=512), 1
  workdir = str(tmp_path_factory.mktemp("stage1"))
  s = state_lib.setup(cfg, sharding.make_mesh(dict(cfg.mesh, data=8, fsdp=1, tensor=1)))
  state = state_lib.init_state(s, seed)
  state["step"] = state["step"] + 7
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  ckpt.save(7, state)
  ckpt.wait()
  ckpt.close()
  return workdir, jax.device_get(state["params"])


def test_restore_params_onto_another_mesh_with_a_fresh_optimizer(stage1, tmp_path):
  cfg = tiny_config(vocab_size=512)
  workdir, params = stage1
  assert checkpoint.latest_checkpoint(workdir) == (os.path.join(workdir, "checkpoints"), 7)
  assert checkpoint.latest_checkpoint(os.path.join(workdir, "checkpoints"))[1] == 7
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.sharding.params.embed = "fsdp"
  s = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
  restored = checkpoint.restore_params(workdir, s.abstract_state["params"])
  state = state_lib.init_state(s, seed=0, params=restored)
  assert int(state["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), params)
  jax.tree.map(lambda x, sh: x.sharding.is_equivalent_to(sh, x.ndim) or pytest.fail(str(sh)),
               state["params"], s.state_shardings["params"])
  # AdamW's state is fresh: zero moments, zero counts (apply_if_finite's last_finite flag
  # is the one boolean, and starts True).
  leaves = jax.tree.leaves(jax.device_get(state["opt_state"]))
  assert all((x == 0).all() for x in leaves if x.dtype != bool)
  assert all(x.all() for x in leaves if x.dtype == bool)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint.latest_checkpoint(str(tmp_path / "nowhere"))


def test_a_run_starts_from_init_from_and_records_the_data_entropy(stage1, tmp_path, data_dir):
  cfg = tiny_config(vocab_size=512)
  cfg.data.update(data_dir=data_dir, mixture="synthetic", eval_batches=1)
  cfg.train.update(steps=1, log_every=1, eval_every=0, sample_tokens=0, progress=False, seed=5)
  cfg.checkpoint.update(every=0, keep=1)
  workdir, params = stage1
  cfg.checkpoint.init_from = str(tmp_path / "nowhere")
  with pytest.raises(config_lib.ConfigError, match="no checkpoint in"):
    loop.run(cfg, str(tmp_path / "stage2"))
  assert not os.path.exists(tmp_path / "stage2")  # refused before writing anything
  cfg.checkpoint.init_from = workdir
  summary = loop.run(cfg, str(tmp_path / "stage2"))
  assert summary["data_entropy_nats"] == synthetic.Chain().entropy_rate()
  with open(tmp_path / "stage2" / "summary.json") as f:
    assert json.load(f)["data_entropy_nats"] == summary["data_entropy_nats"]
  s = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "stage2" / "checkpoints"), keep=1)
  after = jax.device_get(ckpt.restore(1, s.abstract_state))
  ckpt.close()
  assert int(after["step"]) == 1
  # One step of lr 1e-3 from the stage-1 parameters (of init seed 1; this run's is 5).
  for a, p in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(params)):
    assert np.abs(a - p).max() < 2.5e-3


def test_the_stage_two_experiment_is_valid():
  from ml_collections import config_flags as _  # noqa: F401
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "continue_pretrain_tiny", os.path.join(REPO, "experiments", "continue_pretrain_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  validate(cfg, n_devices=8)
  assert cfg.checkpoint.init_from == "runs/pretrain_tiny"
  base = config_lib.base()
  stage1 = importlib.util.spec_from_file_location(
      "pretrain_tiny", os.path.join(REPO, "experiments", "pretrain_tiny.py"))
  m1 = importlib.util.module_from_spec(stage1)
  stage1.loader.exec_module(m1)
  assert cfg.model.to_dict() == m1.get_config().model.to_dict() != base.model.to_dict()
