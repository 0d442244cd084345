"""RL with verifiable rewards: GRPO on written-out addition, from an SFT checkpoint.

sft (this file, argument `sft`) -> grpo (this file). The task is the `addition`
family of fmjax/data/tasks.py: "Add 47 + 85" answered column by column with
the carries written out ("7+5=12, 4+8+1=13, so 132"); the verifier
(fmjax.data.tasks:reward) checks only the final number. Level 0 (trained)
adds 2-digit numbers; held-out levels 1 and 2 add 3- and 4-digit ones.

  python -m fmjax.main --config=experiments/grpo_tiny.py:sft --workdir=runs/grpo_sft_tiny
  python experiments/grpo_tiny.py --eval runs/grpo_sft_tiny   # pass@1 before
  python -m fmjax.main --config=experiments/grpo_tiny.py --workdir=runs/grpo_tiny
  python experiments/grpo_tiny.py --eval runs/grpo_tiny        # pass@1 after

pass@1 is the chance that one answer sampled from the policy at temperature 1
(its own distribution, the one GRPO samples and maximises) is right. `--eval`
estimates it from 4 samples of each of the first 200 held-out prompts of each
level, and also gives the greedy answers' pass rate, through
fmjax.nn.decoding.generate and tasks.verify (not the RL code). Each evaluation
in the run gives both over 200 held-out prompts, 8 samples each.

The choices. RL learns only from rewards it sees, so the start must pass some
held-out prompts: the kjv-pretrained tiny model after sft_tiny answers 1 of 300
of the original tasks. So a small model (2 layers, d_model 64) is fine-tuned
from scratch on addition alone for SFT_STEPS = 400 steps: its greedy answers
are right on 72.5% of held-out level-0 prompts, but a sampled answer only on
25.5% (its digit copies and column sums are unsure), inside the 10-60% the RL
target asks for. GRPO samples G=8 completions for each of 64 prompts a step at
temperature 1, rewards them with the verifier, and takes one clipped update
per batch (token-level aggregation, clip 0.2/0.28 as DAPO, no KL: beta 0 frees
the reference; Adam at lr 1e-4, b2 0.99, no warmup). The batch and the rate
were chosen on the same start (2026-11-30; the train pass rate and held-out
figures of each are in tools/BENCHMARKS.md, "RL"): at 16 prompts a step, lr
1e-4 took greedy pass@1 from 0.725 to 0.575 in 50 steps, and lr 5e-5 moved
pass@1 from 0.255 to 0.282 in 200 steps; 64 prompts a step carry lr 1e-4
without harm, while lr 2e-4 is too much there too (greedy 0.615 at step 50);
four updates per batch (mu=4) learnt no faster per rollout.

Measured (2026-11-30, the 2-core CPU; 2 fake devices):

- SFT, 400 steps (80 s): held-out pass@1 at level 0 0.255 (greedy 0.725);
  levels 1 and 2: 0.001 and 0 (greedy 0 and 0).
- GRPO, 300 steps (27 min wall with its evaluations; a step 5.1 s, of which
  the rollout is 1.3 s): `--eval` gives pass@1 at level 0 0.255 -> 0.416 and
  greedy 0.725 -> 0.825; with `--samples 16`, pass@1 0.250 -> 0.410. So GRPO
  gains 16 points of pass@1 (target: 15) and 10 of greedy pass@1. The held-out
  harder levels stay out of reach (pass@1 0.001 -> 0 at level 1, 0 at level 2;
  greedy 0): the policy never wrote a third column. In the run (200 prompts x
  8), pass@1 at level 0 was 0.278, 0.311, 0.349, 0.362, 0.390, 0.435 at steps
  50-300 and greedy 0.77, 0.755, 0.83, 0.76, 0.785, 0.825; the train pass rate
  went from 0.21-0.26 (steps 1-20) to 0.33-0.45 (steps 275-300) and the
  entropy of a response token from 0.24 to 0.17 nats. Sampler/trainer log-prob
  gap: at most 5.0e-5, mean 3.1e-7.
- Earlier designs that did not reach the target (tools/BENCHMARKS.md, "RL"):
  starting from SFT at 300 steps (greedy 0.27) with 16 prompts a step at
  temperature 0.8, no learning rate both moved the policy and kept its greedy
  answers. That start was mid-way through learning to copy digits, and its
  small batches were too noisy for any rate that moves the policy.

`--eval RUN --step N` evaluates checkpoint N instead of the latest.

Smoke test: add --config.train.steps=3.
"""

