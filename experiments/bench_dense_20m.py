"""A 20M-parameter dense decoder at sequence length 256: the CPU MFU benchmark.

  python -m fmjax.bench --config=experiments/bench_dense_20m.py

6 layers, d_model 512, 8 heads, d_ff 1408, vocab 2048: 21.2M parameters.
On one device by default (the target: MFU >= 0.5 of the measured matmul peak;
measured on an otherwise idle 2-core machine: 54.9%, 684 tokens/s, a 6.0 s
step); the figures are in tools/BENCHMARKS.md. Trains like any experiment:

  python -m fmjax.main --config=experiments/bench_dense_20m.py --workdir=runs/dense_20m
"""

from fmjax import config


def get_config():
  c = config.base()
  c.model.update(vocab_size=2048, d_model=512, n_layers=6, n_heads=8, n_kv_heads=8,
                 d_ff=1408, tie_embeddings=False)
  c.data.update(mixture="kjv", seq_len=256)
  c.mesh.update(data=1, fsdp=1, tensor=1, cpu_devices=1)
  c.train.update(steps=1000, batch_size=16)
  return c
