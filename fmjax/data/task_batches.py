"""Batches of the task datasets (fmjax.data.tasks) for SFT, DPO and contrastive training.

Chat template: an example is rendered as

  [bos] "<|user|>\\n{prompt}\\n<|assistant|>\\n" | "{response}" [eos]

where everything left of `|` is the prompt and the rest is the response.

loss_mask follows fmjax.train.objectives.next_token_targets: loss_mask[t] gates the
loss of predicting token t+1 from position t, so it is 1 exactly at the
positions whose next token is a response token (the eos included).

SFT batches, (B, L) int32: tokens, segment_ids, positions, loss_mask. Whole
examples are packed first-fit into rows (grain's FirstFitPackIterDataset), one
segment per example, never split across rows.

DPO batches, (B, L) int32: chosen_{tokens,segment_ids,positions,loss_mask} and
rejected_{...}: row i of each holds example i with its chosen or rejected
response, alone in the row, padded with 0.

Contrastive batches, (B, L) int32: anchor_{tokens,segment_ids,positions} and
positive_{...}: row i holds the two passages of pair i, each [bos] text [eos]
cut to L tokens. Each epoch takes a fresh order of the chapters, cut to a
whole number of batches, so the B pairs of a batch come from B distinct
chapters and each row's positive is the only positive for its anchor among the B.

Prompt batches (RL rollouts; fmjax.posttrain.rl), (B, P) int32 prompt_tokens,
right-padded with 0 and cut at P, and (B, 1) int32 prompt_length (before any
cut: a longer prompt is the rollout's error to report) and index (of the example
in its task dataset, so rewards can be computed from the example).

Examples longer than L (prompt plus response) are skipped, counted and logged
(fmjax.data.pipeline.SkipBad). Train streams are endless and reshuffled every
epoch; validation streams are finite and in stored order. Iterator states are
JSON and resume exactly.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from fmjax.data import pipeline, tasks
from fmjax.data.tokenizer import Tokenizer

USER, ASSISTANT = "<|user|>\n", "\n<|assistant|>\n"


def render(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
  """(prompt ids, response ids) of one example under the chat template."""
  return ([tokenizer.bos_id] + tokenizer.encode(USER + prompt + ASSISTANT),
          tokenizer.encode(response) + [tokenizer.eos_id])


def _sequence(prompt_ids, response_ids):
  """tokens and loss_mask (1 where the next token is a response token)."""
  tokens = np.asarray(prompt_ids + response_ids, np.int32)
  mask = np.zeros(len(tokens), np.int32)
  mask[len(prompt_ids) - 1:len(tokens) - 1] = 1
  return tokens, mask


def _padded(tokens, mask, seq_len, prefix):
  """One sequence alone in a row of seq_len, padded with 0; with a loss_mask unless it is None."""
  n = len(tokens)
  row = {"tokens": tokens, "segment_ids": np.ones(n), "positions": np.arange(n), "loss_mask": mask}
  return {prefix + k: np.pad(np.asarray(v, np.int32), (0, seq_len - n))
          for k, v in row.items() if v is not None}


class _Example(grain.transforms.Map):
  """An example of a task dataset -> the rows of one batch element."""

  def __init__(self, tokenizer, seq_len):
    self.tokenizer, self.seq_len = tokenizer, seq_len


class _SftExample(_Example):

  def map(self, e):
    tokens, mask = _sequence(*render(self.tokenizer, e["prompt"], e["response"]))
    if len(tokens) > self.seq_len:
      return {"skip": f"{e['task']} example of {len(tokens)} tokens, over seq_len={self.seq_len}"}
    return {"tokens": tokens, "loss_mask": mask}


class _DpoExample(_Example):

  def map(self, e):
    row = {}
    for side in ("chosen", "rejected"):
      tokens, mask = _sequence(*render(self.tokenizer, e["prompt"], e[side]))
      if len(tokens) > self.seq_len:
        return {"skip": f"{e['task']} example of {len(tokens)} tokens, over seq_len="
                        f"{self.seq_len}"}
      row.update(_padded(tokens, mask, self.seq_len, f"{side}_"))
    return row


class _PairExample(_Example):

  def map(self, e):
    tok, row = self.tokenizer, {}
    for side in ("anchor", "positive"):
      ids = ([tok.bos_id] + tok.encode(e[side]) + [tok.eos_id])[:self.seq_len]
      row.update(_padded(ids, None, self.seq_len, f"{side}_"))
    return row


class _PromptExample(_Example):

  def map(self, e):
    ids = np.asarray(render(self.tokenizer, e["prompt"], "")[0], np.int32)
    return {"prompt_tokens": np.pad(ids[:self.seq_len], (0, max(0, self.seq_len - len(ids)))),
            "prompt_length": np.asarray([len(ids)], np.int32),
            "index": np.asarray([e["index"]], np.int32)}


def _examples(source, split, seed, with_index=False):
  ds = grain.MapDataset.source(source)
  if with_index:
    ds = ds.map_with_index(lambda i, e: dict(e, index=i))
  return ds.shuffle(seed=pipeline._mix(seed)).repeat() if split == "train" else ds  # pylint: disable=protected-access


def sft_batches(tokenizer: Tokenizer, split: str, *, seq_len: int, batch_size: int,
                seed: int = 0, size: int | None = None,
                task_names: tuple[str, ...] = tasks.TASKS) -> grain.IterDataset:
  ex = _examples(tasks.Instructions(split, seed, size, tasks=task_names), split, seed)
  ds = ex.map(_SftExample(tokenizer, seq_len)).to_iter_dataset(pipeline.READ_OPTIONS)
  ds = pipeline.SkipBad(ds, "sft", max_skip_fraction=0.01)
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"tokens": seq_len, "loss_mask": seq_len},
      num_packing_bins=batch_size, shuffle_bins=False)
  ds = ds.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"],
                         "positions": r["tokens_positions"], "loss_mask": r["loss_mask"]})
  return ds.batch(batch_size, drop_remainder=True)


def dpo_batches(tokenizer: Tokenizer, split: str, *, seq_len: int, batch_size: int,
                seed: int = 0, size: int | None = None,
                one_pass: bool = False, task_names: tuple[str, ...] = tasks.TASKS,
                jsonl: str = "") -> grain.IterDataset:
  """`one_pass`: every example of the split once, in stored order, the last batch
  possibly short (to precompute something per example). `jsonl`: the pairs of
  that file (tasks.PreferenceFile) instead of the task preferences."""
  prefs = (tasks.PreferenceFile(jsonl, split) if jsonl
           else tasks.Preferences(split, seed, size, tasks=task_names))
  ex = grain.MapDataset.source(prefs) if one_pass else _examples(prefs, split, seed)
  ds = ex.map(_DpoExample(tokenizer, seq_len)).to_iter_dataset(pipeline.READ_OPTIONS)
  ds = pipeline.SkipBad(ds, "dpo", max_skip_fraction=0.01)
  return ds.batch(batch_size, drop_remainder=not one_pass)


def prompt_batches(tokenizer: Tokenizer, split: str, *, prompt_len: int, batch_size: int,
                   seed: int = 0, size: int | None = None,
                   task_names: tuple[str, ...] = tasks.TASKS) -> grain.IterDataset:
  """Batches of task prompts for rollouts, `prompt_len` wide (see the module docstring)."""
  ex = _examples(tasks.Instructions(split, seed, size, tasks=task_names), split, seed,
                 with_index=True)
  ds = ex.map(_PromptExample(tokenizer, prompt_len)).to_iter_dataset(pipeline.READ_OPTIONS)
  return ds.batch(batch_size, drop_remainder=True)


class _WholeBatchEpochs:
  """Record k of an endless stream: epoch k // m takes m = n - n % B records of a fresh order.

  So that no batch mixes two epochs (and repeats a chapter).
  """

  def __init__(self, source, batch_size: int, seed: int):
    self.source, self.seed = source, pipeline._mix(seed)  # pylint: disable=protected-access
    self.m = len(source) - len(source) % batch_size
    if not self.m:
      raise ValueError(f"batch_size={batch_size} is more than the {len(source)} records")

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, k: int):
    epoch, j = divmod(k, self.m)
    i = grain.experimental.index_shuffle(j, max_index=len(self.source) - 1,
                                         seed=(self.seed + epoch) % 2**32, rounds=4)
    return self.source[int(i)]


def contrastive_batches(tokenizer: Tokenizer, data_dir: str, split: str, *, seq_len: int,
                        batch_size: int, seed: int = 0) -> grain.IterDataset:
  pairs = tasks.PassagePairs(data_dir, split, seed)
  ex = grain.MapDataset.source(_WholeBatchEpochs(pairs, batch_size, seed) if split == "train"
                               else pairs)
  ds = ex.map(_PairExample(tokenizer, seq_len)).to_iter_dataset(pipeline.READ_OPTIONS)
  return ds.batch(batch_size, drop_remainder=True)
