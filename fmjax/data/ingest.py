"""Plain-text and JSONL files -> ArrayRecord, once, for the `arrayrecord(...)` source.

Documents: with `unit="file"` each text file is one document; with
`unit="paragraph"` documents are separated by blank lines; a JSONL file holds
one document per line, in the field `key`. Every `validation_every`-th document
(counting from 1, in input order) goes to the validation split.

Output: `{out}-train.array_record-00000-of-00001` and
`{out}-validation.array_record-00000-of-00001`, one UTF-8 document per record,
plus `{out}.json` with the counts. Read them with
`arrayrecord({out}-{split}.array_record-*)`.

Bad input: a missing input, or one that is a directory, stops the conversion
naming it; text that is not UTF-8 or a line that is not JSON stops it naming the
file and line (or, with bad="skip", is skipped and counted); empty documents and
documents over max_doc_bytes are skipped and counted. A conversion that would
write no document at all stops with a `ConversionError` that says what was
skipped and how to keep it, since a source without documents cannot train.
Files are written under temporary names and renamed at the end, so a failed
conversion leaves nothing, not even half-written files.
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
  """Input that cannot be converted: bad text, named by file and line, or no document at all."""


def expand(inputs: list[str]) -> list[str]:
  """Files and globs -> files, in order.

  Raises FileNotFoundError for an input that matches nothing, IsADirectoryError
  for one that matches only directories (a glob's directories beside files are
  passed over: their files are not documents of the glob).
  """
  paths = []
  for pattern in inputs:
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise FileNotFoundError(f"input {pattern}: no such file")
    files = [m for m in matches if os.path.isfile(m)]
    if not files:
      example = os.path.join(matches[0], "*.txt")
      raise IsADirectoryError(f"input {pattern} is a directory, not a file; name the files "
                              f"in it, e.g. '{example}' (quoted, so the glob reaches the tool)")
    paths.extend(files)
  return paths


def documents(paths, unit: str, key: str, bad: str, skipped: collections.Counter, progress,
              first: dict | None = None):
  """Yields (where, text) of every document, UTF-8 checked; `first` gets where each kind of
  skip first happened."""
  first = {} if first is None else first
  for path in paths:
    jsonl = path.endswith((".jsonl", ".json"))
    with open(path, "rb") as f:
      if unit == "file" and not jsonl:
        data = f.read()
        progress.update(len(data))
        yield from _checked(path, data, bad, skipped, first)
        continue
      chunk, start = [], 1
      for number, line in enumerate(itertools.chain(f, [b""]), 1):  # b"": ends the last chunk
        progress.update(len(line))
        if jsonl:
          yield from _checked(f"{path} line {number}", line, bad, skipped, first, key)
        elif line.strip():
          chunk.append(line)
        else:
          if chunk:
            yield from _checked(f"{path} line {start}", b"".join(chunk).rstrip(b"\n"), bad,
                                skipped, first)
          chunk, start = [], number + 1


def _checked(where, data, bad, skipped, first, json_key=None):
  """Yields (where, text) of one document, or nothing if it is skipped."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    if bad == "skip":
      skipped["not UTF-8"] += 1
      first.setdefault("not UTF-8", where)
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
        first.setdefault("bad JSON", where)
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
  if max_doc_bytes < 1:
    raise ValueError(f"max_doc_bytes={max_doc_bytes} must be at least 1")
  if validation_every < 0 or validation_every == 1:
    raise ValueError(f"validation_every={validation_every} must be 0 (no validation split) or "
                     "at least 2 (1 would leave the train split empty)")
  paths = expand(inputs)
  out = os.path.abspath(os.path.expanduser(out))
  made = _make_directories(os.path.dirname(out))
  final = {s: f"{out}-{s}.array_record-00000-of-00001" for s in ("train", "validation")}
  tmp = {s: os.path.join(os.path.dirname(p), ".tmp_" + os.path.basename(p))
         for s, p in final.items()}
  writers = {s: ArrayRecordWriter(p, "group_size:1") for s, p in tmp.items()}
  counts, skipped, number = collections.Counter(), collections.Counter(), 0
  first, largest = {}, 0  # where each kind of skip first happened; the largest skipped size
  bar = tqdm.tqdm(total=sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True,
                  disable=not progress, desc=f"converting {len(paths)} files")
  try:
    for where, text in documents(paths, unit, key, bad, skipped, bar, first):
      data = text.encode("utf-8")
      if not text.strip():
        skipped["empty"] += 1
        first.setdefault("empty", where)
        continue
      if len(data) > max_doc_bytes:
        reason = f"over {max_doc_bytes} bytes"
        skipped[reason] += 1
        first.setdefault(reason, where)
        largest = max(largest, len(data))
        continue
      number += 1
      split = "validation" if validation_every and number % validation_every == 0 else "train"
      writers[split].write(data)
      counts[split] += 1
    if not number:
      raise ConversionError(_nothing_written(paths, unit, skipped, first, largest))
  except BaseException:
    for s, w in writers.items():
      w.close()
      os.unlink(tmp[s])
    for d in reversed(made):
      os.rmdir(d)
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
  summary["notes"] = notes(summary, unit, validation_every, first, largest)
  return summary


