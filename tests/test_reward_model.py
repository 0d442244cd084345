"""The reward model objective: Bradley-Terry against a closed form, learning a preference,
and preference pairs read from a JSONL file."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmjax.data import tasks
from fmjax.nn import params as params_lib
from fmjax.posttrain import reward_model
from fmjax import export
from fmjax.posttrain import plan
from fmjax.train import checkpoint, inputs, objectives, records, state as state_lib
from fmjax.train import step as step_lib
from fmjax.runtime import distributed
from test_posttrain import make_setup

GOOD, BAD = 5, 6


def rm_config():
  cfg = tiny_config(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64)
  cfg.objective.name = "reward_model"
  cfg.data.seq_len = 16
  cfg.train.batch_size = 32
  cfg.optimizer.update(lr=3e-3, warmup_steps=0, weight_decay=0.0)
  return cfg


def preference_batch(rng, cfg, B):
  """Pairs that differ in one token somewhere in the sequence: GOOD in the chosen, BAD in
  the rejected one. A reward read at the last token must find it."""
  T = cfg.data.seq_len
  batch = {}
  n_B = rng.integers(6, T + 1, B)
  where_B = rng.integers(1, n_B)
  body = rng.integers(10, 60, (B, T))
  for side, mark in (("chosen", GOOD), ("rejected", BAD)):
    tokens = body.copy()
    tokens[np.arange(B), where_B] = mark
    valid = np.arange(T)[None, :] < n_B[:, None]
    batch[f"{side}_tokens"] = np.where(valid, tokens, 0).astype(np.int32)
    batch[f"{side}_segment_ids"] = valid.astype(np.int32)
    batch[f"{side}_positions"] = np.where(valid, np.arange(T)[None, :], 0).astype(np.int32)
    batch[f"{side}_loss_mask"] = np.zeros((B, T), np.int32)
  return batch


def test_bradley_terry_loss_matches_its_closed_form():
  """With the head's weight zeroed and bias b, every reward is b: loss ln 2, margin 0;
  the rewards of one sequence do not depend on what pads the row."""
  cfg = rm_config()
  s = make_setup(cfg, dict(data=1, fsdp=1, tensor=1))
  params = params_lib.init(s.decls, jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, preference_batch(np.random.default_rng(0), cfg, 8))
  flat = dict(params, head={"w": jnp.zeros_like(params["head"]["w"]), "b": jnp.float32(0.7)})
  objective = jax.jit(lambda p, b: reward_model.reward_model(p, b, s.spec, cfg.objective))
  loss, stats = objective(flat, batch)
  assert float(loss) == pytest.approx(8 * math.log(2), rel=1e-6)
  assert float(stats["margin"]) == 0 and float(stats["accuracy"]) == 0
  assert float(stats["rewards/chosen"]) == pytest.approx(8 * 0.7, rel=1e-6)
  # A non-zero head: the loss is -log sigmoid(r_c - r_r) of each side's rewards, and a
  # reward does not depend on what the row holds past its sequence's end.
  _, stats = objective(params, batch)
  rewards = jax.jit(lambda p, t, g, q: reward_model.rewards(p, t, g, q, s.spec))
  r = {side: np.asarray(rewards(params, *(batch[f"{side}_{k}"] for k in
                                          ("tokens", "segment_ids", "positions"))))
       for side in ("chosen", "rejected")}
  garbage = jnp.where(batch["chosen_segment_ids"] == 0, 7, batch["chosen_tokens"])
  np.testing.assert_allclose(rewards(params, garbage, batch["chosen_segment_ids"],
                                     batch["chosen_positions"]), r["chosen"], rtol=1e-5, atol=1e-6)
  margin = r["chosen"] - r["rejected"]
  np.testing.assert_allclose(float(stats["loss"]), np.sum(np.logaddexp(0, -margin)), rtol=1e-5)
  np.testing.assert_allclose(float(stats["margin"]), np.sum(margin), rtol=1e-4, atol=1e-5)


def test_reward_model_learns_a_synthetic_preference():
  """Train steps; held-out pairwise accuracy > 0.9."""
  cfg = rm_config()
  s = make_setup(cfg, dict(data=1, fsdp=1, tensor=1))
  state = state_lib.init_state(s, seed=0)
  train_step, eval_step = step_lib.make_train_step(s), step_lib.make_eval_step(s)
  rng = np.random.default_rng(1)
  held_out = [preference_batch(np.random.default_rng(99), cfg, cfg.train.batch_size)]
  with jax.set_mesh(s.mesh):
    before = step_lib.evaluate(s, eval_step, state["params"], held_out)
    for _ in range(60):
      batch = preference_batch(rng, cfg, cfg.train.batch_size)
      state, m = train_step(state, distributed.global_batch(batch, s.batch_sharding))
    after = step_lib.evaluate(s, eval_step, state["params"], held_out)
  assert objectives.summarize(jax.device_get(m))["pairs"] == cfg.train.batch_size
  assert before["accuracy"] < 0.8
  assert after["accuracy"] > 0.9, after
  assert after["margin"] > 1.0 and after["loss"] < before["loss"]


def test_preferences_from_a_jsonl_file(tmp_path):
  path = tmp_path / "prefs.jsonl"
  records = [{"prompt": f"Say {i}", "chosen": str(i), "rejected": str(i + 1)} for i in range(200)]
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  train, validation = (tasks.PreferenceFile(str(path), split) for split in ("train", "validation"))
  assert len(train) + len(validation) == 200 and len(validation) > 0
  prompts = {r["prompt"] for r in train}
  assert not prompts & {r["prompt"] for r in validation}
  assert validation[0]["task"] == "jsonl" and validation[0]["chosen"] != validation[0]["rejected"]
  path.write_text('{"prompt": "x", "chosen": "y"}\n')
  with pytest.raises(ValueError, match="prefs.jsonl:1 is not a JSON record"):
    tasks.PreferenceFile(str(path), "train")


def test_an_exported_lora_reward_model_keeps_its_head_and_scores_the_same(tmp_path):
  """fmjax.export merges a LoRA reward model's adapters and keeps its head and objective,
  so the export is an objective.rl.reward_model giving the run's rewards."""
  cfg = rm_config()
  cfg.lora.update(rank=2, targets=r"layers\.w[qv]$")
  s = make_setup(cfg, dict(data=1, fsdp=1, tensor=1))
  state = state_lib.init_state(s, seed=0)
  rng = np.random.default_rng(0)  # adapters and head away from their initial values
  state["params"] = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape),
                                 state["params"])
  workdir = tmp_path / "rm"
  with checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=1) as ckpt:
    ckpt.save(3, state)
  records.write_json(str(workdir / "config.json"), cfg.to_dict())
  assert export.main([f"--workdir={workdir}", f"--out={tmp_path / 'merged'}"]) == 0
  with open(tmp_path / "merged" / "config.json") as f:
    saved = json.load(f)
  assert saved["objective"]["name"] == "reward_model" and saved["lora"]["rank"] == 0
  batch = preference_batch(np.random.default_rng(5), cfg, 8)
  rows = {k: batch[f"chosen_{k}"] for k in ("tokens", "segment_ids", "positions")}
  want = reward_model.rewards(plan.model_params(state["params"], cfg), rows["tokens"],
                              rows["segment_ids"], rows["positions"], s.spec)
  policy = cfg.copy_and_resolve_references()
  policy.lora.rank = 0
  policy.objective.rl.reward_model = str(tmp_path / "merged")
  score = inputs.load_reward_model(policy, make_setup(policy, dict(data=1, fsdp=1, tensor=1)))
  np.testing.assert_allclose(score(rows), want, rtol=1e-5, atol=1e-6)
  assert np.ptp(np.asarray(want)) > 1e-3  # the head is not a constant
