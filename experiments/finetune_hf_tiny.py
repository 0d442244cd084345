"""Fine-tune a Hugging Face checkpoint: `checkpoint.init_from` names an HF directory.

The argument is the directory (a LlamaForCausalLM, or a DeepseekV3ForCausalLM
whose layers are all dense); the model fields come from its config.json and
the tokenizer from its tokenizer.model. The default is the default
experiment's model, exported:

  python -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m fmjax.convert to-hf --workdir=runs/pretrain_tiny --out=runs/pretrain_tiny_hf
  python -m fmjax.main --config=experiments/finetune_hf_tiny.py --workdir=runs/finetune_hf_tiny
  python -m fmjax.main --config=experiments/finetune_hf_tiny.py:/path/to/hf_dir --workdir=DIR

The run starts from the HF parameters with a fresh optimizer at step 0, at a
tenth of the pretraining learning rate; its first held-out loss is the
exported model's (about 4.0 nats/token for the default). A directory that
fmjax cannot hold exactly (mixture of experts, MTP, biases, another rope
scaling, a tensor no mapping reads) stops the run with a one-line error
before anything is written. Until the directory exists, the file describes
the default experiment's model, so that it validates.

Smoke test: add --config.train.steps=5.
"""

import os

from fmjax import config
from fmjax.hf import files as hf

DEFAULT = "runs/pretrain_tiny_hf"


def get_config(arg=None):
  hf_dir = arg or DEFAULT
  c = config.base()
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                 d_ff=512, tie_embeddings=False)
  if os.path.isfile(os.path.join(hf_dir, "config.json")):
    c.model.update(hf.read_config(hf_dir)[1])
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
      c.data.tokenizer_path = os.path.join(hf_dir, "tokenizer.model")
  c.checkpoint.update(init_from=hf_dir, every=100, keep=2)
  c.data.update(mixture="kjv", seq_len=256, eval_batches=8)
  c.optimizer.update(lr=3e-4, schedule="cosine", warmup_steps=10, weight_decay=0.1)
  c.mesh.update(data=2, fsdp=2, tensor=2, cpu_devices=8)
  c.train.update(steps=100, batch_size=16, log_every=5, eval_every=50)
  return c
