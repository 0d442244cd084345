"""Text generation from a trained model (the decoding itself is fmjax.nn.decoding).

  python -m fmjax.sample --workdir=DIR --prompt="And God said" --max_new_tokens=80
  python -m fmjax.sample --workdir=DIR --prompt="In the beginning" --prompt="Jesus wept" \
      --temperature=0.8 --top_p=0.9
"""

from __future__ import annotations

from fmjax.nn import decoding


def sample_texts(params, cfg, tokenizer, prompts: list[str], max_new_tokens: int,
                 temperature: float, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
                 mesh=None) -> list[str]:
  """Each prompt with its continuation, decoded as one batch; stops at EOS."""
  from fmjax.posttrain import lora
  params = lora.merge(params, cfg.lora)  # a LoRA run decodes with its adapters merged in
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  out = decoding.generate(params, cfg, ids, max_new_tokens, temperature, top_k, top_p, seed,
                          stop_id=tokenizer.eos_id, mesh=mesh)
  return [tokenizer.decode([t for t in o[1:] if t != tokenizer.eos_id]) for o in out]


def sample_text(params, cfg, tokenizer, prompt: str, max_new_tokens: int,
                temperature: float, seed: int = 0, top_k: int = 0, top_p: float = 1.0) -> str:
  return sample_texts(params, cfg, tokenizer, [prompt], max_new_tokens, temperature, seed,
                      top_k, top_p)[0]


def main(argv=None):
  import argparse

  from fmjax.train import trained_run
  from fmjax.data import tokenizer as tokenizer_lib

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompt", action="append",
                      help="repeat for a batch of prompts (default: 'And God said')")
  parser.add_argument("--max_new_tokens", type=int, default=100)
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--top_k", type=int, default=0, help="0: no top-k cut")
  parser.add_argument("--top_p", type=float, default=1.0, help="1: no nucleus cut")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  args = parser.parse_args(argv)

  cfg, _, params, _ = trained_run.load(args.workdir, "fmjax.sample", args.step)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  texts = sample_texts(params, cfg, tok, args.prompt or ["And God said"],
                       args.max_new_tokens, args.temperature, args.seed, args.top_k, args.top_p)
  print("\n\n".join(texts))


if __name__ == "__main__":
  main()
