"""The DeepSeek-style MoE of experiments/pretrain_moe_tiny.py scaled to about 1B parameters:
the GPU MFU benchmark for mixtures of experts.

  python -m fmjax.bench --config=experiments/bench_moe_1b.py

12 layers of width 1536 with MLA (q rank 768, KV rank 256, 12 heads of
128 + 64 rope dims); the first layer keeps a dense MLP (d_ff 6144), the
other 11 are MoE layers of 16 routed experts (top-2, sigmoid scores, 4
groups of which 2 are searched, aux-loss-free bias) plus 1 shared expert,
each of width 1024, dispatched dropless with grouped matmuls
(`model.moe.grouped_matmul=auto`: blocked on GPUs and CPUs, megablox on TPUs). Vocabulary 32768, untied. That is 1.09B
parameters of which 0.36B are active per token, 2.45 GFLOP per token for
training. bf16 compute with float32
master weights and AdamW state, remat "dots", 8 sequences of 2048 tokens a
step. On one device there is no expert parallelism; on several, add
`--config.mesh.expert=N --config.sharding.activations.batch=data,fsdp,expert`.
The target on one H200 or H100: MFU >= 35% dropless, and dropless at least as
fast as capacity dispatch (tools/bench_gpu.py). Figures in tools/BENCHMARKS.md.
"""

from fmjax import config


def get_config():
  c = config.base()
  c.model.update(vocab_size=32768, d_model=1536, n_layers=12, n_heads=12, d_ff=6144,
                 tie_embeddings=False, attention="mla", q_lora_rank=768, kv_lora_rank=256,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 dtype="bfloat16", remat="dots")
  c.model.moe.update(
      n_routed_experts=16, n_shared_experts=1, experts_per_token=2, moe_intermediate_size=1024,
      first_k_dense=1, moe_layer_freq=1, score="sigmoid", n_group=4, topk_group=2,
      norm_topk_prob=True, routed_scaling_factor=1.0, balance="aux_free",
      bias_update_rate=1e-3, aux_loss_coef=1e-4, aux_loss_scope="sequence", dispatch="dropless")
  c.data.update(seq_len=2048)
  c.objective.update(ce_chunk=0)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.train.update(batch_size=8)
  return c
