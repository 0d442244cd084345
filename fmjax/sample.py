"""Text generation from a trained model: greedy or temperature sampling.

Each new token runs a full forward pass over a fixed-length buffer (one jitted
function, compiled once); the causal mask keeps the unwritten tail inert.

  python -m fmjax.sample --workdir=DIR --prompt="And God said" --max_new_tokens=80
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import model


def generate(params, cfg, prompt_ids: list[int], max_new_tokens: int, temperature: float,
             seed: int = 0, stop_id: int | None = None) -> list[int]:
  """Prompt plus up to `max_new_tokens` sampled ids (greedy at temperature 0)."""
  length = cfg.data.seq_len
  if not prompt_ids:
    raise ValueError("the prompt is empty; give at least one token (e.g. the BOS id)")
  if len(prompt_ids) >= length:
    raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in "
                     f"data.seq_len={length}; shorten the prompt")
  max_new_tokens = min(max_new_tokens, length - len(prompt_ids))

  @jax.jit
  def next_token(params, tokens_1T, index, key):
    positions_1T = jnp.arange(length, dtype=jnp.int32)[None]
    logits_1TV = model.forward(params, tokens_1T, jnp.ones_like(tokens_1T), positions_1T, cfg)
    logits_V = logits_1TV[0, index - 1]
    if temperature <= 0:
      return jnp.argmax(logits_V).astype(jnp.int32)
    return jax.random.categorical(key, logits_V / temperature).astype(jnp.int32)

  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(prompt_ids)] = prompt_ids
  tokens = jnp.asarray(tokens)
  out = list(prompt_ids)
  key = jax.random.key(seed)
  for i in range(len(prompt_ids), len(prompt_ids) + max_new_tokens):
    key, sub = jax.random.split(key)
    token = next_token(params, tokens, i, sub)
    tokens = tokens.at[0, i].set(token)
    out.append(int(token))
    if stop_id is not None and out[-1] == stop_id:
      break
  return out


def sample_text(params, cfg, tokenizer, prompt: str, max_new_tokens: int,
                temperature: float, seed: int = 0) -> str:
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  out = generate(params, cfg, ids, max_new_tokens, temperature, seed, stop_id=tokenizer.eos_id)
  return tokenizer.decode([t for t in out[1:] if t != tokenizer.eos_id])


def main(argv=None):
  import argparse

  from fmjax import checkpoint, config as config_lib, sharding, train
  from fmjax.data import tokenizer as tokenizer_lib

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompt", default="And God said")
  parser.add_argument("--max_new_tokens", type=int, default=100)
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  args = parser.parse_args(argv)

  config_path = os.path.join(args.workdir, "config.json")
  if not os.path.exists(config_path):
    sys.exit(f"fmjax.sample: no config.json in --workdir={args.workdir}; "
             "point it at the workdir of a training run")
  with open(config_path) as f:
    cfg = config_lib.from_json(f.read())
  ckpt = checkpoint.Checkpointer(os.path.join(args.workdir, "checkpoints"), keep=cfg.checkpoint.keep)
  step = args.step if args.step is not None else ckpt.latest_step()
  if step is None:
    sys.exit(f"fmjax.sample: no checkpoint in {args.workdir}/checkpoints; train first")
  one_device = dict(data=1, fsdp=1, expert=1, tensor=1)
  mesh = sharding.make_mesh(one_device, jax.devices()[:1])
  s = train.setup(cfg, mesh)
  state = ckpt.restore(step, s.abstract_state)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  print(sample_text(state["params"], cfg, tok, args.prompt, args.max_new_tokens,
                    args.temperature, args.seed))


if __name__ == "__main__":
  main()
