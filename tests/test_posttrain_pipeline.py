"""The shipped pipeline pretrain_tiny -> sft_tiny -> dpo_tiny, and contrastive_tiny, end to end
at a few steps, through the training loop and the export of merged LoRA weights."""

import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest

from fmjax.train import checkpoint, loop, state as state_lib
from fmjax import export
from fmjax.posttrain import lora, plan as posttrain
from fmjax.nn import sharding
from fmjax.data import tasks, tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name, data_dir, **overrides):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.data.update(data_dir=data_dir, eval_batches=1)
  cfg.train.update(steps=2, batch_size=8, log_every=1, eval_every=0, progress=False,
                   sample_tokens=0)
  cfg.checkpoint.update(every=0, keep=1)
  for path, value in overrides.items():
    section, field = path.split("__")
    cfg[section][field] = value
  return cfg


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """Stage 1 is pretrain_tiny's model at init, saved as a checkpoint (the loop's pretraining
  is tested elsewhere); the later stages run through the loop from it."""
  root = tmp_path_factory.mktemp("pipeline")
  tokenizer_lib.load_or_train(data_dir, 2048)
  cfg = experiment("pretrain_tiny", data_dir)
  s = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
  with checkpoint.Checkpointer(str(root / "pretrain_tiny" / "checkpoints"), keep=1) as ckpt:
    ckpt.save(0, state_lib.init_state(s, seed=0))
  out = {}
  steps = [("sft_tiny", dict(data__seq_len=96, data__task_size=200)),
           ("dpo_tiny", dict(data__task_size=40)),
           ("contrastive_tiny", dict(data__seq_len=64))]
  previous = {"sft_tiny": "pretrain_tiny", "dpo_tiny": "sft_tiny",
              "contrastive_tiny": "pretrain_tiny"}
  for name, overrides in steps:
    cfg = experiment(name, data_dir, **overrides)
    if name in previous:
      cfg.checkpoint.init_from = str(root / previous[name])
    out[name] = (cfg, str(root / name), loop.run(cfg, str(root / name)))
  return out


def test_sft_then_dpo_with_lora_from_the_previous_stage(runs):
  cfg, workdir, summary = runs["sft_tiny"]
  assert summary["trained_params"] == summary["params"]
  first = records(workdir)[0]
  assert first["tokens"] > 0 and math.isfinite(first["loss"])
  cfg, workdir, summary = runs["dpo_tiny"]
  assert 0 < summary["trained_params"] < summary["params"] / 5  # the adapters only
  first, last_eval = records(workdir)[0], [r for r in records(workdir) if "eval_loss" in r][-1]
  # Step 1: LoRA's B is zero, so the policy is the SFT model, which is the reference.
  assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
  assert abs(first["rewards/margins"]) < 1e-4
  for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies"):
    assert f"eval_{k}" in last_eval
  # The frozen base is the SFT model's, bit for bit.
  s = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1) as ckpt:
    params = jax.device_get(ckpt.restore(2, s.abstract_state)["params"])
  sft_params = jax.device_get(checkpoint.restore_params(
      runs["sft_tiny"][1], posttrain.model_shardings(s.abstract_state["params"])))
  jax.tree.map(np.testing.assert_array_equal, {k: params[k] for k in sft_params}, sft_params)


def test_export_merges_the_adapters(runs, tmp_path):
  cfg, workdir, _ = runs["dpo_tiny"]
  export.main([f"--workdir={workdir}", f"--out={tmp_path / 'merged'}"])
  s = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1) as ckpt:
    params = jax.device_get(ckpt.restore(2, s.abstract_state)["params"])
  merged = jax.device_get(checkpoint.restore_params(
      str(tmp_path / "merged"), posttrain.model_shardings(s.abstract_state["params"])))
  expected = lora.merge(params, cfg.lora)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               merged, expected)
  assert set(merged) == set(expected)


def test_contrastive_reports_retrieval_on_all_held_out_pairs(runs, data_dir):
  _, workdir, summary = runs["contrastive_tiny"]
  evaluation = [r for r in records(workdir) if "eval_loss" in r][-1]
  held_out = len(tasks.PassagePairs(data_dir, "validation"))
  assert evaluation["eval_pairs"] == held_out - held_out % 8 > 40  # one batch of them all
  assert 0 <= evaluation["eval_accuracy"] <= evaluation["eval_recall_at_5"] <= 1
  assert 0.01 < evaluation["eval_temperature"] <= 0.08
