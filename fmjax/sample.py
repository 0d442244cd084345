"""Text generation from a trained model (the decoding itself is fmjax/nn/decoding.py).

  python -m fmjax.sample --workdir=DIR --prompt="And God said" --max_new_tokens=80
  python -m fmjax.sample --workdir=DIR --prompt="In the beginning" --prompt="Jesus wept" \
      --temperature=0.8 --top_p=0.9
"""

from __future__ import annotations

import argparse

from fmjax.data import tokenizer as tokenizer_lib
from fmjax.nn import decoding
from fmjax.nn.spec import ModelSpec
from fmjax.posttrain import lora
from fmjax.train import trained_run


def main(argv=None):
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
  params = lora.merge(params, cfg.lora)  # a LoRA run decodes with its adapters merged in
  texts = decoding.sample_texts(params, ModelSpec.from_config(cfg), tok,
                                args.prompt or ["And God said"], args.max_new_tokens,
                                args.temperature, args.seed, args.top_k, args.top_p)
  print("\n\n".join(texts))


if __name__ == "__main__":
  main()
