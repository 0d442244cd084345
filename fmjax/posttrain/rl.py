"""Reinforcement learning of the policy from rewards: GRPO, its variants and PPO
(`objective.name = 'grpo'`, settings in `objective.rl`).

A step (one batch of train.batch_size sequences):

1. Rollouts. batch_size / G prompts (fmjax.data.task_batches.prompt_batches), each
   repeated G = rl.group_size times, are continued by up to rl.max_new_tokens
   tokens sampled from softmax(logits / temperature) (nucleus rl.top_p) with the
   KV-cache decoder (fmjax.nn.decoding), in one jitted function on the training
   mesh that reads the policy's own sharded parameters. The sampler records the
   log-probability of each token it drew under the policy. The key of step n is
   fold_in(train.seed, n), n the batch number the checkpoint keeps: a resumed run
   samples the same rollouts.
2. Rewards, on the host: rl.verifier_weight times a verifier, a Python function
   `module:function(example, completion) -> float` (default
   fmjax.data.tasks:reward, 1 for a correct answer), plus
   rl.reward_model_weight times a learned reward model (the latest checkpoint of
   the reward_model run rl.reward_model, scoring prompt and completion on the
   same mesh). A verifier that raises stops the run with one line naming it
   and the example (RewardError). A sample passes when the verifier gives > 0
   (also recorded with verifier_weight 0, if rl.verifier is set).
3. Advantages per group of G samples of one prompt:
     grpo     (r - mean) / (std + 1e-6)                       (Shao et al. 2024)
     dr_grpo  r - mean, and token losses summed over a constant
              (sequences x max_new_tokens) instead of a length (Liu et al. 2025)
     rloo     r - mean of the other G - 1  = G / (G - 1) (r - mean)  (Ahmadian et al. 2024)
     gae      PPO: a value head (fmjax.posttrain.reward_model's head, read at
              every position) and GAE(gamma, lam) over the response tokens, the
              reward at the last one; advantages whitened over the batch, and a
              value loss rl.value_coef * (V - return)^2 / 2.
4. Updates: rl.updates (mu) optimizer updates on the batch, in one jitted step
   (`make_train_step`). Before the first, the trainer recomputes each response
   token's log-prob under the policy (pi_old) and under the frozen reference
   (checkpoint.init_from, only if rl.kl_beta > 0). Per token, with
   rho = pi / pi_old:
     loss_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)
              + kl_beta (ref / pi - log(ref / pi) - 1)     (k3, Schulman 2020)
   averaged over every response token of the batch (aggregation 'token', as
   DAPO), or over each sequence's tokens and then over sequences ('sequence',
   GRPO's). At the first update pi = pi_old: rho = 1, and the loss is -mean(A)
   plus beta times the KL to the reference (0 when the policy is the reference).

The statistics of a step are means (the `sequences` key marks them,
fmjax.train.objectives.summarize): loss, reward mean and std, pass rate,
response length, KL, clip fraction, entropy, and the gap between the sampler's
log-probs and the trainer's recomputed pi_old (max and mean over response
tokens: the two share the model code, so it is float rounding), with the
rollout and reward time and rollout tokens/s.
"""

from __future__ import annotations

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.data import tasks
from fmjax.errors import ConfigError, Failure
from fmjax.nn import decoding, model, sharding
from fmjax.posttrain import plan, reward_model as rm

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "gae")


class RewardError(Failure):
  """A reward function raised: the message names it and the example."""


def load_verifier(name: str):
  """The function `module:function` names; ConfigError if it cannot be imported."""
  module, _, attr = name.partition(":")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"objective.rl.verifier={name!r} cannot be imported "
                      f"({type(e).__name__}: {e})") from None
  if not callable(fn):
    raise ConfigError(f"objective.rl.verifier={name!r} is not a function")
  return fn


