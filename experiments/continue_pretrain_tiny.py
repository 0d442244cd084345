"""Stage 2: continue pretraining the default model on a mixture of scripture and Python code.

Starts from the parameters of `experiments/pretrain_tiny.py`'s latest
checkpoint (checkpoint.init_from; a fresh optimizer at step 0) and trains on
half King James Bible, half Python standard-library source code, which it has
never seen. Run, from the repository root:

  python -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python tools/convert_text.py --out=~/.cache/fmjax/pystdlib/pystdlib \
      "$(python -c 'import os; print(os.path.dirname(os.__file__))')/*.py"
  python -m fmjax.main --config=experiments/continue_pretrain_tiny.py --workdir=runs/continue_pretrain_tiny

The first command is the default experiment (skip it if runs/pretrain_tiny
exists); the second converts the ~170 .py files of the standard library (one
document per file, every 20th held out) to ArrayRecord once, in about a
second. The tokenizer stays the stage-1 one (trained on the Bible), so code
costs more tokens per character; it round-trips exactly through byte fallback.

Held-out loss is measured on the same mixture (its last stage). The
curriculum moves from 80% Bible to 50/50 over the first 40 steps, so the
model is not thrown straight onto unfamiliar text. Smoke test: add
--config.train.steps=5.
"""

from fmjax import config

PRETRAINED = "runs/pretrain_tiny"
CODE = "code=arrayrecord(~/.cache/fmjax/pystdlib/pystdlib-{split}.array_record-*)"


def get_config():
  c = config.base()
  # The model must be the stage-1 model: init_from restores its parameters by shape.
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                 d_ff=512, tie_embeddings=False)
  c.data.update(mixture=f"kjv:0.8, {CODE}:0.2", curriculum="40: kjv:0.5, code:0.5",
                seq_len=256, eval_batches=8)
  c.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=10, weight_decay=0.1)
  c.mesh.update(data=2, fsdp=2, tensor=2, cpu_devices=8)
  c.train.update(steps=150, batch_size=16, log_every=5, eval_every=50,
                 sample_prompt="def ")
  c.checkpoint.update(every=50, keep=2, init_from=PRETRAINED)
  return c
