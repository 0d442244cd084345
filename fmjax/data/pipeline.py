"""grain pipelines: sources -> documents -> tokens -> packed rows -> mixed batches.

A batch is a dict of int32 numpy arrays of shape (batch, seq_len):
  tokens       token ids, 0 = padding;
  segment_ids  1, 2, 3, ... for the document pieces packed into a row, 0 for padding;
  positions    the position of each token within its piece, from 0.

A text document becomes `[bos] + encode(text) + [eos]`; a synthetic one is
its token ids as they are (see fmjax.data.synthetic). Each source's documents
are concatenated and cut into rows of exactly seq_len tokens (grain's
ConcatThenSplit), so no token is dropped and rows of the endless train stream
hold no padding. A document cut at the end of a row continues at the start of
the next row as a new segment whose positions restart at 0 (that piece has no
bos). Rows of the mixture's sources are then interleaved by weight
(fmjax.data.mixture) and batched.

Per host: every source's documents are shuffled into one global order per
epoch (epoch e from the seed and e); host i of n reads documents i, i+n, i+2n,
... of it, so the hosts together read each document of an epoch exactly once.

Workers: with data.num_workers > 0, grain worker processes read and tokenize
documents; packing, mixing and batching happen in the main process, so the
batches are the same for any number of workers.

The train stream's iterator state is a small JSON-serialisable dict
(document counts and packer remainders, not data); after `set_state`, an
iterator yields exactly the batches an uninterrupted one would, with any
number of workers.

Bad documents: empty ones and ones over data.max_doc_bytes are skipped,
counted (in the iterator state) and logged with their file and record; text
that is not UTF-8 stops the run with the file and record (or is skipped, with
data.bad_utf8 = "skip"). If more than data.max_skip_fraction of the documents
read so far are skipped (after the first 100), the stream stops with an error:
a run never trains on a source that is mostly garbage. A source with no
documents in a split (EmptySourceError), or none that can be used, stops it too.
"""

from __future__ import annotations

import itertools
import json
import os

from absl import flags, logging
import grain
import numpy as np

from fmjax.data import mixture as mixture_lib
from fmjax.data import sources as sources_lib
from fmjax.data.tokenizer import Tokenizer

# One thread reads and tokenizes up to 128 documents ahead (~900k tokens/s on
# one core; more threads do not help much).
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=128)
MIN_DOCS_FOR_SKIP_CHECK = 100


class BadDataError(ValueError):
  """A document that cannot be used, named by its file and record."""


class EmptySourceError(BadDataError):
  """A source of data.mixture has no documents in a split."""


class Prepare(grain.transforms.MapWithIndex):
  """Record i of a source -> {"tokens": int32} or, for a document to skip, {"skip": reason}."""

  def __init__(self, tokenizer: Tokenizer, source: sources_lib.Source, max_doc_bytes: int,
               bad_utf8: str):
    self.tokenizer = tokenizer  # pickles as its model path, for worker processes
    self.tokens, self.where, self.size = source.tokens, source.where, len(source.records)
    self.max_doc_bytes, self.bad_utf8 = max_doc_bytes, bad_utf8

  def map_with_index(self, i, record):
    i %= self.size  # grain counts on through later epochs
    if self.tokens:
      ids = np.asarray(record["tokens"], np.int32)
      return {"tokens": ids} if len(ids) else {"skip": f"{self.where(i)}: empty document"}
    raw = record["text"]
    if len(raw) > self.max_doc_bytes:
      return {"skip": f"{self.where(i)}: {len(raw)} bytes, over data.max_doc_bytes="
                      f"{self.max_doc_bytes}"}
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      message = f"{self.where(i)}: not UTF-8 ({e})"
      if self.bad_utf8 == "skip":
        return {"skip": message}
      raise BadDataError(f"{message}; fix the data, or set data.bad_utf8='skip' to skip "
                         "such documents") from None
    if not text.strip():
      return {"skip": f"{self.where(i)}: empty document"}
    tok = self.tokenizer
    return {"tokens": np.asarray([tok.bos_id] + tok.encode(text) + [tok.eos_id], np.int32)}


