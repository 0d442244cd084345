"""Text generation from a trained model (the decoding itself is fmjax/nn/decoding.py).

  python -m fmjax.sample --workdir=DIR --prompt="And God said" --max_new_tokens=80
  python -m fmjax.sample --workdir=DIR --prompt="In the beginning" --prompt="Jesus wept" \\
      --temperature=0.8 --top_p=0.9

Every argument is checked before the model is read: a prompt and the tokens
generated after it must fit in the context the model was trained at (the
run's data.seq_len), and --step must name a checkpoint the run has.
"""

from __future__ import annotations

import sys

from fmjax import errors
from fmjax.errors import UsageError

DEFAULT_PROMPT = "And God said"


def parse_args(argv):
  parser = errors.ArgumentParser(prog="python -m fmjax.sample",
                                 description=errors.command_help(__doc__))
  parser.add_argument("--workdir", required=True, help="the workdir of a training run")
  parser.add_argument("--prompt", action="append",
                      help=f"repeat for a batch of prompts (default: {DEFAULT_PROMPT!r})")
  parser.add_argument("--max_new_tokens", type=int, default=100,
                      help="tokens to generate after each prompt, >= 1 (default 100)")
  parser.add_argument("--temperature", type=float, default=0.7,
                      help=">= 0; 0 is greedy decoding (default 0.7)")
  parser.add_argument("--top_k", type=int, default=0,
                      help="sample from the k most likely tokens; 0: no top-k cut (default)")
  parser.add_argument("--top_p", type=float, default=1.0,
                      help="nucleus sampling, in (0, 1]; 1: no nucleus cut (default)")
  parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step to sample from (default: the latest)")
  return parser.parse_args(argv)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """Raises UsageError for a sampling argument out of range (NaN included)."""
  if not max_new_tokens >= 1:
    raise UsageError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  if not temperature >= 0:
    raise UsageError(f"--temperature={temperature} must be >= 0 (0 is greedy decoding)")
  if not top_k >= 0:
    raise UsageError(f"--top_k={top_k} must be >= 0 (0: no top-k cut)")
  if not 0 < top_p <= 1:
    raise UsageError(f"--top_p={top_p} must be in (0, 1] (1: no nucleus cut)")


def check_lengths(prompt_tokens: list[int], max_new_tokens: int, seq_len: int) -> None:
  """Raises UsageError unless each prompt (in tokens, BOS included) and the tokens
  generated after it fit in the trained context of `seq_len` tokens.

  The model was trained on positions below seq_len only; past them its output
  is not what training measured, so sampling refuses rather than extrapolates.
  """
  longest = max(prompt_tokens)
  which = prompt_tokens.index(longest) + 1
  if longest >= seq_len:
    raise UsageError(f"--prompt #{which} is {longest} tokens, but the model was trained on "
                     f"{seq_len} (data.seq_len of the run); shorten it to at most "
                     f"{seq_len - 1} tokens")
  if longest + max_new_tokens > seq_len:
    raise UsageError(f"--prompt #{which} ({longest} tokens) + --max_new_tokens="
                     f"{max_new_tokens} is {longest + max_new_tokens} tokens, past the "
                     f"{seq_len} the model was trained on (data.seq_len of the run); use "
                     f"--max_new_tokens={seq_len - longest} or less, or train at a longer "
                     "context (experiments/extend_context_tiny.py)")


def saved_steps(directory: str) -> list[int]:
  """The steps of the checkpoints in `directory` (none if it does not exist); reads only."""
  # Imported here, as the model's libraries are (see _main).
  import orbax.checkpoint as ocp
  from etils import epath

  if not epath.Path(directory).is_dir():
    return []
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def choose_step(directory: str, step: int | None) -> int:
  """`step`, or the latest; errors.Failure if the run has no such checkpoint, listing
  the steps it has."""
  steps = saved_steps(directory)
  if not steps:
    raise errors.Failure(f"no checkpoint in {directory}; train first")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise errors.Failure(f"--step={step}: no checkpoint {step} in {directory}; it has "
                         f"step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))} "
                         "(omit --step for the latest)")
  return step


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  if args.step is not None and args.step < 0:
    raise UsageError(f"--step={args.step} must be >= 0")
  prompts = args.prompt or [DEFAULT_PROMPT]

  # Imported only now: the arguments are checked, and --help answered, before jax loads.
  import tqdm

  from fmjax import convert
  from fmjax.data import tokenizer as tokenizer_lib
  from fmjax.hf.safetensors_files import FormatError
  from fmjax.nn import decoding
  from fmjax.nn.spec import ModelSpec
  from fmjax.posttrain import lora
  from fmjax.train import checkpoint, trained_run

  try:
    cfg = convert.load_workdir_config(args.workdir)
  except FormatError as e:
    raise errors.Failure(str(e)) from None
  step = choose_step(checkpoint.run_directory(args.workdir, cfg.checkpoint.get("root", "")),
                     args.step)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  check_lengths([1 + len(tok.encode(p)) for p in prompts], args.max_new_tokens,
                cfg.data.seq_len)

  cfg, _, params, _ = trained_run.load(args.workdir, "fmjax", step)
  params = lora.merge(params, cfg.lora)  # a LoRA run decodes with its adapters merged in
  with tqdm.tqdm(total=args.max_new_tokens, unit="token", desc="sampling", leave=False,
                 file=sys.stderr, mininterval=1.0, disable=args.max_new_tokens < 32) as bar:
    texts = decoding.sample_texts(params, ModelSpec.from_config(cfg), tok, prompts,
                                  args.max_new_tokens, args.temperature, args.seed, args.top_k,
                                  args.top_p, progress=lambda n: bar.update(n - bar.n))
  print("\n\n".join(texts))
  return errors.OK


if __name__ == "__main__":
  sys.exit(main())
