"""Stage 2 of the post-training pipeline: supervised fine-tuning of the default model.

pretrain_tiny -> sft_tiny -> dpo_tiny. Starts from `experiments/pretrain_tiny.py`'s
latest parameters (checkpoint.init_from; a fresh optimizer at step 0) and
trains on the verifiable instruction tasks of fmjax/data/tasks.py (arithmetic,
string reversal, sorting) rendered with the chat template; the loss is on
response tokens only (objective 'sft'). Examples are packed into rows of 256.

  python -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m fmjax.task_eval --workdir=runs/pretrain_tiny    # the base model's task accuracy
  python -m fmjax.main --config=experiments/sft_tiny.py --workdir=runs/sft_tiny
  python -m fmjax.task_eval --workdir=runs/sft_tiny         # after SFT

What to expect (measured on a heavily shared 2-core CPU: about 50 minutes; far
less on an idle one): the train loss on response tokens falls from 5.9 nats
(step 10) to about 1.4, the held-out one to 1.43 with a teacher-forced response-
token accuracy of 0.56 (0.48 at step 100); greedy held-out task accuracy (300
validation prompts, answers checked by recomputation) rises from 0/300 for the
base model to 1/300 (arithmetic 1%). A 2.4M-parameter model after 300 steps
has learned the answer format, not yet the tasks: exact answers need a longer
run.

Smoke test: add --config.train.steps=5.
"""

from fmjax import config

PRETRAINED = "runs/pretrain_tiny"


def get_config():
  c = config.base()
  # The model must be the stage-1 model: init_from restores its parameters by shape.
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                 d_ff=512, tie_embeddings=False)
  c.objective.name = "sft"
  c.data.update(seq_len=256, eval_batches=8)
  c.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=20, weight_decay=0.1)
  c.mesh.update(data=2, fsdp=2, tensor=2, cpu_devices=8)
  c.train.update(steps=300, batch_size=16, log_every=10, eval_every=100,
                 sample_prompt="<|user|>\nWhat is 12 + 7?\n<|assistant|>\n", sample_tokens=8,
                 sample_temperature=0.0)
  c.checkpoint.update(every=100, keep=2, init_from=PRETRAINED)
  return c
