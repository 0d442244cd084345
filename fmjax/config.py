"""The experiment schema: every field fmjax reads, and its default.

An experiment file starts from `base()` and overrides what it needs. The
commands check the whole config with `fmjax.validate.validate` before anything
is compiled or written; a bad field raises `ConfigError` with a one-line
message that names it and the fix.
"""

from __future__ import annotations

import hashlib
import json

import ml_collections

from fmjax.errors import ConfigError  # noqa: F401  (raised for bad fields; importable from here)

# The simple constraints of the schema, which fmjax.validate checks before any other:
# the values a field may take, and the fields that must be > 0 or >= 0.
CHOICES = {
    "model.attention": ("gqa", "mla"),
    "model.attention_impl": ("auto", "xla", "cudnn", "pallas", "splash"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.parametrization": ("sp", "mup"),
    "model.rope_scaling.kind": ("none", "linear", "ntk", "yarn", "llama3"),
    "model.mlp_activation": ("silu", "gelu_tanh"),
    "model.moe.score": ("softmax", "sigmoid"),
    "model.moe.balance": ("aux", "aux_free", "none"),
    "model.moe.aux_loss_scope": ("batch", "sequence"),
    "model.moe.dispatch": ("capacity", "dropless"),
    "model.moe.grouped_matmul": ("auto", "ragged_dot", "blocked", "gmm"),
    "data.bad_utf8": ("error", "skip"),
    "data.tokenizer": ("bpe", "unigram"),
    "objective.name": ("next_token", "sft", "dpo", "contrastive", "reward_model", "grpo"),
    "objective.rl.advantage": ("grpo", "dr_grpo", "rloo", "gae"),
    "objective.rl.aggregation": ("token", "sequence"),
    "objective.dpo.loss": ("sigmoid", "ipo", "hinge"),
    "objective.contrastive.pooling": ("mean", "last"),
    "optimizer.name": ("adamw", "lion"),
    "optimizer.schedule": ("cosine", "wsd", "constant"),
    "train.nonfinite": ("skip", "restore", "halt"),
}
POSITIVE = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff",
    "model.n_kv_heads", "model.kv_lora_rank", "model.qk_rope_head_dim", "model.v_head_dim",
    "model.rope_theta", "model.mup_base_width", "model.moe.moe_intermediate_size",
    "model.moe.moe_layer_freq",
    "model.moe.n_group", "model.moe.routed_scaling_factor", "model.moe.capacity_factor",
    "data.max_doc_bytes", "objective.dpo.beta", "objective.contrastive.temperature",
    "objective.rl.group_size", "objective.rl.max_new_tokens", "objective.rl.updates",
    "objective.rl.top_p",
    "optimizer.lr", "train.steps", "train.batch_size", "train.microbatches", "train.log_every",
    "train.nonfinite_max_consecutive", "checkpoint.keep", "lora.alpha")
NON_NEGATIVE = (
    "model.head_dim", "model.q_lora_rank", "model.qk_nope_head_dim", "model.mtp_depth",
    "model.mtp_weight", "model.rope_scaling.mscale", "model.sliding_window",
    "model.full_attention_every", "model.local_rope_theta", "model.query_scale_dim",
    "model.attn_softcap", "model.logit_softcap",
    "model.moe.n_routed_experts",
    "model.moe.n_shared_experts", "model.moe.aux_loss_coef", "model.moe.router_z_loss_coef",
    "data.num_workers", "data.shards", "data.task_size", "objective.z_loss",
    "objective.ce_chunk", "objective.contrastive.projection_dim", "optimizer.warmup_steps",
    "objective.rl.temperature", "objective.rl.clip_low", "objective.rl.clip_high",
    "objective.rl.kl_beta", "objective.rl.verifier_weight",
    "objective.rl.reward_model_weight", "objective.rl.value_coef",
    "objective.rl.eval_prompts",
    "optimizer.decay_steps", "optimizer.clip_norm", "train.eval_every", "train.spike_zscore",
    "train.eval_suite_every",
    "checkpoint.every", "lora.rank")


