"""RL (fmjax/posttrain/rl.py): advantages and losses against closed forms, rollouts on the
fake mesh against the trainer's log-probs, one step on 1 device vs 8, and bad inputs."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from fmjax.data import tasks
from fmjax.errors import ConfigError
from fmjax.posttrain import rl
from fmjax.train import inputs, objectives, state as state_lib
from fmjax.validate import validate
from test_posttrain import make_setup

G, NEW, SEQ = 4, 8, 24
STEPS = 32  # GRPO steps of the learning test
EOS = 2


def rl_config(**fields):
  cfg = tiny_config(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
  cfg.objective.name = "grpo"
  cfg.objective.tasks = "addition"
  cfg.objective.rl.update(dict(dict(group_size=G, max_new_tokens=NEW, temperature=1.0),
                               **fields))
  cfg.data.seq_len = SEQ
  cfg.train.batch_size = 8
  cfg.optimizer.update(lr=1e-2, warmup_steps=0, weight_decay=0.0)
  return cfg


class FakeTokenizer:
  """What rollouts need of a tokenizer: eos_id and decode."""
  eos_id = EOS

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def prompt_batch(rng, n, width=SEQ - NEW, longest=None):
  lengths = rng.integers(3, width + 1, n)
  if longest is not None:
    lengths[0] = longest
  tokens = np.zeros((n, width), np.int32)
  for i, length in enumerate(lengths):
    tokens[i, :min(length, width)] = rng.integers(3, 512, min(length, width))
  return {"prompt_tokens": tokens, "prompt_length": lengths[:, None].astype(np.int32),
          "index": np.arange(n, dtype=np.int32)[:, None]}


# Advantages and losses: closed forms.


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_equal_rewards_give_zero_advantages(kind):
  rewards = np.array([[1.0] * 4, [0.0] * 4, [0.3] * 4])
  np.testing.assert_array_equal(rl.group_advantages(rewards, kind), 0.0)
  np.testing.assert_array_equal(rl.group_advantages(jnp.asarray(rewards), kind), 0.0)


def test_group_advantages_against_their_definitions():
  r = np.random.default_rng(0).normal(size=(5, 4))
  loo = np.stack([r[:, i] - np.delete(r, i, axis=1).mean(axis=1) for i in range(4)], axis=1)
  np.testing.assert_allclose(rl.group_advantages(r, "rloo"), loo, rtol=1e-5, atol=1e-6)
  z = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(rl.group_advantages(r, "grpo"), z, rtol=1e-5, atol=1e-6)


def test_gae_against_a_python_loop():
  rng = np.random.default_rng(1)
  B, T, gamma, lam = 3, 7, 0.9, 0.8
  mask = np.zeros((B, T), np.float32)
  for b, (lo, hi) in enumerate([(1, 5), (0, 7), (3, 4)]):
    mask[b, lo:hi] = 1
  rewards, values = rng.normal(size=(B, T)) * mask, rng.normal(size=(B, T))
  adv, ret = rl.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                    jnp.asarray(mask), gamma, lam)
  want = np.zeros((B, T))
  for b in range(B):
    idx = np.flatnonzero(mask[b])
    next_v = next_a = 0.0
    for t in idx[::-1]:
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      next_a = delta + gamma * lam * next_a
      next_v = values[b, t]
      want[b, t] = next_a
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, (want + values) * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("advantage,aggregation", [("grpo", "token"), ("grpo", "sequence"),
                                                   ("dr_grpo", "token")])
def test_loss_at_ratio_one_is_minus_the_mean_advantage(advantage, aggregation):
  o = rl_config(advantage=advantage, aggregation=aggregation, kl_beta=0.5).objective.rl
  rng = np.random.default_rng(2)
  mask = (rng.random((6, 10)) < 0.6).astype(np.float32)
  mask[:, 0] = 1
  logp = jnp.asarray(-rng.random((6, 10)), jnp.float32)
  adv = rng.normal(size=(6, 1)) * np.ones((1, 10))
  loss, stats = rl.policy_loss(logp, logp, logp, jnp.asarray(adv, jnp.float32), mask, o)
  if advantage == "dr_grpo":
    want = -np.sum(adv * mask) / (6 * NEW)
  elif aggregation == "token":
    want = -np.sum(adv * mask) / np.sum(mask)
  else:
    want = -np.mean(np.sum(adv * mask, 1) / np.sum(mask, 1))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(stats["kl"]) == 0 and float(stats["clip_fraction"]) == 0
  # k3 against another reference: exp(d) - d - 1 >= 0, averaged over tokens, times beta.
  ref = logp + 0.3
  loss_kl, stats = rl.policy_loss(logp, logp, ref, jnp.asarray(adv, jnp.float32), mask, o)
  k3 = np.exp(0.3) - 0.3 - 1
  assert float(stats["kl"]) == pytest.approx(k3, rel=1e-4)
  if aggregation == "token" and advantage == "grpo":
    assert float(loss_kl) == pytest.approx(want + 0.5 * k3, rel=1e-4)


def test_clipping_bounds_are_separate():
  """DAPO's clip-higher: a positive advantage stops pulling at 1 + clip_high, a negative one at
  1 - clip_low."""
  o = rl_config(clip_low=0.1, clip_high=0.3).objective.rl
  mask = np.ones((1, 4), np.float32)
  old = jnp.zeros((1, 4))
  logp = jnp.log(jnp.asarray([[1.2, 1.4, 0.95, 0.8]]))
  adv = jnp.asarray([[1.0, 1.0, -1.0, -1.0]])
  loss, stats = rl.policy_loss(logp, old, old, adv, mask, o)
  assert float(loss) == pytest.approx(-(1.2 + 1.3 - 0.95 - 0.9) / 4, rel=1e-5)
  assert float(stats["clip_fraction"]) == pytest.approx(0.5)


# The train step and rollouts on the mesh.


@pytest.fixture(scope="module")
def mesh_run():
  """A setup on the 8-device fake mesh, its initial state, rollouts and the step."""
  cfg = rl_config()
  s = make_setup(cfg, dict(data=2, fsdp=2, tensor=2))
  state = state_lib.init_state(s, seed=0)
  rollouts = rl.Rollouts(cfg, s, FakeTokenizer())
  return cfg, s, state, rollouts


def test_rollout_logprobs_match_the_trainer_and_rows_hold_the_samples(mesh_run):
  cfg, s, state, rollouts = mesh_run
  prompts = prompt_batch(np.random.default_rng(3), cfg.train.batch_size // G)
  with jax.set_mesh(s.mesh):
    batch, host = rollouts.rollout(state["params"], prompts, number=1)
    again, _ = rollouts.rollout(state["params"], prompts, number=1)
    other, _ = rollouts.rollout(state["params"], prompts, number=2)
    rows = jax.device_get({k: batch[k] for k in ("tokens", "segment_ids", "loss_mask")})
    np.testing.assert_array_equal(rows["tokens"], jax.device_get(again["tokens"]))
    assert (rows["tokens"] != jax.device_get(other["tokens"])).any()  # the key is the batch's
    # Each row: its prompt, then the sampled response; the mask covers the response.
    for b in range(cfg.train.batch_size):
      n = int(prompts["prompt_length"][b // G, 0])
      np.testing.assert_array_equal(rows["tokens"][b, :n], prompts["prompt_tokens"][b // G, :n])
      m = np.flatnonzero(rows["loss_mask"][b])
      assert m[0] == n - 1 and np.all(np.diff(m) == 1)  # contiguous, from the prompt's end
      assert rows["segment_ids"][b].sum() == n + len(m)
    assert np.isclose(host["response_length"], rows["loss_mask"].sum() / cfg.train.batch_size)
    # The group's rewards are all equal here only by chance; advantages are centred per group.
    np.testing.assert_allclose(batch["advantages"].reshape(-1, G).sum(1), 0, atol=1e-5)
    state2, metrics = rollouts.train_step(jax.tree.map(jnp.copy, state), batch)
  record = objectives.summarize(jax.device_get(metrics))
  assert record["max_logprob_gap"] < 1e-4, record
  assert record["mean_logprob_gap"] < 1e-5
  assert record["kl"] == 0 and record["clip_fraction"] == 0
  assert record["entropy"] > 0
  del state2


def even_share(example, completion):
  """A reward a random policy can climb: the share of even token ids in the completion."""
  del example
  ids = [int(t) for t in completion.split()]
  return sum(i % 2 == 0 for i in ids) / len(ids) if ids else 0.0


def test_grpo_climbs_a_reward_the_policy_can_reach(mesh_run, monkeypatch):
  """Rollouts, rewards, advantages and updates together: the mean reward of fresh samples
  rises from a random policy's 0.5."""
  cfg, s, state, rollouts = mesh_run
  monkeypatch.setattr(rollouts, "verifier", even_share)
  state = jax.tree.map(jnp.copy, state)
  prompts = prompt_batch(np.random.default_rng(6), cfg.train.batch_size // G)
  means = []
  with jax.set_mesh(s.mesh):
    for number in range(STEPS):
      batch, host = rollouts.rollout(state["params"], prompts, number=number)
      state, _ = rollouts.train_step(state, batch)
      means.append(host["reward_mean"])
  first, last = np.mean(means[:4]), np.mean(means[-8:])
  assert 0.3 < first < 0.7, means
  assert last > first + 0.2, means


def test_evaluation_gives_greedy_and_sampled_pass_at_1(mesh_run, monkeypatch):
  """Held-out evaluation answers each prompt once greedily and group_size times sampled, and
  its two pass rates are the verifier's over exactly those answers."""
  cfg, s, state, rollouts = mesh_run
  seen = []
  monkeypatch.setattr(rollouts, "verifier",
                      lambda e, c: seen.append((e["prompt"], c)) or float(even_share(e, c) > 0.5))
  prompts = prompt_batch(np.random.default_rng(8), 8)
  with jax.set_mesh(s.mesh):
    result = rollouts.evaluate(state["params"], [prompts])
  greedy, sampled = seen[:8], seen[8:]
  assert len(sampled) == 8 * G and result["prompts"] == 8
  share = lambda answers: np.mean([even_share(None, c) > 0.5 for _, c in answers])
  assert result["accuracy"] == pytest.approx(share(greedy))
  assert result["sampled_accuracy"] == pytest.approx(share(sampled))
  # Samples of one prompt differ; greedy answers are the sampler's at temperature 0.
  assert len({c for p, c in sampled if p == greedy[0][0]}) > 1
  with jax.set_mesh(s.mesh):
    again, _, completions, _ = rollouts.generate(state["params"], prompts, jax.random.key(5), 1,
                                                 True, "validation")
  assert completions == [c for _, c in greedy]


def one_step(s, state, batch, step=None):
  step = step or rl.make_train_step(s)
  with jax.set_mesh(s.mesh):
    return jax.device_get(step(state, batch))


def synthetic_batch(cfg, seed=4):
  rng = np.random.default_rng(seed)
  B, T = cfg.train.batch_size, SEQ
  tokens = rng.integers(3, 512, (B, T)).astype(np.int32)
  n = rng.integers(12, T + 1, B)
  start = rng.integers(3, 10, B)
  t = np.arange(T)[None]
  seg = (t < n[:, None]).astype(np.int32)
  mask = ((t >= start[:, None] - 1) & (t < n[:, None] - 1)).astype(np.int32)
  rewards = rng.integers(0, 2, B).astype(np.float32)
  return {"tokens": tokens * seg, "segment_ids": seg, "positions": t * seg, "loss_mask": mask,
          "sampler_logps": np.zeros((B, T), np.float32), "rewards": rewards[:, None],
          "advantages": rl.group_advantages(rewards.reshape(-1, G), "grpo").reshape(-1, 1)}


def test_first_step_loss_closed_form_and_one_device_equals_the_mesh(mesh_run):
  """mu = 1: ratio 1 and KL 0, so the loss is -mean(A) over response tokens; the
  parameters after the step are the same on 1 device and on the 2x2x2 fake mesh."""
  cfg, s8, state8, rollouts = mesh_run
  batch = synthetic_batch(cfg)
  s1 = make_setup(cfg, dict(data=1, fsdp=1, tensor=1))
  state1 = state_lib.init_state(s1, seed=0)
  before = jax.device_get(state1["params"])
  new1, m1 = one_step(s1, state1, batch)
  new8, m8 = one_step(s8, jax.tree.map(jnp.copy, state8), batch, rollouts.train_step)
  mask = batch["loss_mask"]
  want = -np.sum(batch["advantages"] * mask) / np.sum(mask)
  assert float(m1["loss"]) == pytest.approx(want, rel=1e-5, abs=1e-7)
  assert float(m1["kl"]) == 0 and float(m1["clip_fraction"]) == 0
  assert float(m8["loss"]) == pytest.approx(want, rel=1e-5, abs=1e-7)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), new1["params"], before)
  assert max(jax.tree.leaves(moved)) > 1e-4  # the step did something
  # Adam's first step is lr * g / (|g| + eps): a gradient near eps turns rounding into up to
  # a percent of lr; everything else agrees to float rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4),
               new1["params"], new8["params"])
  diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
      jax.tree.leaves(new1["params"]), jax.tree.leaves(new8["params"]))])
  assert np.mean(diffs < 2e-6) > 0.99


