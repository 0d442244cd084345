"""Where an RL step's time goes: rollout (sampling with the KV cache) against the update.

  python tools/bench_rl.py [--config=experiments/grpo_tiny.py] [--steps=10] [--updates=1]

Builds the experiment's model (random parameters: the speed does not depend on
them, but the response length does, so every rollout runs all
objective.rl.max_new_tokens steps here: no EOS is special-cased), its mesh and
its RL train step, then times `--steps` RL steps after one to compile:

  rollout  prefill + max_new_tokens decode steps for train.batch_size sequences,
           in one jitted function on the training mesh, tokens fetched to the host
  reward   decoding the completions and the verifier, on the host
  update   objective.rl.updates optimizer updates on the batch (a forward pass for
           pi_old, then forward and backward per update), until the state is ready

and prints each phase's median seconds, the decode tokens/s of the rollout
(batch_size x max_new_tokens / rollout time), the update's tokens/s (batch_size
x seq_len / update time), and the ratio rollout / update, which the RL target of
tools/BENCHMARKS.md holds to <= 3 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(REPO, "experiments", "grpo_tiny.py"))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--updates", type=int, default=0, help="mu; 0: the experiment's")
  parser.add_argument("--json", default="", help="also write the figures to this file")
  args = parser.parse_args(argv)
  sys.path.insert(0, REPO)
  import importlib.util

  spec = importlib.util.spec_from_file_location("experiment", args.config)
  experiment = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment)
  cfg = experiment.get_config()
  cfg.checkpoint.init_from = ""
  if args.updates:
    cfg.objective.rl.updates = args.updates
  if cfg.mesh.cpu_devices:  # before jax starts: the experiment's fake CPU devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={cfg.mesh.cpu_devices}").strip()
  import jax
  import numpy as np

  from fmjax.data import task_batches, tasks, tokenizer as tokenizer_lib
  from fmjax.nn import sharding
  from fmjax.posttrain import rl
  from fmjax.train import state as state_lib

  mesh = sharding.make_mesh(cfg.mesh)
  s = state_lib.setup(cfg, mesh)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  o = cfg.objective.rl
  rollouts = rl.Rollouts(cfg, s, tok)
  prompts = iter(task_batches.prompt_batches(
      tok, "train", prompt_len=cfg.data.seq_len - o.max_new_tokens,
      batch_size=cfg.train.batch_size // o.group_size,
      task_names=tasks.parse_tasks(cfg.objective.tasks)))
  state = state_lib.init_state(s, cfg.train.seed)
  times = {"rollout": [], "reward": [], "update": []}
  with jax.set_mesh(mesh):
    for i in range(args.steps + 1):
      began = time.perf_counter()
      rows, examples, completions, lengths = rollouts.generate(
          state["params"], next(prompts), jax.random.key(i), o.group_size, False, "train")
      sampled = time.perf_counter()
      reward, _ = rollouts.rewards(rows, examples, completions)
      batch = dict(rows, rewards=reward[:, None], advantages=rl.group_advantages(
          reward.reshape(-1, o.group_size), "grpo").reshape(-1, 1))
      rewarded = time.perf_counter()
      state, metrics = rollouts.train_step(state, batch)
      jax.block_until_ready(state)
      done = time.perf_counter()
      if i:  # the first compiled everything
        times["rollout"].append(sampled - began)
        times["reward"].append(rewarded - sampled)
        times["update"].append(done - rewarded)
  med = {k: float(np.median(v)) for k, v in times.items()}
  B, L, N = cfg.train.batch_size, cfg.data.seq_len, o.max_new_tokens
  out = {"batch": B, "seq_len": L, "max_new_tokens": N, "updates": o.updates,
         "devices": int(np.prod(list(mesh.shape.values()))), "backend": jax.default_backend(),
         "rollout_s": med["rollout"], "reward_s": med["reward"], "update_s": med["update"],
         "rollout_decode_tokens_per_s": B * N / med["rollout"],
         "update_tokens_per_s": B * L / med["update"],
         "rollout_over_update": med["rollout"] / med["update"],
         "max_logprob_gap": float(jax.device_get(metrics["max_logprob_gap"]))}
  print(f"RL step of {B} sequences x {L} tokens ({N} sampled), mu={o.updates}, on "
        f"{out['devices']} {out['backend']} devices: median over {args.steps} steps")
  for k in ("rollout", "reward", "update"):
    print(f"  {k:8s} {med[k] * 1e3:9.1f} ms")
  print(f"  rollout {out['rollout_decode_tokens_per_s']:,.0f} decode tokens/s, update "
        f"{out['update_tokens_per_s']:,.0f} tokens/s; rollout / update = "
        f"{out['rollout_over_update']:.2f} (target <= 3)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