def _make_directories(path: str) -> list[str]:
  """Creates `path` and its missing parents; returns those it created, outermost first."""
  made = []
  while not os.path.isdir(path):
    made.insert(0, path)
    path = os.path.dirname(path)
  os.makedirs(made[-1] if made else path, exist_ok=True)
  return made


def _files(paths: list[str]) -> str:
  return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more files" if len(paths) > 3 else "")


def _fixes(unit: str, skipped: collections.Counter, largest: int) -> list[str]:
  """How to keep each kind of skipped document."""
  fixes = []
  if any(k.startswith("over ") for k in skipped):
    fixes.append(f"raise --max_doc_bytes to at least {largest}" +
                 (" or split files into paragraphs with --unit=paragraph" if unit == "file"
                  else ""))
  if "not UTF-8" in skipped:
    fixes.append("re-encode the text as UTF-8")
  if "bad JSON" in skipped:
    fixes.append("check that each JSONL line is an object whose --key field is a string")
  return fixes


def _reasons(paths, skipped, first) -> str:
  """'2 empty (first: a.txt line 3), 1 over 50 bytes (...)': each kind of skip, and where."""
  return ", ".join(f"{n} {k}" + (f" (first: {first[k]})" if k in first and (
      first[k] != paths[0] or len(paths) > 1) else "") for k, n in skipped.items())


def _nothing_written(paths, unit, skipped, first, largest) -> str:
  """Why no document came out of `paths`, and the fix, in one line."""
  reasons = _reasons(paths, skipped, first)
  if not skipped or set(skipped) == {"empty"}:
    return (f"no documents in {_files(paths)}: {reasons or 'no text'}; give files that hold "
            "text; nothing was written")
  return (f"no documents written from {_files(paths)}: every one was skipped, {reasons}; "
          f"{'; '.join(_fixes(unit, skipped, largest))}; nothing was written")


def notes(summary: dict, unit: str, validation_every: int, first: dict, largest: int) -> list[str]:
  """Lines a conversion that wrote documents should show: what it skipped and why, and an
  empty validation split (held-out evaluation of the source then has nothing to read)."""
  out = []
  skipped, counts = summary["skipped"], summary["documents"]
  written = sum(counts.values())
  if skipped:
    reasons = _reasons(summary["inputs"], skipped, first)
    fixes = _fixes(unit, collections.Counter(skipped), largest)
    out.append(f"skipped {sum(skipped.values())} of {sum(skipped.values()) + written} "
               f"documents: {reasons}" + (f"; to keep them, {'; '.join(fixes)}" if fixes else ""))
  if validation_every and not counts.get("validation"):
    fix = ("convert more than one document" if written < 2 else
           "pass --validation_every=2" if written == 2 else
           f"pass --validation_every between 2 and {written}")
    out.append(f"the validation split is empty: {written} "
               f"document{'s' if written > 1 else ''}, one in {validation_every} goes to it; "
               f"{fix} for held-out evaluation of this source")
  return out
