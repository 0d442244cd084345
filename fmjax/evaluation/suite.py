"""Suites: lists of (kind, data, settings), checked whole and loaded before anything runs.

A suite is a shipped name (fmjax.evaluation.suites), a YAML file or a Python file
(with a list `SUITE`). Each entry is a mapping {kind, data, settings, name} (name
and settings optional) or a (kind, data, settings) tuple:

  - kind: perplexity          # loss per token and bits per byte, rolling windows
    data: kjv                 # a data.mixture source (kjv, synthetic(...), tfds(...),
                              # arrayrecord(...)), or a text file (.jsonl: a "text" per line)
    settings: {split: validation, documents: 20}
  - kind: multiple_choice     # summed, per-token and per-byte log-likelihood; ECE
    data: kjv_cloze           # or a .jsonl file of {"context", "choices", "answer"}
    settings: {examples: 100}
  - kind: generation          # greedy accuracy, pass@k over n samples; ECE
    data: arithmetic          # a task family of fmjax.data.tasks, or a .jsonl file of
                              # {"task", "prompt"} checked by tasks.verify
    settings: {level: 1, examples: 30, n: 8, k: [1, 4], temperature: 0.8}

Settings and their defaults (SETTINGS):
  perplexity       split (validation), documents (0: all)
  multiple_choice  split (validation, of kjv_cloze), examples (0: all), delimiter (" ",
                   between context and choice), bins (10, of the calibration), seed (0)
  generation       level (0; 1 and 2 are the held-out harder levels of a task family),
                   examples (30; 0: all of a file, 100 of a family), n (0: greedy only;
                   samples per problem for pass@k), k ([1]: the pass@k to report, each
                   <= n), temperature (0.8, of the samples), max_new_tokens (40), bins, seed
  every kind       distribution (id, or ood for generation levels 1 and 2): which part
                   of the report the entry belongs to

`load_suite` checks every entry (kind, settings, k <= n) and then reads every
data set, so a bad suite or a bad data file stops the command before a model
is read or a file written: UsageError for the suite, Failure for its data.
Relative paths in a suite file are relative to that file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

from fmjax.errors import Failure, UsageError
from fmjax.data import sources, tasks
from fmjax.evaluation import cloze, suites

DISTRIBUTIONS = ("id", "ood")
SETTINGS = {  # kind -> its settings and their defaults
    "perplexity": dict(split="validation", documents=0, distribution="id"),
    "multiple_choice": dict(split="validation", examples=0, delimiter=" ", bins=10, seed=0,
                            distribution="id"),
    "generation": dict(level=0, examples=30, n=0, k=None, temperature=0.8, max_new_tokens=40,
                       bins=10, seed=0, distribution=None),
}
KINDS = tuple(SETTINGS)
BUILT_IN = {"multiple_choice": ("kjv_cloze",), "generation": tasks.FAMILIES}


@dataclasses.dataclass
class Entry:
  """One evaluation of a suite: what to measure (kind), on what (data), how (settings).
  `items` holds its data once loaded."""
  name: str
  kind: str
  data: str
  settings: dict
  items: list | None = None

  @property
  def distribution(self) -> str:
    return self.settings["distribution"]


def parse_suite(suite: str | list, where: str = "") -> list[Entry]:
  """The entries of a suite (a shipped name, a .yaml/.yml/.py file, or a list), checked;
  their data is not read yet. Raises UsageError, one line naming the entry."""
  if isinstance(suite, str):
    where, raw = suite, _read_suite(suite)
  else:
    raw, where = suite, where or "suite"
  if not isinstance(raw, (list, tuple)) or not raw:
    raise UsageError(f"suite {where}: must be a non-empty list of (kind, data, settings)")
  base = os.path.dirname(os.path.abspath(where)) if os.path.isfile(where) else ""
  entries = [_entry(e, f"suite {where}: entry {i + 1}", base) for i, e in enumerate(raw)]
  names = [e.name for e in entries]
  twice = next((n for n in names if names.count(n) > 1), None)
  if twice:
    raise UsageError(f"suite {where}: two entries are named {twice!r}; give one a `name`")
  return entries


def _read_suite(suite: str):
  if suite in suites.SUITES:
    return suites.SUITES[suite]
  if not suite.endswith((".yaml", ".yml", ".py")):
    raise UsageError(f"--suite={suite}: not a shipped suite ({', '.join(suites.SUITES)}) nor a "
                     ".yaml, .yml or .py file")
  if not os.path.isfile(suite):
    raise UsageError(f"--suite={suite}: no such file")
  if suite.endswith(".py"):
    spec = importlib.util.spec_from_file_location("fmjax_eval_suite", suite)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # any error of the user's file, in one line
      raise UsageError(f"suite {suite} does not load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "SUITE"):
      raise UsageError(f"suite {suite} defines no SUITE list")
    return module.SUITE
  import yaml  # only for YAML suites
  try:
    with open(suite, encoding="utf-8") as f:
      return yaml.safe_load(f)
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise UsageError(f"suite {suite} is not valid YAML: {e}") from None


def _entry(raw, where: str, base: str) -> Entry:
  if isinstance(raw, (list, tuple)) and len(raw) in (2, 3):
    raw = dict(zip(("kind", "data", "settings"), raw))
  if not isinstance(raw, dict):
    raise UsageError(f"{where}: must be a mapping {{kind, data, settings}} or a (kind, data, "
                     f"settings) tuple, not {raw!r}")
  unknown = set(raw) - {"kind", "data", "settings", "name"}
  if unknown:
    raise UsageError(f"{where}: unknown field {sorted(unknown)[0]!r}; an entry has kind, "
                     "data, settings and name")
  kind, data = raw.get("kind"), raw.get("data")
  if kind not in SETTINGS:
    raise UsageError(f"{where}: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
  if not isinstance(data, str) or not data:
    raise UsageError(f"{where}: data must be a non-empty string (a source, a built-in set "
                     "or a file)")
  given = raw.get("settings") or {}
  if not isinstance(given, dict):
    raise UsageError(f"{where}: settings must be a mapping")
  bad = set(given) - set(SETTINGS[kind])
  if bad:
    raise UsageError(f"{where}: unknown setting {sorted(bad)[0]!r} for {kind}; its settings "
                     f"are {', '.join(SETTINGS[kind])}")
  settings = dict(SETTINGS[kind], **given)
  _check_settings(kind, settings, where)
  if not _built_in(kind, data):
    if kind == "perplexity" and not _is_file(data):
      try:
        sources.parse(data)
      except ValueError as e:
        raise UsageError(f"{where}: data {data!r}: {e}") from None
    elif kind != "perplexity" and not data.endswith(".jsonl"):
      names = ", ".join(BUILT_IN[kind])
      raise UsageError(f"{where}: data {data!r} is neither a built-in set ({names}) nor a "
                       ".jsonl file")
    if _is_file(data):
      data = os.path.expanduser(data)
      data = os.path.join(base, data) if base and not os.path.isabs(data) else data
  name = raw.get("name") or _default_name(kind, data, settings)
  if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    raise UsageError(f"{where}: name {name!r} must be letters, digits, '_', '.' or '-'")
  return Entry(name, kind, data, settings)


def _check_settings(kind, s, where):
  def integer(key, low):
    if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < low:
      raise UsageError(f"{where}: {key}={s[key]!r} must be an integer >= {low}")

  if s.get("distribution") not in (None,) + DISTRIBUTIONS:
    raise UsageError(f"{where}: distribution={s['distribution']!r} must be id or ood")
  if "split" in s and s["split"] not in sources.SPLITS:
    raise UsageError(f"{where}: split={s['split']!r} must be one of {', '.join(sources.SPLITS)}")
  for key, low in (("documents", 0), ("examples", 0), ("bins", 1), ("seed", 0), ("n", 0),
                   ("max_new_tokens", 1)):
    if key in s:
      integer(key, low)
  if kind != "generation":
    return
  if s["level"] not in tasks.LEVELS:
    raise UsageError(f"{where}: level={s['level']!r} must be one of "
                     f"{', '.join(map(str, tasks.LEVELS))}")
  if not isinstance(s["temperature"], (int, float)) or not s["temperature"] >= 0:
    raise UsageError(f"{where}: temperature={s['temperature']!r} must be >= 0")
  k = s["k"]
  if k is None:
    s["k"] = [1] if s["n"] else []
  else:
    k = [k] if isinstance(k, int) and not isinstance(k, bool) else k
    if not isinstance(k, (list, tuple)) or not k or any(
        isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in k):
      raise UsageError(f"{where}: k={s['k']!r} must be a list of integers >= 1")
    if max(k) > s["n"]:
      raise UsageError(f"{where}: pass@{max(k)} needs k <= n, the samples per problem; "
                       f"n={s['n']} (raise n or lower k)")
    s["k"] = sorted(set(k))
  if s["distribution"] is None:
    s["distribution"] = "ood" if s["level"] in tasks.OOD_LEVELS else "id"


def _built_in(kind, data):
  return data in BUILT_IN.get(kind, ())


def _is_file(data: str) -> bool:
  """A path, not a data.mixture source (kjv, synthetic(...), arrayrecord(GLOB), ...)."""
  return data.partition("(")[0].strip() not in sources.KINDS


def _default_name(kind, data, settings):
  stem = os.path.splitext(os.path.basename(data))[0] if _is_file(data) else data
  stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or kind
  if kind == "perplexity":
    return f"{stem}_perplexity"
  if kind == "generation" and settings["level"]:
    return f"{stem}_level{settings['level']}"
  return stem


def load_suite(suite: str | list, data_dir: str = "~/.cache/fmjax") -> list[Entry]:
  """The suite's entries with their data read (`items`): everything a run needs but
  the model. `suite` is what parse_suite takes, or its entries. UsageError for a
  bad suite, Failure for data that cannot be read."""
  entries = (list(suite) if isinstance(suite, list) and suite and
             all(isinstance(e, Entry) for e in suite) else parse_suite(suite))
  data_dir = os.path.expanduser(data_dir)
  for e in entries:
    if e.kind == "perplexity":
      e.items = _perplexity_documents(e, data_dir)
    elif e.kind == "multiple_choice":
      e.items = _multiple_choice_items(e, data_dir)
    else:
      e.items = _generation_items(e)
  return entries


def _perplexity_documents(e: Entry, data_dir: str) -> list[dict]:
  """[{"text": str}] or, for a source of token ids, [{"tokens": [int]}]."""
  limit = e.settings["documents"]
  if _is_file(e.data):
    if e.data.endswith(".jsonl"):
      docs = [{"text": r["text"]} for r in _jsonl(e.data, {"text": str})]
    else:
      docs = [{"text": _read_text(e.data)}]
    docs = [d for d in docs if d["text"]]
  else:
    try:
      source = sources.open_source(e.data, e.settings["split"], data_dir)
    except (FileNotFoundError, ValueError) as err:
      raise Failure(f"{e.name}: {err}") from None
    docs = []
    for i in range(len(source.records)):
      if limit and len(docs) >= limit:
        break
      record = source.records[i]
      if source.tokens:
        docs.append({"tokens": [int(t) for t in record["tokens"]]})
        continue
      try:
        text = record["text"].decode("utf-8")
      except UnicodeDecodeError as err:
        raise Failure(f"{e.name}: {source.where(i)} is not UTF-8 ({err})") from None
      if text.strip():
        docs.append({"text": text})
  docs = docs[:limit or None]
  if not docs:
    raise Failure(f"{e.name}: {e.data} has no documents to measure")
  return docs


def _read_text(path: str) -> str:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as err:
    raise Failure(f"{path}: {err.strerror or err}") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as err:
    raise Failure(f"{path} is not UTF-8 text ({err}); convert it to UTF-8") from None


def _jsonl(path: str, fields: dict) -> list[dict]:
  """The records of a JSON-lines file, each with `fields` (name -> type) checked."""
  out = []
  for n, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as err:
      raise Failure(f"{path} line {n} is not JSON ({err})") from None
    if not isinstance(record, dict):
      raise Failure(f"{path} line {n} is not a JSON object")
    for field, kind in fields.items():
      if field not in record:
        raise Failure(f"{path} line {n} has no field {field!r}; each record needs "
                      f"{', '.join(repr(f) for f in fields)}")
      if not isinstance(record[field], kind) or isinstance(record[field], bool):
        raise Failure(f"{path} line {n}: field {field!r} must be a {kind.__name__}")
    out.append(record)
  if not out:
    raise Failure(f"{path} has no records")
  return out


def _multiple_choice_items(e: Entry, data_dir: str) -> list[dict]:
  if e.data == "kjv_cloze":
    from fmjax.data import kjv  # only when used: it loads tensorflow_datasets
    source = kjv.load_source(data_dir, e.settings["split"])
    chapters = [(r["id"].decode(), r["text"].decode()) for r in
                source.__getitems__(range(len(source)))]
    return cloze.items(sorted(chapters), e.settings["examples"], e.settings["seed"])
  items = _jsonl(e.data, {"context": str, "choices": list, "answer": int})
  for n, item in enumerate(items, 1):
    choices = item["choices"]
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
      raise Failure(f"{e.data} record {n}: choices must be a list of two or more strings")
    if not 0 <= item["answer"] < len(choices):
      raise Failure(f"{e.data} record {n}: answer={item['answer']} is not an index of its "
                    f"{len(choices)} choices")
  return items[:e.settings["examples"] or None]


def _generation_items(e: Entry) -> list[dict]:
  examples = e.settings["examples"]
  if e.data in tasks.TASKS:
    which = tasks.TASKS.index(e.data)
    size = len(tasks.TASKS) * (examples or 100)
    data = tasks.Instructions("validation", seed=e.settings["seed"], size=size,
                              level=e.settings["level"])
    return [{"task": e.data, "prompt": data[i]["prompt"]}
            for i in range(which, size, len(tasks.TASKS))]
  if e.data in tasks.FAMILIES:  # a family outside the default mix (addition) is drawn alone
    data = tasks.Instructions("validation", seed=e.settings["seed"], size=examples or 100,
                              level=e.settings["level"], tasks=(e.data,))
    return [{"task": e.data, "prompt": data[i]["prompt"]} for i in range(len(data))]
  items = _jsonl(e.data, {"task": str, "prompt": str})
  for n, item in enumerate(items, 1):
    if item["task"] not in tasks.FAMILIES:
      raise Failure(f"{e.data} record {n}: task {item['task']!r} has no verifier; tasks are "
                    f"{', '.join(tasks.FAMILIES)}")
    try:
      tasks.verify(item["task"], item["prompt"], "")
    except (AttributeError, ValueError):  # the verifier cannot read the prompt
      raise Failure(f"{e.data} record {n}: {item['prompt']!r} is not a {item['task']} prompt "
                    "its verifier can read (see fmjax/data/tasks.py)") from None
  return items[:examples or None]

