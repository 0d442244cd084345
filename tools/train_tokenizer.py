"""Train a sentencepiece tokenizer (BPE or unigram, byte fallback, exact round trip) on any source.

  python tools/train_tokenizer.py --mixture=kjv --vocab_size=2048 --out=~/.cache/fmjax/kjv_unigram_2048.model --model_type=unigram
  python tools/train_tokenizer.py --vocab_size=4096 --out=~/.cache/fmjax/code_4096.model \
      --mixture="kjv, code=arrayrecord(~/.cache/fmjax/pystdlib/pystdlib-{split}.array_record-*)"

The sources are those of data.mixture (weights are ignored: every train
document of each text source is read, up to --max_docs per source). Each line
of a document is one sentencepiece sentence. After training, the round trip
decode(encode(doc)) == doc is checked on validation documents. Use the model
with `c.data.tokenizer_path = OUT` and a model.vocab_size >= --vocab_size.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tqdm  # noqa: E402

from fmjax.data import mixture, sources, tokenizer  # noqa: E402


def texts(spec: str, split: str, data_dir: str, max_docs: int):
  source = sources.open_source(spec, split, data_dir)
  if source.tokens:
    raise ValueError(f"source {spec} holds token ids already; it needs no tokenizer")
  n = len(source.records) if max_docs <= 0 else min(max_docs, len(source.records))
  for start in range(0, n, 256):
    for record in source.records.__getitems__(range(start, min(n, start + 256))):
      yield record["text"].decode("utf-8")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
  try:
    specs = [c.spec for c in mixture.parse_mixture(args.mixture)]
    lines = []
    for spec in specs:
      for text in tqdm.tqdm(texts(spec, "train", data_dir, args.max_docs), unit="doc",
                            desc=f"reading {spec}"):
        lines.extend(text.split("\n"))
    model = tokenizer.train_on(lines, args.vocab_size, args.model_type, args.max_sentences)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"train_tokenizer: {e}".splitlines()[0], file=sys.stderr)
    return 2
  out = os.path.expanduser(args.out)
  tokenizer.write_atomically(out, model)
  tok = tokenizer.Tokenizer(out)
  checked = 0
  for spec in specs:
    for text in texts(spec, "validation", data_dir, 50):
      if tok.decode(tok.encode(text)) != text:
        print(f"train_tokenizer: round trip failed on a validation document of {spec}",
              file=sys.stderr)
        return 1
      checked += 1
  print(f"wrote {out}: {tok.vocab_size} pieces ({args.model_type}); exact round trip on "
        f"{checked} validation documents; use c.data.tokenizer_path={args.out!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
