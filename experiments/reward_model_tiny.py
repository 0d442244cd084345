"""A reward model on the addition preferences, from the SFT model of grpo_tiny.

sft (experiments/grpo_tiny.py:sft) -> reward_model_tiny -> rlhf_tiny. Starts
from the SFT checkpoint's parameters (checkpoint.init_from) and adds a scalar
head on the final hidden state of each sequence's last token
(fmjax/posttrain/reward_model.py), trained with the Bradley-Terry loss on
preference pairs of the `addition` task (fmjax/data/tasks.py): the chosen
response is the correct column-by-column sum, the rejected one the same steps
with a final number off by 1 or 10. Any JSONL of prompt/chosen/rejected
records trains it the same way: --config.objective.reward_model.data=FILE.

  python -m fmjax.main --config=experiments/grpo_tiny.py:sft --workdir=runs/grpo_sft_tiny
  python -m fmjax.main --config=experiments/reward_model_tiny.py --workdir=runs/reward_model_tiny

Held-out pairwise accuracy and margin are eval_accuracy and eval_margin in
metrics.jsonl. Measured (2026-11-30, shared 2-core CPU, 6 min wall): on 128
held-out pairs, accuracy 0.555 / 0.555 / 0.570 / 0.570 and margin 0.25 / 0.26 /
0.30 / 0.58 at steps 50 / 100 / 150 / 200 (held-out loss 0.643 -> 0.625).
Telling a right sum from one off by 1 or 10 means redoing the addition, which
this 2-layer model does poorly: the reward model is weak, which rlhf_tiny shows.
On an easy synthetic preference the same objective reaches > 0.9
(tests/test_reward_model.py).

Smoke test: add --config.train.steps=5.
"""

from fmjax import config

SFT = "runs/grpo_sft_tiny"


def get_config():
  c = config.base()
  c.model.update(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                 tie_embeddings=False)
  c.objective.name = "reward_model"
  c.objective.tasks = "addition"
  c.data.update(seq_len=64, eval_batches=4)
  c.mesh.update(data=2, fsdp=1, tensor=1, cpu_devices=2)
  c.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=20, weight_decay=0.0)
  c.train.update(steps=200, batch_size=32, log_every=10, eval_every=50, sample_tokens=0)
  c.checkpoint.update(every=50, keep=2, init_from=SFT)
  return c
