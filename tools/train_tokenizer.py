"""Train a sentencepiece tokenizer (BPE or unigram, byte fallback, exact round trip) on any source.

  python tools/train_tokenizer.py --mixture=kjv --vocab_size=2048 --out=~/.cache/fmjax/kjv_unigram_2048.model --model_type=unigram
  python tools/train_tokenizer.py --vocab_size=4096 --out=~/.cache/fmjax/code_4096.model \
      --mixture="kjv, code=arrayrecord(~/.cache/fmjax/pystdlib/pystdlib-{split}.array_record-*)"

The sources are those of data.mixture (weights are ignored: every train
document of each text source is read, up to --max_docs per source). Each line
of a document is one sentencepiece sentence. After training, the round trip
decode(encode(doc)) == doc is checked on validation documents (on train
documents for a source without any), before the file is written. Use the model
with `c.data.tokenizer_path = OUT` and a model.vocab_size >= --vocab_size.
A source without text, or a round trip that fails, writes nothing and fails.
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece as spm  # noqa: E402
import tqdm  # noqa: E402

from fmjax import errors  # noqa: E402
from fmjax.data import mixture, sources, tokenizer  # noqa: E402

CHECKED_DOCS = 50  # documents of each source whose round trip is checked


def texts(spec: str, split: str, data_dir: str, max_docs: int):
  source = sources.open_source(spec, split, data_dir)
  if source.tokens:
    raise errors.UsageError(f"source {spec} holds token ids already; it needs no tokenizer")
  n = len(source.records) if max_docs <= 0 else min(max_docs, len(source.records))
  for start in range(0, n, 256):
    for record in source.records.__getitems__(range(start, min(n, start + 256))):
      yield record["text"].decode("utf-8")


def _sentencepiece_error(e: RuntimeError, vocab_size: int) -> errors.UsageError:
  """sentencepiece's complaint about the vocabulary size, as a fix for --vocab_size."""
  text = str(e)
  if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                    text):
    return errors.UsageError(f"--vocab_size={vocab_size} is more pieces than the text holds "
                             f"(at most {m.group(2)}); lower it, or train on more text")
  if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text):
    return errors.UsageError(f"--vocab_size={vocab_size} cannot hold the text's characters and "
                             f"special pieces ({m.group(2)}); raise it to at least {m.group(2)}")
  return errors.UsageError(f"sentencepiece: {text.splitlines()[0]}")


def _train(argv):
  p = errors.ArgumentParser(prog="python tools/train_tokenizer.py", description=__doc__,
                            formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--mixture", default="kjv", help="sources, as in data.mixture")
  p.add_argument("--data_dir", default="~/.cache/fmjax")
  p.add_argument("--vocab_size", type=int, required=True)
  p.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
  p.add_argument("--out", required=True, help="the .model file to write")
  p.add_argument("--max_docs", type=int, default=0, help="per source; 0 reads all")
  p.add_argument("--max_sentences", type=int, default=0,
                 help="sentencepiece samples this many lines; 0 trains on all")
  args = p.parse_args(argv)
  data_dir = os.path.expanduser(args.data_dir)
  out = os.path.expanduser(args.out)
  if os.path.isdir(out) or args.out.endswith(os.sep):
    raise errors.UsageError(f"--out={args.out} is a directory; name the .model file to write")
  try:
    specs = [c.spec for c in mixture.parse_mixture(args.mixture)]
  except ValueError as e:
    raise errors.UsageError(f"--mixture={args.mixture!r}: {e}") from None
  try:
    lines = []
    for spec in specs:
      before = len(lines)
      for text in tqdm.tqdm(texts(spec, "train", data_dir, args.max_docs), unit="doc",
                            desc=f"reading {spec}"):
        lines.extend(text.split("\n"))
      if not any(line.strip() for line in lines[before:]):
        raise errors.Failure(f"source {spec} has no text in its train split; give a source "
                             "that holds documents (tools/convert_text.py writes them)")
  except FileNotFoundError as e:
    raise errors.Failure(e) from None
  try:
    model = tokenizer.train_on(lines, args.vocab_size, args.model_type, args.max_sentences)
  except RuntimeError as e:
    raise _sentencepiece_error(e, args.vocab_size) from None
  sp = spm.SentencePieceProcessor(model_proto=model)
  checked = {}
  for spec in specs:
    docs = list(texts(spec, "validation", data_dir, CHECKED_DOCS))
    split = "validation"
    if not docs:
      docs, split = list(texts(spec, "train", data_dir, CHECKED_DOCS)), "train"
    for text in docs:
      if sp.decode(sp.encode(text, out_type=int)) != text:
        raise errors.Failure(f"the round trip failed on a {split} document of {spec}; "
                             f"nothing was written to {args.out}")
    checked[split] = checked.get(split, 0) + len(docs)
  tokenizer.write_atomically(out, model)
  where = " and ".join(f"{n} {split}" for split, n in checked.items())
  print(f"wrote {out}: {sp.vocab_size()} pieces ({args.model_type}); exact round trip on "
        f"{where} documents; use c.data.tokenizer_path={args.out!r}")
  return 0


def main(argv=None) -> int:
  return errors.run(_train, argv)


if __name__ == "__main__":
  sys.exit(main())