def group_advantages(rewards_NG, kind: str, eps: float = 1e-6):
  """Advantages (N, G) of N groups of G rewards (numpy or jax arrays)."""
  xp = jnp if isinstance(rewards_NG, jax.Array) else np
  r = xp.asarray(rewards_NG, xp.float32)
  centred = r - r.mean(axis=1, keepdims=True)
  if kind == "grpo":
    return centred / (r.std(axis=1, keepdims=True) + eps)
  if kind == "dr_grpo":
    return centred
  if kind == "rloo":
    G = r.shape[1]
    return centred * (G / (G - 1))
  raise ValueError(f"no group advantage {kind!r}; those are grpo, dr_grpo, rloo")


def gae(rewards_BT, values_BT, mask_BT, gamma: float, lam: float):
  """(advantages, returns) (B, T) by GAE over the masked (response) positions.

  The positions a row's mask selects are its steps in order; the value after
  the last is 0. Positions outside the mask get 0.
  """
  mask_BT = mask_BT.astype(jnp.float32)

  def back(carry, x):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = x
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    # Outside the mask, carry what comes after through unchanged.
    return ((jnp.where(m_B > 0, v_B, next_value_B), jnp.where(m_B > 0, adv_B, next_adv_B)),
            adv_B * m_B)

  zeros_B = jnp.zeros(rewards_BT.shape[:1], jnp.float32)
  _, adv_TB = jax.lax.scan(back, (zeros_B, zeros_B),
                           (rewards_BT.T, values_BT.T, mask_BT.T), reverse=True)
  adv_BT = adv_TB.T
  return adv_BT, (adv_BT + values_BT) * mask_BT


def token_logps(params, batch, spec, temperature: float, with_values: bool = False):
  """log pi(token t+1 | ...) at each position t (B, T) under softmax(logits / temperature),
  the entropy of that distribution (B, T), and (with_values) the value head (B, T)."""
  tokens_BT = batch["tokens"]
  h_BTD = rm.hidden(params, tokens_BT, batch["segment_ids"], batch["positions"], spec)
  logits_BTV = model.unembed(params, h_BTD, spec) / temperature
  targets_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
  values_BT = rm.head(params, h_BTD) if with_values else None
  return logp_BT, entropy_BT, values_BT


def aggregate(loss_BT, mask_BT, rl, rows=None, tokens=None):
  """The batch loss from token losses: see the module docstring. `rows` and `tokens` are
  the whole batch's sequences and response tokens (default: those of `mask_BT`), so that
  the losses of microbatches add up to the batch's."""
  mask_BT = mask_BT.astype(jnp.float32)
  rows = mask_BT.shape[0] if rows is None else rows
  tokens = jnp.maximum(jnp.sum(mask_BT), 1.0) if tokens is None else tokens
  if rl.advantage == "dr_grpo":
    return jnp.sum(loss_BT * mask_BT) / (rows * rl.max_new_tokens)
  if rl.aggregation == "token":
    return jnp.sum(loss_BT * mask_BT) / tokens
  per_seq_B = jnp.sum(loss_BT * mask_BT, axis=1) / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)
  return jnp.sum(per_seq_B) / rows


def policy_loss(logp_BT, old_BT, ref_BT, adv_BT, mask_BT, rl, rows=None, tokens=None):
  """(loss, statistics) of the clipped policy gradient with the k3 KL penalty; `rows` and
  `tokens` as in `aggregate` (the statistics are divided by `tokens` too)."""
  ratio_BT = jnp.exp(logp_BT - old_BT)
  clipped_BT = jnp.clip(ratio_BT, 1.0 - rl.clip_low, 1.0 + rl.clip_high)
  pg_BT = -jnp.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)
  log_ref_ratio_BT = ref_BT - logp_BT
  kl_BT = jnp.exp(log_ref_ratio_BT) - log_ref_ratio_BT - 1.0
  m_BT = mask_BT.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m_BT), 1.0) if tokens is None else tokens
  loss = aggregate(pg_BT + rl.kl_beta * kl_BT, mask_BT, rl, rows, n)
  stop = jax.lax.stop_gradient
  stats = {"kl": jnp.sum(stop(kl_BT) * m_BT) / n,
           "clip_fraction": jnp.sum((stop(pg_BT) != stop(-ratio_BT * adv_BT)) * m_BT) / n}
  return loss, stats


