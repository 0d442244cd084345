"""grain pipelines: documents -> tokens -> packed rows -> batches.

A batch is a dict of int32 numpy arrays of shape (batch, seq_len):
  tokens       token ids, 0 = padding;
  segment_ids  1, 2, 3, ... for the document pieces packed into a row, 0 for padding;
  positions    the position of each token within its piece, from 0.

Each document becomes `[bos] + encode(text) + [eos]`. Documents are concatenated
and cut into rows of exactly seq_len tokens (grain's ConcatThenSplit), so no
token is dropped and rows of the endless train stream hold no padding. A
document cut at the end of a row continues at the start of the next row as a
new segment whose positions restart at 0 (that piece has no bos).

The train stream is endless: epoch e visits the host's documents in an order
drawn from (seed, e), so every epoch is shuffled differently. Its iterator's
`get_state()` is a small JSON-serialisable dict (positions, not data); after
`set_state`, an iterator yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import json

from absl import flags
import grain
import numpy as np

from fmjax.data import kjv
from fmjax.data.tokenizer import Tokenizer

# One thread tokenizes up to 128 documents ahead of the packer (~900k tokens/s on
# one core; more threads do not help much).
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=128)


class Tokenize(grain.transforms.Map):
  """A record {"text": bytes, ...} -> {"tokens": int32 [bos, ..., eos]}."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer  # pickles as its model path, for worker processes

  def map(self, record):
    tok = self.tokenizer
    ids = [tok.bos_id] + tok.encode(record["text"].decode("utf-8")) + [tok.eos_id]
    return {"tokens": np.asarray(ids, np.int32)}


def documents(data_dir: str, split: str, tokenizer: Tokenizer) -> grain.MapDataset:
  """The split's documents in stored order, tokenized lazily."""
  return grain.MapDataset.source(kjv.load_source(data_dir, split)).map(Tokenize(tokenizer))


def pack(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Token documents -> rows of seq_len with segment ids and positions."""
  packed = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len})
  return packed.map(_rename)


def _rename(row):
  return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
          "positions": row["tokens_positions"]}


def train_dataset(data_dir: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0) -> grain.IterDataset:
  """Endless packed train batches of (batch_size, seq_len) for host `process_index`.

  Host i of n reads documents i, i+n, i+2n, ... of the train split. With
  num_workers > 0, that many processes each pack their own slice of those
  documents and batches come from them in turn: deterministic, but different
  batches than num_workers=0, so resume with the num_workers you saved with.
  """
  docs = documents(data_dir, "train", tokenizer)[process_index::process_count]
  docs = docs.shuffle(seed=_mix(seed)).repeat()  # grain shuffles epoch e with _mix(seed) + e
  ds = pack(docs.to_iter_dataset(READ_OPTIONS), seq_len).batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return _JsonState(ds)


def eval_batches(data_dir: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 num_batches: int) -> list[dict]:
  """The first `num_batches` full batches of the validation split, in stored order.

  Deterministic, not shuffled. num_batches <= 0 means every full batch; when the
  split has fewer than `num_batches` full batches, all of them are returned. Only
  the split's last row has padding; a partial last batch is dropped.
  """
  docs = documents(data_dir, "validation", tokenizer).to_iter_dataset(READ_OPTIONS)
  ds = pack(docs, seq_len).batch(batch_size, drop_remainder=True)
  return list(itertools.islice(ds, num_batches if num_batches > 0 else None))


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int):
  """Raises ValueError if the tokenizer emits ids the model's embedding does not have."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's "
        f"vocab_size is {model_vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")


def iterator_state_to_json(iterator: grain.DatasetIterator) -> str:
  """The iterator's position as JSON (what grain.checkpoint writes too)."""
  return json.dumps(iterator.get_state())


def restore_iterator_state(iterator: grain.DatasetIterator, state: str | dict):
  """Moves a fresh iterator of the same dataset to a saved position (JSON or dict)."""
  iterator.set_state(json.loads(state) if isinstance(state, str) else state)


def _mix(seed: int) -> int:
  """A 32-bit shuffle seed far from that of seed + 1 (grain shuffles epoch e with seed + e)."""
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


class _JsonState(grain.IterDataset):
  """Its iterator restores from a state that went through JSON.

  grain's ConcatThenSplit keeps tuples in its state and compares them with
  tuples: after JSON turns them into lists, a restore from a state without a
  split document silently drops one document. This puts the tuples back.
  """

  def __iter__(self):
    return _JsonStateIterator(self._parent.__iter__())


class _JsonStateIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(_tuples_in_slices(state))


def _tuples_in_slices(state):
  if isinstance(state, dict):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices"
                else _tuples_in_slices(v)) for k, v in state.items()}
  if isinstance(state, list):
    return [_tuples_in_slices(s) for s in state]
  return state
