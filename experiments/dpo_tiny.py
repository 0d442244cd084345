"""Stage 3 of the post-training pipeline: DPO with LoRA on the SFT model.

pretrain_tiny -> sft_tiny -> dpo_tiny. Starts from `experiments/sft_tiny.py`'s
latest parameters, which also are the frozen reference (objective.dpo.reference
defaults to checkpoint.init_from). Trains rank-8 LoRA adapters on every
attention and MLP projection (the base stays frozen: no gradients, no optimizer
state) with the sigmoid DPO loss, beta 0.1, on preference pairs whose chosen
response is correct and rejected one nearly so (fmjax/data/tasks.py). The
reference's log-probabilities of the 2,400 train pairs and the held-out pairs
are precomputed once at start-up, and the reference is then dropped.

  python -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m fmjax.main --config=experiments/sft_tiny.py --workdir=runs/sft_tiny
  python -m fmjax.main --config=experiments/dpo_tiny.py --workdir=runs/dpo_tiny
  python -m fmjax.task_eval --workdir=runs/dpo_tiny
  python -m fmjax.export --workdir=runs/dpo_tiny --out=runs/dpo_tiny_merged  # LoRA merged in

What to expect (measured on a heavily shared 2-core CPU: about 14 minutes, the
precomputation included; far less on an idle one): held-out reward accuracy on
128 held-out pairs (eval_rewards/accuracies in metrics.jsonl: the chosen
response's implicit reward beta log(pi/ref) strictly above the rejected one's)
from 0 at step 0 (policy = reference: every margin exactly 0, loss ln 2) to
0.65 at step 50, 0.69 at 100 and 0.73 at 150, above the 0.5 of chance; held-out
loss 0.693 -> 0.601, reward margin 0.41. 110,592 parameters are trained (4.6%).

Smoke test: add --config.train.steps=5.
"""

from fmjax import config

SFT = "runs/sft_tiny"


def get_config():
  c = config.base()
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                 d_ff=512, tie_embeddings=False)
  c.objective.name = "dpo"
  c.objective.dpo.update(loss="sigmoid", beta=0.1, precompute_reference=True)
  c.lora.update(rank=8, alpha=16.0, targets=r"layers\.w[qkvo]$, layers\.w_(gate|up|down)$")
  # One pair per row: the longest (sorting) pairs are 81 tokens.
  c.data.update(seq_len=96, eval_batches=8, task_size=2400)
  c.optimizer.update(lr=2e-3, schedule="cosine", warmup_steps=10, weight_decay=0.0)
  c.mesh.update(data=2, fsdp=2, tensor=2, cpu_devices=8)
  c.train.update(steps=150, batch_size=16, log_every=10, eval_every=50,
                 sample_prompt="<|user|>\nWhat is 12 + 7?\n<|assistant|>\n", sample_tokens=8,
                 sample_temperature=0.0)
  c.checkpoint.update(every=50, keep=2, init_from=SFT)
  return c