def make_train_step(s, frozen: dict | None = None):
  """The jitted RL step (state, batch) -> (state, metrics): mu updates on one batch of
  rollouts. `frozen` holds the reference if rl.kl_beta > 0 (Setup.frozen_shardings).

  With train.microbatches = n, every pass over the batch (pi_old, the reference, and each
  update's gradient) goes n microbatches at a time, and the gradients add up to the whole
  batch's: the losses are divided by the whole batch's sequences and tokens."""
  cfg = s.cfg
  rl = cfg.objective.rl
  values = rl.advantage == "gae"
  n_micro = cfg.train.microbatches
  rules = cfg.sharding.activations

  def over_rows(fn, tree):
    """fn over the rows of `tree`, one microbatch at a time, joined back to (B, ...)."""
    if n_micro == 1:
      return fn(tree)
    out = jax.lax.map(fn, sharding.split_microbatches(tree, n_micro, rules))
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(-1, *y.shape[2:]), out)

  def step(state, batch, frozen):
    trained, fixed = s.split(state["params"])
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    rows, n_tokens = mask_BT.shape[0], jnp.maximum(jnp.sum(mask_BT), 1.0)
    stop = jax.lax.stop_gradient
    policy = plan.model_params(state["params"], cfg)
    old_BT, entropy_BT, old_values_BT = stop(over_rows(
        lambda b: token_logps(policy, b, s.spec, rl.temperature, values), batch))
    if frozen:
      ref_BT = stop(over_rows(
          lambda b: token_logps(frozen["reference"], b, s.spec, rl.temperature)[0], batch))
    else:
      ref_BT = old_BT
    if values:
      last_BT = mask_BT * (1.0 - jnp.concatenate([mask_BT[:, 1:], jnp.zeros_like(mask_BT[:, :1])],
                                                 axis=1))
      adv_BT, returns_BT = gae(batch["rewards"] * last_BT, old_values_BT, mask_BT, rl.gamma,
                               rl.lam)
      mean = jnp.sum(adv_BT * mask_BT) / n_tokens
      std = jnp.sqrt(jnp.sum((adv_BT - mean)**2 * mask_BT) / n_tokens)
      adv_BT = (adv_BT - mean) / (std + 1e-6) * mask_BT
    else:
      adv_BT = jnp.broadcast_to(batch["advantages"], mask_BT.shape)
    rows_in = dict(batch, old=old_BT, ref=ref_BT, adv=adv_BT)
    if values:
      rows_in["returns"] = returns_BT

    def loss_fn(tr, b):
      params = plan.model_params(dict(fixed, **tr), cfg)
      logp_BT, _, values_BT = token_logps(params, b, s.spec, rl.temperature, values)
      m_BT = b["loss_mask"].astype(jnp.float32)
      loss, stats = policy_loss(logp_BT, b["old"], b["ref"], b["adv"], m_BT, rl, rows,
                                n_tokens)
      if values:
        value_loss = 0.5 * jnp.sum((values_BT - b["returns"])**2 * m_BT) / n_tokens
        stats["value_loss"] = value_loss
        loss = loss + rl.value_coef * value_loss
      return loss, dict(stats, loss=loss)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(carry, _):
      tr, opt_state = carry
      (_, stats), grads = sharding.sum_over_microbatches(lambda b: grad_fn(tr, b), rows_in,
                                                         n_micro, rules)
      updates, opt_state = s.optimizer.update(grads, opt_state, tr)
      return (optax.apply_updates(tr, updates), opt_state), dict(
          stats, grad_norm=optax.tree.norm(grads))

    (trained, opt_state), per_update = jax.lax.scan(
        update, (trained, state["opt_state"]), None, length=rl.updates)
    gap_BT = jnp.abs(batch["sampler_logps"] - old_BT) * mask_BT
    metrics = {k: v[0] if k in ("loss", "kl") else jnp.mean(v) for k, v in per_update.items()}
    metrics.update(
        sequences=jnp.float32(mask_BT.shape[0]),
        entropy=jnp.sum(entropy_BT * mask_BT) / n_tokens,
        max_logprob_gap=jnp.max(gap_BT), mean_logprob_gap=jnp.sum(gap_BT) / n_tokens,
        lr=s.lr_schedule(state["step"] * rl.updates),
        nonfinite_consecutive=opt_state.notfinite_count,
        nonfinite_total=opt_state.total_notfinite)
    new_state = {"step": state["step"] + 1, "params": dict(fixed, **trained),
                 "opt_state": opt_state}
    return new_state, metrics

  kwargs = dict(out_shardings=(s.state_shardings, None), donate_argnums=0)
  if not s.frozen_shardings:
    return jax.jit(lambda state, batch: step(state, batch, {}),
                   in_shardings=(s.state_shardings, s.batch_sharding), **kwargs)
  jitted = jax.jit(step, in_shardings=(s.state_shardings, s.batch_sharding, s.frozen_shardings),
                   **kwargs)
  return lambda state, batch: jitted(state, batch, frozen)