def base() -> ml_collections.ConfigDict:
  """Every field, with its default. Experiment files override these."""
  c = ml_collections.ConfigDict()

  c.model = dict(
      vocab_size=2048,
      depth=0,  # size dial: > 0 sets n_layers, d_model, heads and d_ff (fmjax/scaling/sizing.py)
      aspect_ratio=64,  # d_model per layer under the size dial
      d_model=256,
      n_layers=4,
      n_heads=4,
      d_ff=768,
      tie_embeddings=False,
      attention="gqa",  # gqa | mla
      # The attention kernel (fmjax/nn/attention.py): xla (the reference; any
      # backend), cudnn (GPU), pallas (GPU; interpreted on CPUs), splash (TPU;
      # interpreted on CPUs); auto: the fastest exact one on the backend.
      attention_impl="auto",
      # gqa: grouped-query attention
      n_kv_heads=4,
      head_dim=0,  # 0: d_model // n_heads
      # mla: DeepSeek-V3 multi-head latent attention
      q_lora_rank=0,  # 0: a plain query projection
      kv_lora_rank=64,  # the cached latent
      qk_nope_head_dim=32,
      qk_rope_head_dim=16,  # one rotary key, shared by all heads
      v_head_dim=32,
      rope_theta=10000.0,
      # Context extension: 'linear' divides positions by factor, 'ntk' raises
      # theta, 'yarn' interpolates low frequencies only and sharpens the
      # softmax by (0.1 * mscale * ln(factor) + 1)^2.
      # 'llama3' (Llama 3.1+) divides the frequencies that turn fewer than
      # low_freq_factor times over the original context by factor, keeps those
      # turning more than high_freq_factor times, and blends between.
      rope_scaling=dict(kind="none", factor=1.0, original_seq_len=0, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, low_freq_factor=1.0, high_freq_factor=4.0),
      # gqa only: biases on the query, key and value projections (Qwen2.5); an
      # RMSNorm over each query and key head before the rotary embedding (Qwen3);
      # sliding_window > 0: a query sees only the last sliding_window positions,
      # its own included (Mistral).
      attention_bias=False,
      qk_norm=False,
      sliding_window=0,
      # With sliding_window > 0, every k-th layer (k-1, 2k-1, ...) attends to the whole
      # context and the others to the window (Gemma 2: 2, Gemma 3: 6); 0: every layer
      # has the window. local_rope_theta > 0: the windowed layers' rotary theta, without
      # rope_scaling (Gemma 3's local layers); 0: every layer uses rope_theta.
      full_attention_every=0,
      local_rope_theta=0.0,
      # The q.k scale is 1/sqrt(query_scale_dim) (Gemma's query_pre_attn_scalar);
      # 0: the head dim. attn_softcap > 0 caps attention scores at +-cap with
      # cap * tanh(s / cap), logit_softcap the output logits (Gemma 2).
      query_scale_dim=0,
      attn_softcap=0.0,
      logit_softcap=0.0,
      # The gated MLP's activation: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma).
      mlp_activation="silu",
      # Gemma: embeddings times sqrt(d_model) (scale_embeddings); RMSNorm scales as
      # norm_offset + w, w initialised at 1 - norm_offset (Gemma: 1 + w, w from 0);
      # post_norms: an RMSNorm on the attention and MLP outputs before each residual add.
      scale_embeddings=False,
      norm_offset=0.0,
      post_norms=False,
      norm_eps=1e-5,
      init_std=0.02,
      # sp: the declarations' init, one learning rate; mup: the maximal-update
      # parametrization, init and learning rate per parameter role, scaled by
      # d_model / mup_base_width (fmjax/nn/params.py), so the best lr transfers across widths.
      parametrization="sp",
      mup_base_width=256,
      dtype="float32",  # compute dtype; parameters are always float32
      remat="none",  # none | full | dots
      scan_layers=True,
      # Mixture of experts (fmjax/nn/moe.py); n_routed_experts=0 keeps every MLP dense.
      moe=dict(
          n_routed_experts=0,
          n_shared_experts=0,  # experts every token goes through
          experts_per_token=2,  # top-k
          moe_intermediate_size=256,  # width of one expert (and of one shared expert)
          first_k_dense=0,  # the first k layers keep the dense MLP (model.d_ff)
          moe_layer_freq=1,  # after those, layer i is MoE when i % moe_layer_freq == 0
          score="softmax",  # router scores: softmax | sigmoid
          n_group=1,  # group-limited routing: experts in n_group groups, tokens
          topk_group=1,  # pick experts only from their topk_group best groups
          norm_topk_prob=True,  # the top-k weights sum to 1
          routed_scaling_factor=1.0,  # multiplies the routed experts' output
          # aux: the f.P loss; aux_free: DeepSeek-V3's per-expert selection bias,
          # moved by bias_update_rate after each step (plus the f.P loss if
          # aux_loss_coef > 0, V3's complementary loss); none: neither.
          balance="aux",
          aux_loss_coef=0.01,
          aux_loss_scope="batch",  # batch | sequence (f and P per sequence, averaged)
          router_z_loss_coef=0.0,
          bias_update_rate=1e-3,  # gamma
          dispatch="capacity",  # capacity (drops over capacity) | dropless
          capacity_factor=1.25,  # slots per expert = factor x assignments / experts
          # dropless: ragged_dot | blocked | gmm (Pallas megablox; TPU, interpreted on
          # CPUs); auto: gmm on TPU, blocked elsewhere (fmjax/nn/dispatch.py)
          grouped_matmul="auto",
      ),
      mtp_depth=0,  # DeepSeek-V3 multi-token prediction: extra tokens predicted (fmjax/nn/mtp.py)
      mtp_weight=0.3,  # lambda: the MTP loss weight
  )
  c.data = dict(
      # Sources and weights, e.g. "kjv:0.7, synthetic:0.3" (see fmjax/data/mixture.py).
      mixture="kjv",
      curriculum="",  # weights from given steps on, e.g. "500: kjv:0.5, synthetic:0.5"
      data_dir="~/.cache/fmjax",  # where the built corpus and tokenizer live
      tokenizer="bpe",  # model type of the tokenizer trained on kjv: bpe | unigram
      tokenizer_path="",  # a sentencepiece model to use instead (tools/train_tokenizer.py)
      seq_len=256,
      seed=0,
      num_workers=0,  # grain worker processes; 0 reads in the main process
      eval_batches=8,
      max_doc_bytes=1 << 20,  # longer documents are skipped, counted and logged
      bad_utf8="error",  # text that is not UTF-8: error (naming file and record) | skip
      max_skip_fraction=0.01,  # more skipped documents than this stops the run
      # The train stream is read as this many shards (shard i: documents i, i+n, ...),
      # each packed on its own and giving batch_size/shards rows of every batch; a
      # process reads the shards of its rows. 0: one per process. Fixed, the batches
      # are the same on any number of processes.
      shards=0,
      # Train examples of the task datasets the sft and dpo objectives read
      # (fmjax/data/tasks.py); 0: the dataset's default (100k).
      task_size=0,
  )
  c.objective = dict(
      name="next_token",
      z_loss=0.0,
      ce_chunk=0,  # >0: cross-entropy over sequence chunks of this many positions
      # next_token: the data.mixture; sft, dpo, contrastive: the task data
      # (fmjax/data/task_batches.py). See fmjax/train/objectives.py.
      dpo=dict(
          loss="sigmoid",  # sigmoid | ipo | hinge
          beta=0.1,
          label_smoothing=0.0,  # sigmoid only: the chance a preference label is flipped
          reference="",  # workdir of the frozen reference; "" means checkpoint.init_from
          precompute_reference=False,  # its log-probs once per dataset, then free it
      ),
      contrastive=dict(
          pooling="mean",  # mean | last (token)
          projection_dim=0,  # > 0: a linear projection head to this many dims
          symmetric=True,  # CLIP's two directions; False: anchor -> positive only
          temperature=0.07,  # initial; learned, as logit_scale = ln(1/temperature)
          max_logit_scale=100.0,  # the clamp on 1/temperature (CLIP's)
      ),
      # Task families the task objectives draw (fmjax/data/tasks.py), comma-separated;
      # "" the original three (arithmetic, reversal, sorting).
      tasks="",
      # A scalar head on the final hidden state of each sequence's last token,
      # trained with the Bradley-Terry loss (fmjax/posttrain/reward_model.py).
      reward_model=dict(
          data="",  # a JSONL of {prompt, chosen, rejected}; "" the task preferences
      ),
      # GRPO and PPO (fmjax/posttrain/rl.py): rollouts of the policy, rewards, updates.
      # train.batch_size counts sequences: batch_size / group_size prompts a step.
      rl=dict(
          group_size=4,  # G samples per prompt (>= 2)
          max_new_tokens=16,  # the rollout's length; prompt + this must fit data.seq_len
          temperature=1.0,  # the policy is softmax(logits / temperature)
          top_p=1.0,
          updates=1,  # mu: optimizer updates per batch of rollouts
          clip_low=0.2,  # ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO)
          clip_high=0.2,
          kl_beta=0.0,  # k3 KL to the frozen reference (checkpoint.init_from); 0 frees it
          advantage="grpo",  # grpo | dr_grpo | rloo | gae (PPO with a value head)
          aggregation="token",  # token | sequence: how token losses are averaged
          verifier="fmjax.data.tasks:reward",  # module:function(example, completion) -> float
          verifier_weight=1.0,
          reward_model="",  # workdir of a reward_model run
          reward_model_weight=0.0,
          gamma=1.0,  # gae
          lam=0.95,  # gae
          value_coef=0.1,  # gae: weight of the value loss
          eval_prompts=96,  # held-out prompts, answered greedily and group_size times sampled
      ),
  )
  c.optimizer = dict(
      name="adamw",
      lr=3e-3,
      schedule="cosine",
      warmup_steps=100,
      decay_steps=0,  # length of the schedule; 0 means train.steps
      wsd_decay_fraction=0.2,
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
  )
  # Mesh axis sizes; -1 takes the devices that are left.
  c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1, cpu_devices=0)
  # Logical axis -> mesh axes ("" replicated, "data,fsdp" for several).
  # Parameters and activations have separate rules: FSDP is a change to the
  # first only.
  c.sharding = dict(
      params=dict(
          vocab="tensor", embed="fsdp", heads="tensor", kv_heads="tensor",
          head_dim="", mlp="tensor", layers="", q_lora="", kv_lora="", expert="expert"),
      activations=dict(
          batch="data,fsdp", seq="", embed="", heads="tensor",
          kv_heads="tensor", head_dim="", mlp="tensor", vocab="tensor",
          q_lora="", kv_lora="", layers="", expert="expert"),
  )
  c.train = dict(
      steps=1000,
      # Or give the horizon as one of these (fmjax/scaling/sizing.py turns it into steps):
      tokens=0,
      tokens_per_param=0.0,
      flops=0.0,  # a training-FLOP budget
      batch_size=32,  # global, in sequences
      microbatches=1,
      seed=0,
      log_every=10,
      eval_every=200,
      progress=True,
      sample_prompt="And God said",
      sample_tokens=80,
      sample_temperature=0.7,
      # A step whose loss or gradients are NaN/Inf never updates the parameters.
      # skip: count it and go on; halt after nonfinite_max_consecutive in a row.
      # restore: after nonfinite_max_consecutive in a row, go back to the last
      #   checkpoint and skip every batch drawn since it.
      # halt: stop at the first one.
      nonfinite="skip",
      nonfinite_max_consecutive=5,
      # A loss more than spike_zscore running standard deviations above its running
      # mean (exponential moving averages with decay spike_decay) is logged as a
      # spike; 0 turns detection off.
      spike_zscore=6.0,
      spike_decay=0.98,
      # Wall-clock budget ("90m", "2h", "1h30m", "3600"; "" none): when it runs out,
      # the run saves a checkpoint and exits 0, as on SIGTERM (fmjax/train/preemption.py).
      max_runtime="",
      # "10:13": a jax.profiler trace of steps 10, 11 and 12 into <workdir>/profile
      # (TensorBoard's profile plugin or Perfetto open it); "" none.
      profile_steps="",
      # A Weights & Biases project to log to as well ("" off); metrics.jsonl stays the record.
      wandb_project="",
      # An evaluation suite run in the training process on the live parameters
      # (fmjax/evaluation): a shipped one (quick, default) or a .yaml/.py suite file;
      # "" none. It runs at the end, and every eval_suite_every steps if > 0; its
      # metrics go to metrics.jsonl as suite/TASK/METRIC, its records to
      # <workdir>/eval/step_N/, and the last ones to summary.json (and sweep records).
      eval_suite="",
      eval_suite_every=0,
  )
  # init_from: a workdir (or its checkpoints/ directory) whose latest parameters
  # start this run when its own workdir has no checkpoint: parameters only, with a
  # fresh optimizer at step 0 (continued pretraining, fine-tuning).
  # root: "" keeps checkpoints in <workdir>/checkpoints; else they go to
  # <root>/<workdir>/checkpoints, e.g. gs://bucket/fmjax/runs/x/checkpoints for
  # --workdir=runs/x: storage every host of a pod can reach (fmjax.train.checkpoint).
  c.checkpoint = dict(every=200, keep=3, async_save=True, init_from="", root="")
  # Low-rank adapters (fmjax/posttrain/lora.py): rank > 0 adds them to the weights whose
  # dotted names match one of the comma-separated regexes in targets (e.g.
  # "layers.w[qkvo]$, layers.w_down") and trains only them (and any head).
  c.lora = dict(rank=0, alpha=16.0, targets="")
  return ml_collections.ConfigDict(c)


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def config_hash(cfg: ml_collections.ConfigDict) -> str:
  """12 hex digits that identify a resolved config (records, sweeps, resumes)."""
  return hashlib.sha256(to_json(cfg).encode()).hexdigest()[:12]
