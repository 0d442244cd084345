"""RLHF: PPO with a value head against the learned reward model of reward_model_tiny.

sft (experiments/grpo_tiny.py:sft) -> reward_model_tiny -> rlhf_tiny. The
policy starts from the SFT checkpoint; its reward is the reward model's score
of each prompt and sampled completion (objective.rl.reward_model, weight 1),
not the verifier: the verifier only measures the held-out pass rate. PPO
(objective.rl.advantage = 'gae'): a value head on the policy's final hidden
state, GAE with gamma 1 and lambda 0.95 over the response tokens, a value loss
of weight 0.1, a k3 KL penalty of 0.05 to the frozen SFT model, and 2 clipped
updates per batch of rollouts.

  python -m fmjax.main --config=experiments/grpo_tiny.py:sft --workdir=runs/grpo_sft_tiny
  python -m fmjax.main --config=experiments/reward_model_tiny.py --workdir=runs/reward_model_tiny
  python -m fmjax.main --config=experiments/rlhf_tiny.py --workdir=runs/rlhf_tiny

The reward curve is runs/rlhf_tiny/reward_curve.png. Measured (2026-11-30,
shared 2-core CPU, 40 steps in 5 min wall): the learned reward of the samples
rose (held-out mean reward -1.39 at step 20, -0.19 at step 40; train batches
-2.3 at step 2 to -0.7 at step 40, noisy) while the verifier's held-out pass@1
fell from the SFT model's 0.27 to 0.01 (step 20) and 0.10 (step 40), KL to the
SFT model 0 -> 0.25: the policy exploits a reward model that is right on only
57% of held-out pairs (reward_model_tiny), the reward hacking RLHF is known for.
Sampler/trainer log-prob gap at most 1.8e-5.

Smoke test: add --config.train.steps=3.
"""

from fmjax import config

SFT = "runs/grpo_sft_tiny"
REWARD_MODEL = "runs/reward_model_tiny"


def get_config():
  c = config.base()
  c.model.update(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                 tie_embeddings=False)
  c.objective.name = "grpo"
  c.objective.tasks = "addition"
  c.objective.rl.update(group_size=4, max_new_tokens=24, temperature=1.0, updates=2,
                        clip_low=0.2, clip_high=0.2, kl_beta=0.05, advantage="gae",
                        gamma=1.0, lam=0.95, value_coef=0.1, verifier_weight=0.0,
                        reward_model=REWARD_MODEL, reward_model_weight=1.0, eval_prompts=100)
  c.data.update(seq_len=64)
  c.mesh.update(data=2, fsdp=1, tensor=1, cpu_devices=2)
  c.optimizer.update(lr=5e-5, schedule="constant", warmup_steps=0, weight_decay=0.0, b2=0.99)
  c.train.update(steps=40, batch_size=32, log_every=2, eval_every=20, sample_tokens=0)
  c.checkpoint.update(every=20, keep=2, init_from=SFT)
  return c
