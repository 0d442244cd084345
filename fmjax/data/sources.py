"""Document sources, named by a short spec string in the experiment file.

  kjv                                   the embedded King James Bible (one chapter a document)
  synthetic(states=256, branching=8)    a Markov chain with a known entropy rate (fmjax.data.synthetic)
  tfds(NAME, data_dir=DIR, train=SPLIT, validation=SPLIT, text_key=KEY)
                                        any prepared tensorflow-datasets dataset, read with
                                        tfds.data_source; data_dir defaults to data.data_dir,
                                        the splits to train/validation, text_key to "text"
  arrayrecord(GLOB)                     ArrayRecord files of UTF-8 documents, one per record;
                                        GLOB contains {split}, as tools/convert_text.py writes them

A source of one split is a random-access list of records, either text
({"text": bytes}) or token ids ({"tokens": int32}, synthetic only), plus a way
to name record i in messages (its file and record number).
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import os
from typing import Any

from array_record.python.array_record_module import ArrayRecordReader
from grain.sources import ArrayRecordDataSource

from fmjax.data import synthetic

KINDS = ("kjv", "synthetic", "tfds", "arrayrecord")
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Spec:
  kind: str
  args: tuple[str, ...] = ()  # positional arguments
  kwargs: tuple[tuple[str, str], ...] = ()  # key=value arguments, in order

  def get(self, key, default=""):
    return dict(self.kwargs).get(key, default)


@dataclasses.dataclass
class Source:
  spec: str
  split: str
  records: Any  # len(), [i], __getitems__
  tokens: bool  # records hold token ids rather than text
  where: Any  # where(i) -> "FILE record k": picklable
  metadata: dict


def split_top_level(text: str, sep: str) -> list[str]:
  """Splits on `sep` outside parentheses."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += (ch == "(") - (ch == ")")
    if depth < 0:
      raise ValueError(f"unbalanced ')' in {text!r}")
    if ch == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"unbalanced '(' in {text!r}")
  return parts + [text[start:]]


def parse(spec: str) -> Spec:
  """'tfds(wiki, data_dir=/d)' -> Spec('tfds', ('wiki',), (('data_dir', '/d'),))."""
  spec = spec.strip()
  kind, paren, rest = spec.partition("(")
  kind = kind.strip()
  if kind not in KINDS:
    raise ValueError(f"unknown source {kind!r} in {spec!r}; sources are {', '.join(KINDS)}")
  if paren and not rest.endswith(")"):
    raise ValueError(f"source {spec!r} must end with ')'")
  args, kwargs = [], []
  for item in filter(None, (a.strip() for a in split_top_level(rest[:-1], ","))):
    key, eq, value = item.partition("=")
    if eq and key.strip().isidentifier():
      kwargs.append((key.strip(), value.strip()))
    else:
      args.append(item)
  s = Spec(kind, tuple(args), tuple(kwargs))
  _check_arguments(s, spec)
  return s


def _check_arguments(s: Spec, spec: str):
  keys = {k for k, _ in s.kwargs}
  allowed = {"kjv": (0, set()), "synthetic": (0, None),
             "tfds": (1, {"data_dir", "train", "validation", "text_key"}),
             "arrayrecord": (1, set())}[s.kind]
  if len(s.args) != allowed[0]:
    raise ValueError(f"source {spec!r} takes {allowed[0]} positional argument(s), got "
                     f"{len(s.args)}")
  if allowed[1] is not None and keys - allowed[1]:
    raise ValueError(f"source {spec!r}: unknown argument(s) {', '.join(sorted(keys - allowed[1]))}")
  if s.kind == "synthetic":
    synthetic.parse(",".join(f"{k}={v}" for k, v in s.kwargs))  # raises on a bad argument
  if s.kind == "arrayrecord" and "{split}" not in s.args[0]:
    raise ValueError(f"source {spec!r}: the glob must contain {{split}} (e.g. "
                     "DIR/NAME-{split}.array_record-*), as tools/convert_text.py writes it")


def open_source(spec: str, split: str, data_dir: str) -> Source:
  """The records of `split` of the source `spec`.

  Raises FileNotFoundError, naming what is missing, if the data is not there.
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
  s = parse(spec)
  if s.kind == "kjv":
    from fmjax.data import kjv  # only when used: it loads tensorflow_datasets
    return Source(spec, split, kjv.load_source(data_dir, split), False,
                  Described(f"kjv {split}"), {})
  if s.kind == "synthetic":
    chain = synthetic.parse(",".join(f"{k}={v}" for k, v in s.kwargs))
    return Source(spec, split, synthetic.Documents(chain, split), True,
                  Described(f"{spec} {split}"), chain.metadata())
  if s.kind == "tfds":
    return _open_tfds(s, spec, split, data_dir)
  return _open_arrayrecord(s, spec, split)


def _open_tfds(s: Spec, spec: str, split: str, data_dir: str) -> Source:
  import tensorflow_datasets as tfds  # only when used: slow to import
  name = s.args[0]
  directory = os.path.expanduser(s.get("data_dir", data_dir))
  tfds_split = s.get(split, split)
  try:
    records = tfds.data_source(name, split=tfds_split, data_dir=directory, download=False)
  except Exception as e:  # tfds raises several kinds for "not there"
    raise FileNotFoundError(f"source {spec!r}: cannot read split {tfds_split!r} of "
                            f"a prepared TFDS dataset {name!r} in {directory} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
  return Source(spec, split, _Text(records, s.get("text_key", "text")), False,
                Described(f"tfds {name} split {tfds_split} in {directory}"), {})


def _open_arrayrecord(s: Spec, spec: str, split: str) -> Source:
  pattern = os.path.expanduser(s.args[0].replace("{split}", split))
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise FileNotFoundError(f"source {spec!r}: no files match {pattern}; write them with "
                            "tools/convert_text.py")
  return Source(spec, split, _Text(ArrayRecordDataSource(paths)), False, FileRecords(paths),
                {"files": len(paths)})


class Described:
  """where(i) for a source without files of its own: 'NAME record i'."""

  def __init__(self, name):
    self.name = name

  def __call__(self, i: int) -> str:
    return f"{self.name} record {i}"


class FileRecords:
  """where(i) for records spread over files: 'FILE record k' (counts read on first use)."""

  def __init__(self, paths):
    self.paths, self._starts = list(paths), None

  def __call__(self, i: int) -> str:
    if self._starts is None:
      starts = [0]
      for p in self.paths:
        reader = ArrayRecordReader(p)
        starts.append(starts[-1] + reader.num_records())
        reader.close()
      self._starts = starts
    f = bisect.bisect_right(self._starts, i) - 1
    return f"{self.paths[f]} record {i - self._starts[f]}"


class _Text:
  """Records as {"text": bytes}: ArrayRecord's bytes as they are, or a TFDS feature `key`."""

  def __init__(self, source, key: str | None = None):
    self.source, self.key = source, key

  def __len__(self):
    return len(self.source)

  def _text(self, record):
    if self.key is None:
      return {"text": record}
    if self.key not in record:
      raise KeyError(f"records have no feature {self.key!r} (they have "
                     f"{', '.join(record)}); set text_key= in the tfds(...) source")
    return {"text": record[self.key]}

  def __getitem__(self, i):
    return self._text(self.source[i])

  def __getitems__(self, indices):
    return [self._text(r) for r in self.source.__getitems__(indices)]