import argparse
import json
import sys

from fmjax import config

SFT = "runs/grpo_sft_tiny"
SFT_STEPS = 400


def _common(c):
  c.model.update(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                 tie_embeddings=False)
  c.objective.tasks = "addition"
  c.data.update(seq_len=64, eval_batches=4)
  c.mesh.update(data=2, fsdp=1, tensor=1, cpu_devices=2)
  c.train.update(sample_tokens=0, log_every=5)
  return c


def get_config(arg=""):
  c = _common(config.base())
  if arg == "sft":
    c.objective.name = "sft"
    c.optimizer.update(lr=3e-3, schedule="cosine", warmup_steps=20, weight_decay=0.0)
    c.train.update(steps=SFT_STEPS, batch_size=32, eval_every=50)
    c.checkpoint.update(every=50, keep=2)
    return c
  if arg:
    raise ValueError(f"grpo_tiny takes '' or 'sft', not {arg!r}")
  c.objective.name = "grpo"
  c.objective.rl.update(group_size=8, max_new_tokens=24, temperature=1.0, top_p=1.0, updates=1,
                        clip_low=0.2, clip_high=0.28, kl_beta=0.0, advantage="grpo",
                        aggregation="token", eval_prompts=200)
  c.optimizer.update(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0, b2=0.99)
  c.train.update(steps=300, batch_size=512, eval_every=50)
  c.checkpoint.update(every=50, keep=2, init_from=SFT)
  return c


def pass_at_1(workdir: str, examples: int = 200, step: int | None = None, samples: int = 4,
              temperature: float = 1.0) -> dict:
  """Held-out pass@1 of the run in `workdir` at each addition level: of its greedy answers,
  and of `samples` answers per prompt sampled at `temperature` (the mean success of one
  sample, the quantity GRPO maximises)."""
  import jax  # noqa: F401  only when evaluating: get_config must stay light
  from fmjax.data import task_batches, tasks, tokenizer as tokenizer_lib  # same reason
  from fmjax.nn import decoding  # same reason
  from fmjax.nn.spec import ModelSpec  # same reason
  from fmjax.posttrain import lora  # same reason
  from fmjax.train import trained_run  # same reason

  cfg, _, params, step = trained_run.load(workdir, "grpo_tiny", step)
  params, spec = lora.merge(jax.device_get(params), cfg.lora), ModelSpec.from_config(cfg)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  out = {"step": step}
  for level in tasks.LEVELS:
    data = tasks.Instructions("validation", seed=cfg.data.seed, level=level, tasks=("addition",))
    chunk = [data[i] for i in range(examples)]
    prompts = [task_batches.render(tok, e["prompt"], "")[0] for e in chunk]

    def right(answers):
      return sum(tasks.verify("addition", e["prompt"],
                              tok.decode([t for t in a[len(p):] if t != tok.eos_id]))
                 for e, p, a in zip(chunk, prompts, answers))

    out[f"level_{level}"] = right(decoding.generate(
        params, spec, prompts, 40, temperature=0.0, stop_id=tok.eos_id)) / examples
    out[f"level_{level}_sampled"] = sum(right(decoding.generate(
        params, spec, prompts, 40, temperature=temperature, stop_id=tok.eos_id, seed=seed))
        for seed in range(samples)) / (examples * samples)
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description="held-out pass@1 of a grpo_tiny run")
  parser.add_argument("--eval", required=True, help="a workdir")
  parser.add_argument("--examples", type=int, default=200)
  parser.add_argument("--step", type=int, default=None, help="a checkpoint (default: the latest)")
  parser.add_argument("--samples", type=int, default=4, help="sampled answers per prompt")
  parser.add_argument("--temperature", type=float, default=1.0, help="of the sampled answers")
  args = parser.parse_args()
  print(json.dumps(pass_at_1(args.eval, args.examples, args.step, args.samples,
                             args.temperature)))
  sys.exit(0)