# Rollouts.

def _sample(params, prompt_BP, length_B, key, cache, spec, eos_id: int, n_new: int,
            sampling: tuple):
  """Tokens (B, N), their log-probs under softmax(logits / temperature) (B, N), and
  whether each is a response token (B, N): up to and including the first EOS."""
  temperature, top_p, greedy = sampling
  logits_BV, cache = decoding.prefill(params, cache, prompt_BP, length_B, spec)

  def body(carry, i):
    logits_BV, cache, done_B = carry
    token_B = decoding.sample_logits(logits_BV, jax.random.fold_in(key, i),
                                     0.0 if greedy else temperature, 0, top_p)
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / temperature, axis=-1)
    logp_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
    valid_B = ~done_B
    logits_BV, cache = decoding.step(params, cache, token_B, length_B + i, spec)
    return (logits_BV, cache, done_B | (token_B == eos_id)), (token_B, logp_B, valid_B)

  done_B = jnp.zeros(length_B.shape, bool)
  _, (tokens_NB, logp_NB, valid_NB) = jax.lax.scan(body, (logits_BV, cache, done_B),
                                                   jnp.arange(n_new))
  return tokens_NB.T, logp_NB.T, valid_NB.T


def _rows(prompt_BP, length_B, tokens_BN, logp_BN, valid_BN):
  """The train rows (B, P + N) of prompts and responses: see fmjax.data.task_batches."""
  B, P = prompt_BP.shape
  N = tokens_BN.shape[1]
  L = P + N
  tokens_BN = jnp.where(valid_BN, tokens_BN, 0)
  n_B = jnp.sum(valid_BN, axis=1).astype(jnp.int32)
  put = jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (at,)))
  tokens_BL = put(jnp.pad(prompt_BP, ((0, 0), (0, N))), tokens_BN, length_B)
  sampler_BL = put(jnp.zeros((B, L), jnp.float32), jnp.where(valid_BN, logp_BN, 0.0),
                   length_B - 1)
  t_L = jnp.arange(L)[None, :]
  end_B1 = (length_B + n_B)[:, None]
  segment_BL = (t_L < end_B1).astype(jnp.int32)
  mask_BL = ((t_L >= length_B[:, None] - 1) & (t_L < end_B1 - 1)).astype(jnp.int32)
  return {"tokens": tokens_BL, "segment_ids": segment_BL, "positions": t_L * segment_BL,
          "loss_mask": mask_BL, "sampler_logps": sampler_BL}


