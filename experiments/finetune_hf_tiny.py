"""Fine-tune a Hugging Face checkpoint: `checkpoint.init_from` names an HF directory.

The argument is the directory (any family fmjax converts: Llama 2/3.x, Qwen2.5, Qwen3,
Qwen3-MoE, Mistral, Mixtral, DeepSeek-V3, Gemma, Gemma 2, Gemma 3), or the name of a
family, for which a random tiny model of that family is built with transformers (the
`hf` extra) into runs/hf_tiny_<family> first: llama3 (llama3 rope scaling, tied
embeddings), qwen2 (q/k/v biases), qwen3 (per-head q/k norms), qwen3_moe (softmax top-k
experts after a dense layer), mistral (a sliding window), mixtral (experts and a
sliding window), gemma (GeGLU, scaled embeddings, 1 + w norms), gemma2 (norms after
each block, soft-capped scores and logits, windowed layers alternating with full ones),
gemma3 (per-head q/k norms, a full layer after a windowed one, two rotary thetas). The
fields come from the directory's config.json and the tokenizer from its tokenizer.model
(the random models have none: the run trains its own on the corpus at their vocabulary).
The default is the default experiment's model, exported:

  python -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m fmjax.convert to-hf --workdir=runs/pretrain_tiny --out=runs/pretrain_tiny_hf
  python -m fmjax.main --config=experiments/finetune_hf_tiny.py --workdir=runs/finetune_hf_tiny
  python -m fmjax.main --config=experiments/finetune_hf_tiny.py:/path/to/hf_dir --workdir=DIR

A family, fine-tuned, exported and reloaded in transformers (tests/test_hf_families.py
runs this, shorter):

  python -m fmjax.main --config=experiments/finetune_hf_tiny.py:qwen3_moe --workdir=runs/ft_moe
  python -m fmjax.convert to-hf --workdir=runs/ft_moe --out=runs/ft_moe_hf
  python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('runs/ft_moe_hf')"

(20 steps of 16 x 256 tokens: held-out loss 7.59 at step 10, 7.44 at step 20; the
export reloads as Qwen3MoeForCausalLM with fmjax's logits to 4e-7.)

The run starts from the HF parameters with a fresh optimizer at step 0, at a
tenth of the pretraining learning rate; its first held-out loss is the
exported model's (about 4.0 nats/token for the default). A directory that
fmjax cannot hold exactly (MTP, a routing or rope scaling fmjax has not, a
config field or tensor no mapping reads) stops the run with a one-line error
before anything is written. Until the directory exists, the file describes
the default experiment's model, so that it validates.

Smoke test: add --config.train.steps=5.
"""

import os

from fmjax import config
from fmjax.hf import files as hf

DEFAULT = "runs/pretrain_tiny_hf"
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=256)
# family: (transformers config class, causal LM class, its config fields beyond TINY)
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[0])),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=64)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=64)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(  # Gemma 2's caps
        sliding_window=64, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=64, layer_types=["sliding_attention", "full_attention"])),
}


def build(family: str, directory: str, seed: int = 0):
  """A random tiny transformers model of `family`, saved in `directory`."""
  # Imported here: transformers and torch (the `hf` extra) only build the random models.
  import torch
  import transformers
  config_class, model_class, fields = FAMILIES[family]
  torch.manual_seed(seed)
  model_cfg = getattr(transformers, config_class)(**TINY, **fields)
  model = getattr(transformers, model_class)(model_cfg)
  with torch.no_grad():  # nothing at its initial value: norms and experts all differ
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(directory)


def get_config(arg=None):
  hf_dir = arg or DEFAULT
  if arg in FAMILIES:
    hf_dir = os.path.join("runs", f"hf_tiny_{arg}")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
      build(arg, hf_dir)
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
  if arg in FAMILIES:  # a few steps show it trains
    c.train.update(steps=20, eval_every=10)
  return c