def documents(source: sources_lib.Source, tokenizer: Tokenizer, d) -> grain.MapDataset:
  """The source's documents in stored order, prepared lazily."""
  return grain.MapDataset.source(source.records).map_with_index(
      Prepare(tokenizer, source, d.max_doc_bytes, d.bad_utf8))


class HostDocuments(grain.IterDataset):
  """Documents i, i+n, i+2n, ... of an endless MapDataset, for host i of n.

  Like grain's ElasticIterator, its state is a position in the global order
  (here, the number of documents this host has taken), and set_state rebuilds
  the reader there. So the state does not depend on num_workers: a run can
  resume with another number of worker processes and get the same documents.
  """

  def __init__(self, docs: grain.MapDataset, process_index: int, process_count: int,
               num_workers: int):
    super().__init__()
    self.docs, self.num_workers = docs, num_workers
    self.process_index, self.process_count = process_index, process_count

  def __iter__(self):
    return _HostDocumentsIterator(self)


class _HostDocumentsIterator(grain.DatasetIterator):

  def __init__(self, ds: HostDocuments):
    super().__init__()
    self._ds, self._taken, self._reader = ds, 0, None

  def _start(self):
    ds = self._ds
    first = ds.process_index + self._taken * ds.process_count
    reader = ds.docs[first::ds.process_count].to_iter_dataset(READ_OPTIONS)
    if ds.num_workers > 0:
      if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
        flags.FLAGS.mark_as_parsed()
      reader = reader.mp_prefetch(grain.MultiprocessingOptions(num_workers=ds.num_workers))
    self._reader = reader.__iter__()

  def __next__(self):
    if self._reader is None:
      self._start()
    doc = next(self._reader)
    self._taken += 1
    return doc

  def get_state(self):
    return {"taken": self._taken}

  def set_state(self, state):
    self.close()
    self._taken = int(state["taken"])

  def close(self):
    if self._reader is not None:
      self._reader.close()
      self._reader = None


class SkipBad(grain.IterDataset):
  """Drops documents marked for skipping; counts and logs them; stops on too many."""

  def __init__(self, parent: grain.IterDataset, name: str, max_skip_fraction: float,
               hopeless_after: int = 0):
    super().__init__(parent)
    self.name, self.max_skip_fraction = name, max_skip_fraction
    self.hopeless_after = hopeless_after

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__(), self.name, self.max_skip_fraction,
                            self.hopeless_after)


class _SkipBadIterator(grain.DatasetIterator):
  """After `hopeless_after` documents (0: never), all of them skipped, the stream stops:
  an endless stream of a source with no usable document would look for one forever."""

  def __init__(self, parent, name, max_skip_fraction, hopeless_after=0):
    super().__init__(parent)
    self._name, self._max, self._hopeless_after = name, max_skip_fraction, hopeless_after
    self._seen, self._skipped = 0, 0

  def __next__(self):
    while True:
      doc = next(self._parent)
      self._seen += 1
      if "skip" not in doc:
        return doc
      self._skipped += 1
      if self._skipped <= 10 or self._skipped % 1000 == 0:
        logging.warning("data source %s: skipped %s (%d of %d documents skipped so far)",
                        self._name, doc["skip"], self._skipped, self._seen)
      if self._seen >= MIN_DOCS_FOR_SKIP_CHECK and self._skipped > self._max * self._seen:
        raise BadDataError(
            f"data source {self._name}: {self._skipped} of the {self._seen} documents read "
            f"so far were skipped, over data.max_skip_fraction={self._max} (last: "
            f"{doc['skip']}); fix the data or raise the limit")
      if self._hopeless_after and self._skipped == self._seen >= self._hopeless_after:
        raise BadDataError(
            f"data source {self._name}: none of its documents can be used ({self._seen} read, "
            f"all skipped; last: {doc['skip']}); fix the data or take the source out of "
            "data.mixture")

  def get_state(self):
    return {"parent": self._parent.get_state(), "seen": self._seen, "skipped": self._skipped}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._seen, self._skipped = state["seen"], state["skipped"]


