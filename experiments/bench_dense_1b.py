"""A 1.1B-parameter dense decoder at sequence length 2048 in bf16: the GPU MFU benchmark.

  python -m fmjax.bench --config=experiments/bench_dense_1b.py[:seq8192|:seq32768]

16 layers, d_model 2048, 32 heads (8 KV heads), d_ff 8192, vocab 32768: about
1.1B parameters (Llama-3.2-1B's shape with a smaller vocabulary). bf16
compute with float32 master weights and AdamW state, projections saved and attention
recomputed in the backward pass (remat "dots"), 8 sequences of 2048
tokens a step, on every device the process sees (data parallel). The targets on
one H200 or H100: MFU >= 50% (causal attention counted as half the square) and
tokens/s >= 1.2x PyTorch's torch.compile at the same shape, measured beside
it by tools/bench_gpu.py. Figures in tools/BENCHMARKS.md.

The same model at longer sequences (the argument after the colon):
  seq8192    2 sequences of 8192 tokens a step (the same tokens per step)
  seq32768   1 sequence of 32768 tokens a step, remat "full" (every layer recomputed)
tools/bench_gpu.py measures all three, with each attention kernel, in one command.

Variants to compare on the device (each one command):
  --config.model.remat=full (less memory)   --config.train.batch_size=16   --config.objective.ce_chunk=512
Per-device memory estimate without a GPU (compile only): add --steps=0 --config.mesh.cpu_devices=1.
"""

from fmjax import config

# argument -> (seq_len, batch_size, remat)
VARIANTS = {"": (2048, 8, "dots"), "seq8192": (8192, 2, "dots"), "seq32768": (32768, 1, "full")}


def get_config(arg=None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; expected one of: "
                     f"{', '.join(v for v in VARIANTS if v)} (or none)")
  seq_len, batch_size, remat = VARIANTS[arg]
  c = config.base()
  c.model.update(vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                 d_ff=8192, tie_embeddings=False, dtype="bfloat16", remat=remat)
  c.data.update(seq_len=seq_len)
  c.objective.update(ce_chunk=0)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.train.update(batch_size=batch_size)
  return c
