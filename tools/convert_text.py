r"""Convert plain-text or JSONL files to ArrayRecord once, for the arrayrecord(...) source.

  python tools/convert_text.py --out=~/.cache/fmjax/pystdlib/pystdlib \
      "/usr/lib/python3*/*.py"                      # one document per file
  python tools/convert_text.py --out=DIR/NAME --unit=paragraph notes/*.txt
  python tools/convert_text.py --out=DIR/NAME --key=text data/*.jsonl   # one per line

Then, in an experiment: c.data.mixture = "kjv:0.5, name=arrayrecord(DIR/NAME-{split}.array_record-*):0.5".
Every 20th document goes to the validation split (--validation_every). See
fmjax/data/ingest.py for how bad input is handled. A conversion that would write
no document (empty files, every document over --max_doc_bytes) writes nothing
and fails; one that skipped some says how many and why on stderr.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmjax import errors  # noqa: E402
from fmjax.data import ingest as convert  # noqa: E402


def _convert(argv):
  p = errors.ArgumentParser(prog="python tools/convert_text.py", description=__doc__,
                            formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("inputs", nargs="+", help="files or globs; .jsonl/.json files hold one document a line")
  p.add_argument("--out", required=True, help="output prefix: OUT-{train,validation}.array_record-*")
  p.add_argument("--unit", default="file", choices=("file", "paragraph"),
                 help="a document of a text file: the whole file, or each blank-line-separated paragraph")
  p.add_argument("--key", default="text", help="the JSONL field that holds the text")
  p.add_argument("--validation_every", type=int, default=20,
                 help="every N-th document goes to the validation split; 0: none")
  p.add_argument("--max_doc_bytes", type=int, default=1 << 20,
                 help="longer documents are skipped and counted")
  p.add_argument("--bad", default="error", choices=("error", "skip"),
                 help="text that is not UTF-8, or JSONL lines that are not JSON: stop, or skip and count")
  args = p.parse_args(argv)
  try:
    summary = convert.convert(args.inputs, args.out, unit=args.unit, key=args.key,
                              validation_every=args.validation_every,
                              max_doc_bytes=args.max_doc_bytes, bad=args.bad,
                              progress=sys.stderr.isatty())
  except convert.ConversionError as e:  # the data: nothing to write, or text it cannot read
    raise errors.Failure(e) from None
  except (FileNotFoundError, IsADirectoryError, ValueError) as e:  # the command line's inputs
    raise errors.UsageError(e) from None
  for note in summary["notes"]:
    print(f"warning: {note}", file=sys.stderr)
  print(json.dumps({k: v for k, v in summary.items() if k not in ("inputs", "notes")}, indent=2))
  return 0


def main(argv=None) -> int:
  return errors.run(_convert, argv)


if __name__ == "__main__":
  sys.exit(main())