class Rollouts:
  """What an RL run does besides its train step: sampling, rewards, held-out pass@1."""

  def __init__(self, cfg, s, tokenizer, frozen: dict | None = None, reward_model=None):
    """`reward_model`: rows -> rewards (B,), if rl.reward_model_weight > 0
    (fmjax.train.inputs.load_reward_model)."""
    self.cfg, self.s, self.tok = cfg, s, tokenizer
    self.rl = rl = cfg.objective.rl
    self.width = cfg.data.seq_len - rl.max_new_tokens  # prompt tokens a row holds
    self.verifier = load_verifier(rl.verifier) if rl.verifier else None
    if rl.reward_model_weight and reward_model is None:
      raise ConfigError(f"objective.rl.reward_model_weight={rl.reward_model_weight} needs a "
                        "reward model (objective.rl.reward_model)")
    self.reward_model = reward_model
    self.names = tasks.parse_tasks(cfg.objective.tasks)
    self.datasets = {}  # split -> tasks.Instructions, to find examples by index
    self.train_step = make_train_step(s, frozen)
    self._sample = {}  # greedy -> jitted rollout

  def _example(self, split: str, index: int) -> dict:
    if split not in self.datasets:
      size = (self.cfg.data.task_size or None) if split == "train" else None
      self.datasets[split] = tasks.Instructions(split, self.cfg.data.seed, size,
                                                tasks=self.names)
    return self.datasets[split][index]

  def _rollout_fn(self, greedy: bool):
    if greedy not in self._sample:
      s, rl = self.s, self.rl
      sampling = (float(rl.temperature), float(rl.top_p), greedy)

      def fn(params, prompt_BP, length_B1, key, cache):
        policy = plan.model_params(params, s.cfg)
        length_B = length_B1[:, 0]
        out = _sample(policy, prompt_BP, length_B, key, cache, s.spec, self.tok.eos_id,
                      rl.max_new_tokens, sampling)
        return _rows(prompt_BP, length_B, *out), out[0], out[2]

      self._sample[greedy] = jax.jit(
          fn, in_shardings=(s.state_shardings["params"], s.batch_sharding, s.batch_sharding,
                            None, None),
          out_shardings=(s.batch_sharding, s.batch_sharding, s.batch_sharding))
    return self._sample[greedy]

  def generate(self, params, prompts: dict, key, group: int, greedy: bool, split: str):
    """(device rows, per-sample host stats) of each prompt sampled `group` times."""
    length = np.repeat(np.asarray(prompts["prompt_length"], np.int32), group, axis=0)
    index = np.repeat(np.asarray(prompts["index"]), group, axis=0)[:, 0]
    too_long = np.flatnonzero(length[:, 0] > self.width)
    if too_long.size:
      e = self._example(split, int(index[too_long[0]]))
      raise ConfigError(
          f"a prompt of {int(length[too_long[0], 0])} tokens ({e['prompt']!r}) does not fit the "
          f"cache: data.seq_len={self.cfg.data.seq_len} holds objective.rl.max_new_tokens="
          f"{self.rl.max_new_tokens} new tokens after at most {self.width} prompt tokens; raise "
          "data.seq_len")
    prompt_BP = np.repeat(np.asarray(prompts["prompt_tokens"], np.int32), group, axis=0)
    cache = decoding.init_cache(self.s.spec, len(prompt_BP), self.cfg.data.seq_len, self.s.mesh)
    rows, tokens_BN, valid_BN = self._rollout_fn(greedy)(params, prompt_BP, length, key, cache)
    tokens_BN, valid_BN = (np.asarray(x) for x in jax.device_get((tokens_BN, valid_BN)))
    completions = [self.tok.decode([int(t) for t, v in zip(toks, ok) if v and t != self.tok.eos_id])
                   for toks, ok in zip(tokens_BN, valid_BN)]
    examples = [self._example(split, int(i)) for i in index]
    return rows, examples, completions, valid_BN.sum(axis=1)

  def rewards(self, rows, examples, completions):
    """(total reward, verifier pass) per sample, numpy (B,)."""
    total = np.zeros(len(examples), np.float32)
    passed = np.zeros(len(examples), bool)
    if self.verifier is not None:
      v = np.array([self._verify(e, c) for e, c in zip(examples, completions)], np.float32)
      total += self.rl.verifier_weight * v
      passed = v > 0  # recorded even when verifier_weight is 0 (training on a reward model)
    if self.reward_model is not None:
      total += self.rl.reward_model_weight * np.asarray(self.reward_model(rows))
    return total, passed

  def _verify(self, example, completion) -> float:
    try:
      return float(self.verifier(example, completion))
    except Exception as e:  # any error of the user's function stops the run, said in one line
      raise RewardError(f"reward function {self.rl.verifier} raised {type(e).__name__}: {e} on "
                        f"example {example['prompt']!r} with completion {completion!r}") from None

  def rollout(self, params, prompts: dict, number: int):
    """(train batch on device, host statistics) of batch `number` of prompts."""
    jax.block_until_ready(params)  # the time below is the rollout's own
    began = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), number)
    rows, examples, completions, lengths = self.generate(params, prompts, key,
                                                          self.rl.group_size, False, "train")
    sampled = time.perf_counter()
    reward_B, passed_B = self.rewards(rows, examples, completions)
    G = self.rl.group_size
    batch = dict(rows, rewards=reward_B[:, None])
    if self.rl.advantage != "gae":
      batch["advantages"] = group_advantages(reward_B.reshape(-1, G),
                                             self.rl.advantage).reshape(-1, 1)
    done = time.perf_counter()
    host = {"reward_mean": float(reward_B.mean()), "reward_std": float(reward_B.std()),
            "pass_rate": float(passed_B.mean()), "response_length": float(lengths.mean()),
            "rollout_s": sampled - began, "reward_s": done - sampled,
            "rollout_tokens_per_s": float(lengths.sum()) / max(sampled - began, 1e-9)}
    return batch, host

  def evaluate(self, params, batches) -> dict:
    """Over the held-out prompts of `batches`: pass@1 and mean reward of the greedy answers
    (accuracy, reward), and pass@1 of the policy's own samples at the rollout temperature,
    group_size of them per prompt (sampled_accuracy), the quantity GRPO maximises."""
    out = {}
    for name, greedy, group in (("", True, 1), ("sampled_", False, self.rl.group_size)):
      rewards, passed = [], []
      for number, b in enumerate(batches):
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed + 1), number)
        rows, examples, completions, _ = self.generate(params, b, key, group, greedy,
                                                       "validation")
        r, p = self.rewards(rows, examples, completions)
        rewards.append(r)
        passed.append(p)
      r, p = np.concatenate(rewards), np.concatenate(passed)
      out.update({f"{name}accuracy": float(p.mean()), f"{name}reward": float(r.mean())})
    return dict(out, loss=-out["reward"], prompts=float(len(r) // self.rl.group_size))


def plot_rewards(records: list[dict], path: str) -> None:
  """Train reward and pass rate, and held-out pass@1, against step, saved as a PNG."""
  import matplotlib  # only here: plotting is the last thing a run does
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: E402  after the backend is chosen

  def series(key):
    return [(r["step"], r[key]) for r in records if key in r]

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key, label, style in (("reward_mean", "train reward (mean)", "-"),
                            ("pass_rate", "train pass rate", "-"),
                            ("eval_accuracy", "held-out pass@1 (greedy)", "o-"),
                            ("eval_sampled_accuracy", "held-out pass@1 (sampled)", "s-")):
    points = series(key)
    if points:
      ax.plot(*zip(*points), style, label=label, lw=1.2)
  ax.set_xlabel("step")
  ax.set_title("RL: reward and pass rate")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