def test_microbatches_give_the_whole_batch_step():
  """train.microbatches = 2 splits pi_old, the value head's pass and each of mu = 2 updates'
  gradients into microbatches; the step equals the one-pass step (PPO's, which has every
  part of GRPO's and the value loss and its whitened advantages besides)."""
  batch = synthetic_batch(rl_config())
  out = []
  for micro in (1, 2):
    cfg = rl_config(advantage="gae", updates=2, clip_low=0.05, clip_high=0.05)
    cfg.train.microbatches = micro
    s = make_setup(cfg, dict(data=2, fsdp=1, tensor=1))
    out.append(one_step(s, state_lib.init_state(s, seed=0), batch))
  (one, m1), (two, m2) = out
  assert float(m2["clip_fraction"]) > 0  # the second update is off-policy, and clipped
  for key in ("loss", "kl", "clip_fraction", "entropy", "grad_norm", "value_loss"):
    assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-4, abs=1e-6), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
               one["params"], two["params"])


# Bad inputs: one line each.


@pytest.mark.parametrize("fields,message", [
    (dict(group_size=1), "group_size=1 must be >= 2"),
    (dict(reward_model_weight=1.0), "needs objective.rl.reward_model"),
    (dict(verifier="not a function"), "must name a function as module:function"),
    (dict(max_new_tokens=SEQ), "must be below data.seq_len"),
])
def test_bad_rl_configs_get_one_line_errors(fields, message):
  cfg = rl_config(**fields)
  with pytest.raises(ConfigError, match=message) as e:
    validate(cfg, 8)
  assert "\n" not in str(e.value)


