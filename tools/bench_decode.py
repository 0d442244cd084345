"""Decode speed and cache memory: GQA against MLA at (about) equal model size.

For each attention kind: random parameters, a batch of prompts prefilled into
the cache, then greedy decoding one jitted step per token (each token fetched
to the host, as fmjax.nn.decoding.generate does). Compilation is excluded. MLA is
timed in the absorbed form (what decoding uses) and in the expanded form.

  python tools/bench_decode.py                       # the figures in tools/BENCHMARKS.md
  python tools/bench_decode.py --prompt_len=1024 --new_tokens=64
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import config as config_lib
from fmjax.nn import cost, decoding, model
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec

# One trunk (8 layers, d_model 512, 8 heads, d_ff 1536); attention variants of
# about equal size. MHA is there as the uncompressed reference (it is larger).
TRUNK = dict(vocab_size=2048, d_model=512, n_layers=8, n_heads=8, d_ff=1536)
KINDS = {
    "mha": dict(attention="gqa", n_kv_heads=8, head_dim=64),
    "gqa": dict(attention="gqa", n_kv_heads=2, head_dim=64),
    "mla": dict(attention="mla", q_lora_rank=0, kv_lora_rank=96, qk_nope_head_dim=32,
                qk_rope_head_dim=32, v_head_dim=64),
}


def make_config(kind: str, dtype: str):
  c = config_lib.base()
  c.model.update(dict(TRUNK, dtype=dtype, **KINDS[kind]))
  c.mesh.update(data=1)
  return c


def bench(kind: str, absorbed: bool, args) -> dict:
  cfg = make_config(kind, args.dtype)
  m = cfg.model
  params = jax.jit(lambda k: params_lib.init(model.param_decls(m), k))(jax.random.key(0))
  B, P, N = args.batch, args.prompt_len, args.new_tokens
  slots = P + N
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, m.vocab_size, (B, P)).astype(np.int32)
  lengths = np.full((B,), P, np.int32)

  spec = ModelSpec.from_config(cfg)
  prefill = jax.jit(lambda p, c, t, n: decoding.prefill(p, c, t, n, spec), donate_argnums=1)

  def greedy_step(p, c, t, pos):
    logits, c = decoding.step(p, c, t, pos, spec, absorbed)
    return jnp.argmax(logits, -1).astype(jnp.int32), c

  step = jax.jit(greedy_step, donate_argnums=1)

  def run(new_tokens):
    cache = decoding.init_cache(spec, B, slots)
    t0 = time.perf_counter()
    logits, cache = prefill(params, cache, prompts, lengths)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    token.block_until_ready()
    t1 = time.perf_counter()
    for i in range(new_tokens):
      nxt, cache = step(params, cache, token, lengths + i)
      np.asarray(token)
      token = nxt
    np.asarray(token)
    return t1 - t0, time.perf_counter() - t1

  run(2)  # compile
  prefill_s, decode_s = min((run(N) for _ in range(args.repeats)), key=lambda r: r[1])
  cache_bytes = cost.cache_bytes_per_token(m) * B * slots
  return {
      "attention": kind + ("" if kind != "mla" else " (absorbed)" if absorbed else " (expanded)"),
      "params": cost.param_counts(m)["total"],
      "cache_bytes_per_token_per_layer": cost.cache_bytes_per_token(m) // m.n_layers,
      "cache_MiB": cache_bytes / 2**20,
      "prefill_tokens_per_s": B * P / prefill_s,
      "decode_tokens_per_s": B * N / decode_s,
      "decode_ms_per_step": 1e3 * decode_s / N,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=256)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=config_lib.CHOICES["model.dtype"])
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind} x1, jax {jax.__version__}; batch {args.batch}, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.dtype}")
  rows = [bench("mha", True, args), bench("gqa", True, args), bench("mla", True, args),
          bench("mla", False, args)]
  print("| attention | params | cache B/token/layer | cache MiB | prefill tok/s | "
        "decode tok/s | ms/step |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['attention']} | {r['params']:,} | {r['cache_bytes_per_token_per_layer']} | "
          f"{r['cache_MiB']:.1f} | {r['prefill_tokens_per_s']:,.0f} | "
          f"{r['decode_tokens_per_s']:,.0f} | {r['decode_ms_per_step']:.1f} |")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
