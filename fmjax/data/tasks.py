"""Task datasets the project makes itself: SFT pairs, DPO preferences, contrastive pairs.

Every example is a pure function of (seed, split, index), so a source needs no
files, reads in any order, and is the same on every host and in every worker.

- `Instructions`: {"task", "prompt", "response"} for three verifiable tasks:
  arithmetic ("What is 37 * 12?"), string reversal and sorting numbers.
  Train and validation never share a prompt: a prompt's split is fixed by a
  hash of its text, and record i of a split is the i-th draw that lands there.
- `Preferences`: the same examples with "chosen" (the correct response) and
  "rejected" (a wrong one: an answer off by a little, a string reversed with
  two characters swapped, numbers sorted with one pair out of order).
- `PassagePairs`: {"chapter", "anchor", "positive"}: two disjoint runs of
  verses from one King James chapter, one record per chapter of the split. A
  batch of distinct chapters gives each anchor its positive and B-1 in-batch
  negatives.

Levels: level 0 (the default) is what training draws. Levels 1 and 2
(OOD_LEVELS) are harder, held out from training to measure generalisation
out of distribution: longer numbers, more steps, longer strings, longer
lists. Their prompts never occur at level 0 (the operands, lengths or counts
differ), and `Instructions(split, level=L)` draws them with a seed of their own,
so level 0 is exactly what it was before levels existed.

`verify(task, prompt, response)` checks a response by recomputing the answer
from the prompt, independently of the generator, at every level; `reward` is
that check as a 0/1 reward of (example, completion), the default verifier of
RL (fmjax/posttrain/rl.py).

`addition` (in FAMILIES, not in the default TASKS) is a task where writing the
intermediate steps helps: "Add 47 + 85" is answered column by column, carries
written out, "7+5=12, 4+8+1=13, so 132". Only the final number is checked.
Level 0 adds two 2-digit numbers; the held-out levels 1 and 2 add 3- and
4-digit ones. `Instructions(..., tasks=("addition",))` draws it alone.

`PreferenceFile` reads preference pairs from a JSONL file of {"prompt",
"chosen", "rejected"} records instead, split into train and validation by the
same hash of the prompt.
"""

from __future__ import annotations

import json
import re
import zlib

import numpy as np

TASKS = ("arithmetic", "reversal", "sorting")  # what Instructions draws by default
FAMILIES = TASKS + ("addition",)  # every task family
ADDITION_DIGITS = {0: 2, 1: 3, 2: 4}  # operand digits of addition at each level
SPLITS = {"train": 0, "validation": 1}
LEVELS = (0, 1, 2)
OOD_LEVELS = (1, 2)  # held out from training: harder than anything level 0 draws
VALIDATION_BUCKETS = 10  # one prompt in ten belongs to validation


def _split_of(prompt: str) -> str:
  return "validation" if zlib.crc32(prompt.encode()) % VALIDATION_BUCKETS == 0 else "train"


def _draw(task: str, rng: np.random.Generator, level: int = 0) -> tuple[str, str, str]:
  """(prompt, correct response, a wrong response) of one random example of `task`."""
  if task == "addition":
    return _addition(rng, ADDITION_DIGITS[level])
  if level:
    return _draw_ood(task, rng, level)
  if task == "arithmetic":
    a, b = (int(x) for x in rng.integers(0, 100, 2))
    op = "+-*"[int(rng.integers(3))]
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    delta = int(rng.choice([-10, -2, -1, 1, 2, 10]))
    return f"What is {a} {op} {b}?", str(answer), str(answer + delta)
  if task == "reversal":
    n = int(rng.integers(3, 9))
    letters = rng.choice(list("abcdefghijklmnopqrstuvwxyz"), n, replace=False)
    word = "".join(letters)
    right = word[::-1]
    i = int(rng.integers(n - 1))  # letters are distinct, so swapping two changes the string
    wrong = right[:i] + right[i + 1] + right[i] + right[i + 2:]
    return f"Reverse the string: {word}", right, wrong
  if task == "sorting":
    n = int(rng.integers(3, 8))
    return _sorting([int(x) for x in rng.choice(100, n, replace=False)], rng)
  raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def _sorting(numbers: list[int], rng: np.random.Generator) -> tuple[str, str, str]:
  """A sorting example of `numbers`; the wrong answer swaps two neighbours of the right one."""
  right = sorted(numbers)
  i = int(rng.integers(len(numbers) - 1))
  wrong = right[:i] + [right[i + 1], right[i]] + right[i + 2:]
  fmt = lambda xs: ", ".join(map(str, xs))  # noqa: E731
  return f"Sort in ascending order: {fmt(numbers)}", fmt(right), fmt(wrong)