def pack(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Token documents -> rows of seq_len with segment ids and positions."""
  packed = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len})
  return packed.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"],
                               "positions": r["tokens_positions"]})


def open_sources(d, split: str) -> dict[str, sources_lib.Source]:
  """name -> source of `split`, for every component of data.mixture.

  Raises EmptySourceError, naming the source and split, if one has no documents.
  """
  data_dir = os.path.expanduser(d.data_dir)
  out = {}
  for c in mixture_lib.parse_mixture(d.mixture):
    source = sources_lib.open_source(c.spec, split, data_dir)
    if not len(source.records):
      files = source.metadata.get("files")
      where = f" ({files} file{'s' if files != 1 else ''}, all empty)" if files else ""
      raise EmptySourceError(
          f"data.mixture source {c.name!r} has no documents in its {split} split{where}; "
          "write documents into it (tools/convert_text.py), or take it out of data.mixture")
    out[c.name] = source
  return out


def train_dataset(d, tokenizer: Tokenizer, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Endless packed train batches of (batch_size, d.seq_len) for host `process_index`.

  `d` is the config's data section: mixture, curriculum, seq_len, seed,
  num_workers and the bad-data limits. Curriculum steps count batches of this
  iterator.
  """
  components, stages = mixture_lib.from_config(d)
  srcs = open_sources(d, "train")
  rows = {}
  for i, c in enumerate(components):
    # Component 0 keeps the seed of a single-source stream.
    seed = _mix(d.seed if i == 0 else (d.seed, i))
    docs = documents(srcs[c.name], tokenizer, d).shuffle(seed=seed).repeat()
    stream = HostDocuments(docs, process_index, process_count, d.num_workers)
    # Four epochs of every host's share: a usable document would have come up by then.
    hopeless_after = 4 * len(srcs[c.name].records) * process_count
    rows[c.name] = pack(SkipBad(stream, c.name, d.max_skip_fraction, hopeless_after),
                        d.seq_len)
  if len(stages) == 1 and len(rows) == 1:
    mixed = rows[components[0].name]  # one source: nothing to mix
  else:
    mixed = mixture_lib.ScheduledMix(rows, [(step * batch_size, w) for step, w in stages])
  return _JsonState(mixed.batch(batch_size, drop_remainder=True))


def host_shards(batch_size: int, rows: tuple[int, int], shards: int) -> range:
  """The data shards that give rows [start, stop) of each batch; ValueError if none do."""
  start, stop = rows
  if batch_size % shards:
    raise ValueError(f"train.batch_size={batch_size} does not split into {shards} data shards; "
                     "set data.shards to a divisor of it")
  per_shard = batch_size // shards
  if start % per_shard or stop % per_shard:
    raise ValueError(f"this process feeds rows {start} to {stop} of each batch, not a whole "
                     f"number of data shards of {per_shard} rows; set data.shards to a "
                     "multiple of the process count")
  return range(start // per_shard, stop // per_shard)


def host_train_dataset(d, tokenizer: Tokenizer, *, batch_size: int, rows: tuple[int, int],
                       shards: int) -> grain.IterDataset:
  """Rows [start, stop) of each global train batch of `batch_size` rows.

  The global stream is `shards` streams of train_dataset (shard i reads
  documents i, i+shards, ...), each giving batch_size / shards rows of every
  batch, in shard order. A process reads only the shards of its rows, so the
  global batches depend on `shards`, not on how many processes read them: a
  run on one process and on several gives the same batches. With one shard
  per process this is train_dataset for that host (and checkpoints the same
  iterator state).
  """
  per_shard = batch_size // shards
  streams = [train_dataset(d, tokenizer, batch_size=per_shard, process_index=i,
                           process_count=shards)
             for i in host_shards(batch_size, rows, shards)]
  return streams[0] if len(streams) == 1 else _Rows(streams)


class _Rows(grain.IterDataset):
  """Batches of several streams, their rows concatenated in order; state: one per stream."""

  def __iter__(self):
    return _RowsIterator([p.__iter__() for p in self._parents])


class _RowsIterator(grain.DatasetIterator):

  def __next__(self):
    batches = [next(p) for p in self._parents]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {"shards": [p.get_state() for p in self._parents]}

  def set_state(self, state):
    for p, s in zip(self._parents, state["shards"], strict=True):
      p.set_state(s)


def eval_batches(d, tokenizer: Tokenizer, *, batch_size: int, num_batches: int) -> list[dict]:
  """The first `num_batches` full batches of the validation split, in stored order.

  Each source's validation documents are packed in stored order; with several
  sources, their rows are mixed by the weights of the last curriculum stage
  (the distribution training ends on). Deterministic, not shuffled.
  num_batches <= 0 means every full batch; when there are fewer than
  `num_batches` full batches, all of them are returned. Only a source's last
  row has padding; a partial last batch is dropped.
  """
  components, stages = mixture_lib.from_config(d)
  srcs = open_sources(d, "validation")
  weights = stages[-1][1]
  rows = {}
  for c in components:
    if c.name in weights:
      docs = documents(srcs[c.name], tokenizer, d).to_iter_dataset(READ_OPTIONS)
      rows[c.name] = pack(SkipBad(docs, c.name, d.max_skip_fraction), d.seq_len)
  ds = (next(iter(rows.values())) if len(rows) == 1 else grain.IterDataset.mix(rows, weights))
  ds = ds.batch(batch_size, drop_remainder=True)
  return list(itertools.islice(ds, num_batches if num_batches > 0 else None))


def data_metadata(d) -> dict:
  """What the run summary records about its data: for synthetic sources, the exact entropy.

  `data_entropy_nats` (the irreducible loss E) is present when every source
  with weight in the last stage is synthetic: it is their weighted entropy rate.
  """
  components, stages = mixture_lib.from_config(d)
  weights = stages[-1][1]
  out = {"data_mixture": d.mixture}
  if d.curriculum:
    out["data_curriculum"] = d.curriculum
  metas = {c.name: sources_lib.open_source(c.spec, "validation", "").metadata
           for c in components if c.name in weights and c.spec.startswith("synthetic")}
  if len(metas) == len(weights):
    out["data_entropy_nats"] = sum(weights[n] * m["entropy_nats_per_token"]
                                   for n, m in metas.items())
  return out


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, d=None):
  """Raises ValueError if the data has ids the model's embedding does not have."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's "
        f"vocab_size is {model_vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
  if d is None:
    return
  for c in mixture_lib.parse_mixture(d.mixture):
    if c.spec.startswith("synthetic"):
      need = sources_lib.open_source(c.spec, "validation", "").metadata["vocab_size"]
      if need > model_vocab_size:
        raise ValueError(f"source {c.spec} has token ids up to {need - 1} but the model's "
                         f"vocab_size is {model_vocab_size}; set model.vocab_size >= {need}")


def iterator_state_to_json(iterator: grain.DatasetIterator) -> str:
  """The iterator's position as JSON (what grain.checkpoint writes too)."""
  return json.dumps(iterator.get_state())


def restore_iterator_state(iterator: grain.DatasetIterator, state: str | dict):
  """Moves a fresh iterator of the same dataset to a saved position (JSON or dict)."""
  iterator.set_state(json.loads(state) if isinstance(state, str) else state)


def _mix(seed) -> int:
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
