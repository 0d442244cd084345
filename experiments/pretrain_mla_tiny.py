"""The default experiment with multi-head latent attention in place of GQA.

Same data, mesh, optimizer and schedule as experiments/pretrain_tiny.py, and
about the same size: MLA's attention here has 109,632 parameters per layer
against GQA's 110,592. Its decoding cache holds kv_lora_rank + qk_rope_head_dim
= 80 numbers per token per layer, against GQA's 2 x 2 KV heads x 48 = 192.

  python -m fmjax.main --config=experiments/pretrain_mla_tiny.py --workdir=runs/pretrain_mla_tiny

What to expect: held-out loss 4.81 at step 50, 4.40 at 100, 4.00 at 200
and 3.90 at 250 (the default GQA experiment: 3.99), a sample decoded from the
latent cache in the absorbed form, and about the default's wall time on an
idle 2-core CPU (30 min measured on a shared one; see tools/BENCHMARKS.md).
"""

from fmjax import config


def get_config():
  c = config.base()
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, d_ff=512,
                 tie_embeddings=False, attention="mla", q_lora_rank=0, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48)
  c.data.update(mixture="kjv", seq_len=256, eval_batches=8)
  c.optimizer.update(lr=3e-3, schedule="cosine", warmup_steps=25, weight_decay=0.1)
  c.mesh.update(data=2, fsdp=2, tensor=2, cpu_devices=8)
  c.train.update(steps=250, batch_size=16, log_every=5, eval_every=50)
  c.checkpoint.update(every=100, keep=2)
  return c