def _draw_ood(task: str, rng: np.random.Generator, level: int) -> tuple[str, str, str]:
  """An example of a held-out level: 1 longer, 2 longer still or with more steps."""
  if level not in OOD_LEVELS:
    raise ValueError(f"no level {level}; levels are {', '.join(map(str, LEVELS))}")
  if task == "arithmetic":
    if level == 1:  # three-digit operands
      operands = [int(x) for x in rng.integers(100, 1000, 2)]
    else:  # three operands: two steps, with precedence
      operands = [int(x) for x in rng.integers(0, 100, 3)]
    ops = ["+-*"[int(i)] for i in rng.integers(3, size=len(operands) - 1)]
    text = " ".join(f"{o} {x}" for o, x in zip(ops, operands[1:]))
    prompt = f"What is {operands[0]} {text}?"
    answer = _evaluate(prompt[len("What is "):-1])
    delta = int(rng.choice([-10, -2, -1, 1, 2, 10]))
    return prompt, str(answer), str(answer + delta)
  if task == "reversal":
    n = int(rng.integers(*{1: (9, 14), 2: (14, 20)}[level]))
    word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), n, replace=False))
    right = word[::-1]
    i = int(rng.integers(n - 1))
    return f"Reverse the string: {word}", right, right[:i] + right[i + 1] + right[i] + right[i + 2:]
  if task == "sorting":
    n = int(rng.integers(*{1: (8, 12), 2: (12, 16)}[level]))
    return _sorting([int(x) for x in rng.choice({1: 100, 2: 1000}[level], n, replace=False)], rng)
  raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def addition_steps(a: int, b: int) -> str:
  """'7+5=12, 4+8+1=13, so 132' for 47 + 85: each column from the right with its carry."""
  steps, carry, x, y = [], 0, a, b
  while x or y:
    s = x % 10 + y % 10 + carry
    steps.append(f"{x % 10}+{y % 10}" + (f"+{carry}" if carry else "") + f"={s}")
    carry, x, y = s // 10, x // 10, y // 10
  return ", ".join(steps) + f", so {a + b}"


def _addition(rng: np.random.Generator, digits: int) -> tuple[str, str, str]:
  a, b = (int(x) for x in rng.integers(10**(digits - 1), 10**digits, 2))
  right = addition_steps(a, b)
  delta = int(rng.choice([-10, -1, 1, 10]))
  return f"Add {a} + {b}", right, right.rsplit(" ", 1)[0] + f" {a + b + delta}"


def _evaluate(expression: str) -> int:
  """'12 + 7 * 3' -> 33: non-negative integers, + - *, with * before + and -."""
  parts = expression.split(" ")
  terms, signs, term = [], [1], int(parts[0])
  for op, x in zip(parts[1::2], parts[2::2]):
    if op == "*":
      term *= int(x)
    else:
      terms.append(term)
      signs.append(1 if op == "+" else -1)
      term = int(x)
  terms.append(term)
  return sum(s * t for s, t in zip(signs, terms))


def verify(task: str, prompt: str, response: str) -> bool:
  """Whether `response` answers `prompt` correctly, computed from the prompt alone."""
  if task == "arithmetic":
    expression = re.fullmatch(r"What is (\d+(?: [-+*] \d+)+)\?", prompt).group(1)
    return response == str(_evaluate(expression))
  if task == "reversal":
    return response == prompt.removeprefix("Reverse the string: ")[::-1]
  if task == "sorting":
    numbers = [int(x) for x in prompt.removeprefix("Sort in ascending order: ").split(", ")]
    return response == ", ".join(map(str, sorted(numbers)))
  if task == "addition":
    a, b = (int(x) for x in re.fullmatch(r"Add (\d+) \+ (\d+)", prompt).groups())
    last = re.search(r"(-?\d+)\s*$", response)
    return last is not None and int(last.group(1)) == a + b
  raise ValueError(f"unknown task {task!r}")


def reward(example: dict, completion: str) -> float:
  """1.0 if `completion` answers the task example {"task", "prompt", ...} correctly, else 0.0."""
  return float(verify(example["task"], example["prompt"], completion))


def parse_tasks(text: str) -> tuple[str, ...]:
  """'addition, sorting' -> ('addition', 'sorting'); '' -> TASKS. Raises ValueError."""
  names = tuple(t.strip() for t in text.split(",") if t.strip()) or TASKS
  for t in names:
    if t not in FAMILIES:
      raise ValueError(f"unknown task {t!r}; tasks are {', '.join(FAMILIES)}")
  return names