def test_prompt_longer_than_the_cache_is_one_line(mesh_run):
  cfg, s, state, rollouts = mesh_run
  prompts = prompt_batch(np.random.default_rng(5), 2, longest=SEQ - NEW + 3)
  with pytest.raises(ConfigError, match=r"a prompt of 19 tokens .* does not fit the cache: "
                                        r"data.seq_len=24") as e:
    rollouts.generate(state["params"], prompts, jax.random.key(0), G, False, "train")
  assert "\n" not in str(e.value)


def test_missing_reward_model_is_one_line(tmp_path, mesh_run):
  cfg, s, _, _ = mesh_run
  cfg = rl_config(reward_model=str(tmp_path), reward_model_weight=1.0)
  with pytest.raises(ConfigError, match="holds no config.json"):
    inputs.load_reward_model(cfg, s)
  with pytest.raises(ConfigError, match="needs a reward model"):
    rl.Rollouts(cfg, s, FakeTokenizer())


def raising_verifier(example, completion):
  raise KeyError("boom")


def test_raising_verifier_stops_with_one_line_naming_it_and_the_example(mesh_run):
  cfg, s, _, _ = mesh_run
  cfg = rl_config(verifier="test_rl:raising_verifier")
  rollouts = rl.Rollouts(cfg, s, FakeTokenizer())
  example = tasks.Instructions("train", tasks=("addition",))[0]
  with pytest.raises(rl.RewardError) as e:
    rollouts.rewards(None, [example], ["1 2 3"])
  text = str(e.value)
  assert "\n" not in text
  assert "test_rl:raising_verifier raised KeyError" in text and example["prompt"] in text
  with pytest.raises(ConfigError, match="cannot be imported"):
    rl.load_verifier("test_rl:no_such_function")


# The addition task family.


def test_addition_examples_verify_and_levels_split_and_grow():
  digits = {}
  for level in tasks.LEVELS:
    seen = {}
    for split in ("train", "validation"):
      data = tasks.Preferences(split, level=level, tasks=("addition",))
      seen[split] = set()
      for i in range(40):
        e = data[i]
        a, b = (int(x) for x in e["prompt"].removeprefix("Add ").split(" + "))
        assert e["chosen"].endswith(f"so {a + b}")  # against Python's own sum
        assert tasks.verify("addition", e["prompt"], e["chosen"])
        assert not tasks.verify("addition", e["prompt"], e["rejected"])
        assert tasks.reward({"task": "addition", "prompt": e["prompt"]}, e["chosen"]) == 1.0
        seen[split].add(e["prompt"])
        digits.setdefault(level, set()).add(len(str(a)))
    assert not seen["train"] & seen["validation"]
  assert digits == {0: {2}, 1: {3}, 2: {4}}
  # Carries are written out column by column.
  assert tasks.addition_steps(95, 87) == "5+7=12, 9+8+1=18, so 182"
  assert not tasks.verify("addition", "Add 95 + 87", "5+7=12, 9+8+1=18, so 172")
