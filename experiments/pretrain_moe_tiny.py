"""A tiny DeepSeek-V3-style model: MLA attention and a mixture of experts, expert parallel.

Same data, optimizer and schedule as experiments/pretrain_mla_tiny.py. Four
layers of width 192 with MLA; the first keeps a dense MLP, the other three
are MoE layers of 8 routed experts (top-2) plus 1 shared expert, each of
width 128, routed as DeepSeek-V3 routes: sigmoid scores, 4 groups of which
the best 2 are searched, normalized top-k gates, aux-loss-free balancing
with a 1e-4 sequence-wise f.P loss, dropless
dispatch, and one multi-token-prediction depth (weight 0.3). Expert
parallel: the 8 fake devices form expert=4 x data=2, each device holding 2
experts of every MoE layer, tokens sharded over both axes. The bias step is
gamma = 1e-2, not V3's 1e-3: in a 250-step run the bias must be able to
move by more than the router's early score gaps (the first steps of a smoke
run took the busiest expert to 3.9x the mean load at gamma 1e-3). On a CPU,
`--config.model.moe.dispatch=capacity` (factor 1.25, dropping overflow)
steps about 1.1x faster than dropless (see tools/BENCHMARKS.md).

  python -m fmjax.main --config=experiments/pretrain_moe_tiny.py --workdir=runs/pretrain_moe_tiny

A token uses (2 routed + 1 shared) x 128 = 384 MLP columns, as the dense MLP
of the first layer does (d_ff 384): experiments/moe_vs_dense.py trains this
model next to the dense model of equal active compute.

What to expect (see tools/BENCHMARKS.md): 3.85M parameters of which 2.52M
are active per token, 18.1 MFLOP per token; metrics.jsonl records each expert's share of assignments
per layer (moe_load), the busiest expert over the mean (moe_load_max, about
1.3-1.9 at the first step), the f.P and router z-losses (summed over the 3
MoE layers: about 3.0 and 13.5 at the first step), no drops, and the bias
range; expert_load.png plots the load over training. A 4-step smoke run
(--config.train.steps=4) gives train loss 7.65 -> 7.19. The full run
(measured 2026-11-23, 709 s on 2 shared CPU cores) reaches held-out loss
3.90 (3.96 without MTP, see moe_vs_dense.py); by then the busiest expert
carries 1.15x the mean load, nothing is dropped, and the bias spans
-0.16 .. 0.46.
"""

from fmjax import config


def get_config():
  c = config.base()
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, d_ff=384,
                 tie_embeddings=False, attention="mla", q_lora_rank=0, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48,
                 mtp_depth=1, mtp_weight=0.3)
  c.model.moe.update(
      n_routed_experts=8, n_shared_experts=1, experts_per_token=2, moe_intermediate_size=128,
      first_k_dense=1, moe_layer_freq=1, score="sigmoid", n_group=4, topk_group=2,
      norm_topk_prob=True, routed_scaling_factor=1.0, balance="aux_free",
      bias_update_rate=1e-2, aux_loss_coef=1e-4, aux_loss_scope="sequence",
      router_z_loss_coef=0.0, dispatch="dropless")
  c.data.update(mixture="kjv", seq_len=256, eval_batches=8)
  c.optimizer.update(lr=3e-3, schedule="cosine", warmup_steps=25, weight_decay=0.1)
  c.mesh.update(data=2, fsdp=1, expert=4, tensor=1, cpu_devices=8)
  c.sharding.activations.batch = "data,fsdp,expert"  # tokens over the expert axis too
  c.train.update(steps=250, batch_size=16, log_every=5, eval_every=50)
  c.checkpoint.update(every=100, keep=2)
  return c