class Instructions:
  """Random-access SFT examples of one split: {"task", "prompt", "response"} (str).

  `level` > 0 draws a held-out harder level (OOD_LEVELS), for evaluation only;
  `tasks` are the families drawn in turn (default TASKS).
  """

  def __init__(self, split: str, seed: int = 0, size: int | None = None, level: int = 0,
               tasks: tuple[str, ...] = TASKS):
    if split not in SPLITS:
      raise ValueError(f"no split {split!r}; splits are {', '.join(SPLITS)}")
    if level not in LEVELS:
      raise ValueError(f"no level {level}; levels are {', '.join(map(str, LEVELS))}")
    self.split, self.seed, self.level, self.tasks = split, seed, level, tuple(tasks)
    self.size = size or (100_000 if split == "train" else 1_000)

  def __len__(self):
    return self.size

  def _example(self, i: int) -> dict:
    if not 0 <= i < self.size:
      raise IndexError(f"{self.split} has {self.size} examples, asked for {i}")
    task = self.tasks[i % len(self.tasks)]
    for attempt in range(1000):
      key = (self.seed, SPLITS[self.split], i, attempt) + ((self.level,) if self.level else ())
      if self.tasks != TASKS:  # the original mix keeps its draws
        key += (zlib.crc32(task.encode()),)
      prompt, right, wrong = _draw(task, np.random.default_rng(key), self.level)
      if _split_of(prompt) == self.split:
        return {"task": task, "prompt": prompt, "response": right, "rejected": wrong}
    raise RuntimeError("no example landed in the split")  # p ~ 0.9^1000

  def __getitem__(self, i: int) -> dict:
    e = self._example(i)
    return {k: e[k] for k in ("task", "prompt", "response")}


class Preferences(Instructions):
  """Random-access DPO triples: {"task", "prompt", "chosen", "rejected"} (str)."""

  def __getitem__(self, i: int) -> dict:
    e = self._example(i)
    return {"task": e["task"], "prompt": e["prompt"], "chosen": e["response"],
            "rejected": e["rejected"]}


class PreferenceFile:
  """Random-access preference triples of one split of a JSONL file of {"prompt", "chosen",
  "rejected"} records: {"task": "jsonl", "prompt", "chosen", "rejected"}."""

  def __init__(self, path: str, split: str):
    if split not in SPLITS:
      raise ValueError(f"no split {split!r}; splits are {', '.join(SPLITS)}")
    self.records = []
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          r = json.loads(line)
          r = {"task": "jsonl", **{k: str(r[k]) for k in ("prompt", "chosen", "rejected")}}
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{n} is not a JSON record with prompt, chosen and "
                           f"rejected ({type(e).__name__}: {e})") from None
        if _split_of(r["prompt"]) == split:
          self.records.append(r)
    if not self.records:
      raise ValueError(f"{path} has no {split} records (one prompt in "
                       f"{VALIDATION_BUCKETS} is held out, by a hash of its text)")

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    return self.records[i]


class PassagePairs:
  """Random-access contrastive pairs, one per kjv chapter of the split (with >= 2 verses).

  Each passage is a run of up to `max_verses` verses; the anchor ends where the
  positive starts, at a cut drawn from (seed, chapter).
  """

  def __init__(self, data_dir: str, split: str, seed: int = 0, max_verses: int = 3):
    from fmjax.data import kjv  # only when used: it loads tensorflow_datasets
    if split not in SPLITS:
      raise ValueError(f"no split {split!r}; splits are {', '.join(SPLITS)}")
    source = kjv.load_source(data_dir, split)
    records = source.__getitems__(range(len(source)))
    self.chapters = [(r["id"].decode(), r["text"].decode().split("\n")) for r in records]
    self.chapters = [(name, verses) for name, verses in self.chapters if len(verses) >= 2]
    self.data_dir, self.split, self.seed, self.max_verses = data_dir, split, seed, max_verses

  def __reduce__(self):
    return PassagePairs, (self.data_dir, self.split, self.seed, self.max_verses)

  def __len__(self):
    return len(self.chapters)

  def __getitem__(self, i: int) -> dict:
    name, verses = self.chapters[i]
    rng = np.random.default_rng((self.seed, zlib.crc32(name.encode())))
    cut = int(rng.integers(1, len(verses)))
    m = self.max_verses
    return {"chapter": name, "anchor": "\n".join(verses[max(0, cut - m):cut]),
            "positive": "\n".join(verses[cut:cut + m])}
