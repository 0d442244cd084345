"""Plain-text and JSONL files -> ArrayRecord, once, for the `arrayrecord(...)` source.

Documents: with `unit="file"` each text file is one document; with
`unit="paragraph"` documents are separated by blank lines; a JSONL file holds
one document per line, in the field `key`. Every `validation_every`-th document
(counting from 1, in input order) goes to the validation split.

Output: `{out}-train.array_record-00000-of-00001` and
`{out}-validation.array_record-00000-of-00001`, one UTF-8 document per record,
plus `{out}.json` with the counts. Read them with
`arrayrecord({out}-{split}.array_record-*)`.

Bad input: a missing input stops the conversion naming it; text that is not
UTF-8 or a line that is not JSON stops it naming the file and line (or, with
bad="skip", is skipped and counted); empty documents and documents over
max_doc_bytes are skipped and counted. Files are written under temporary names
and renamed at the end, so a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import collections
import glob
import itertools
import json
import os

import tqdm
from array_record.python.array_record_module import ArrayRecordWriter


class ConversionError(ValueError):
  """Bad input, named by file and line."""


def expand(inputs: list[str]) -> list[str]:
  """Files and globs -> files, in order. Raises FileNotFoundError for one that matches nothing."""
  paths = []
  for pattern in inputs:
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise FileNotFoundError(f"input {pattern}: no such file")
    paths.extend(m for m in matches if os.path.isfile(m))
  return paths


def documents(paths, unit: str, key: str, bad: str, skipped: collections.Counter, progress):
  """Yields (where, text) of every document, UTF-8 checked."""
  for path in paths:
    jsonl = path.endswith((".jsonl", ".json"))
    with open(path, "rb") as f:
      if unit == "file" and not jsonl:
        data = f.read()
        progress.update(len(data))
        yield from _checked(path, data, bad, skipped)
        continue
      chunk, start = [], 1
      for number, line in enumerate(itertools.chain(f, [b""]), 1):  # b"": ends the last chunk
        progress.update(len(line))
        if jsonl:
          yield from _checked(f"{path} line {number}", line, bad, skipped, key)
        elif line.strip():
          chunk.append(line)
        else:
          if chunk:
            yield from _checked(f"{path} line {start}", b"".join(chunk).rstrip(b"\n"), bad,
                                skipped)
          chunk, start = [], number + 1


def _checked(where, data, bad, skipped, json_key=None):
  """Yields (where, text) of one document, or nothing if it is skipped."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    if bad == "skip":
      skipped["not UTF-8"] += 1
      return
    raise ConversionError(f"{where}: not UTF-8 ({e}); fix it or pass --bad=skip") from None
  if json_key is not None:
    if not text.strip():
      return  # blank lines in JSONL are not documents
    try:
      value = json.loads(text)[json_key]
      if not isinstance(value, str):
        raise TypeError(f"field {json_key!r} is {type(value).__name__}, not a string")
    except (ValueError, KeyError, TypeError) as e:
      if bad == "skip":
        skipped["bad JSON"] += 1
        return
      raise ConversionError(f"{where}: not a JSON object with a string field {json_key!r} "
                            f"({type(e).__name__}: {e}); fix it or pass --bad=skip") from None
    text = value
  yield where, text


def convert(inputs: list[str], out: str, *, unit: str = "file", key: str = "text",
            validation_every: int = 20, max_doc_bytes: int = 1 << 20, bad: str = "error",
            progress: bool = True) -> dict:
  """Converts `inputs` (files or globs) into `out`-{train,validation} ArrayRecord files.

  Returns the counts also written to `{out}.json`.
  """
  if unit not in ("file", "paragraph"):
    raise ValueError(f"unit={unit!r} is not one of file, paragraph")
  if bad not in ("error", "skip"):
    raise ValueError(f"bad={bad!r} is not one of error, skip")
  paths = expand(inputs)
  out = os.path.abspath(os.path.expanduser(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  final = {s: f"{out}-{s}.array_record-00000-of-00001" for s in ("train", "validation")}
  tmp = {s: os.path.join(os.path.dirname(p), ".tmp_" + os.path.basename(p))
         for s, p in final.items()}
  writers = {s: ArrayRecordWriter(p, "group_size:1") for s, p in tmp.items()}
  counts, skipped, number = collections.Counter(), collections.Counter(), 0
  bar = tqdm.tqdm(total=sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True,
                  disable=not progress, desc=f"converting {len(paths)} files")
  try:
    for _, text in documents(paths, unit, key, bad, skipped, bar):
      data = text.encode("utf-8")
      if not text.strip():
        skipped["empty"] += 1
        continue
      if len(data) > max_doc_bytes:
        skipped[f"over {max_doc_bytes} bytes"] += 1
        continue
      number += 1
      split = "validation" if validation_every and number % validation_every == 0 else "train"
      writers[split].write(data)
      counts[split] += 1
  except BaseException:
    for s, w in writers.items():
      w.close()
      os.unlink(tmp[s])
    raise
  finally:
    bar.close()
  for s, w in writers.items():
    w.close()
    os.replace(tmp[s], final[s])
  summary = {"inputs": paths, "documents": dict(counts), "skipped": dict(skipped),
             "source": f"arrayrecord({out}-{{split}}.array_record-*)"}
  with open(out + ".json", "w") as f:
    json.dump(summary, f, indent=2)
  return summary
