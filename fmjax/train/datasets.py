"""The data of a run's objective: its train dataset and held-out batches."""

from __future__ import annotations

import itertools
import os

from fmjax.data import pipeline, task_batches
from fmjax.errors import ConfigError


def datasets(cfg, tokenizer, *, batch_size: int, rows: tuple[int, int], shards: int,
             process_count: int = 1, batch_shards: int = 1):
  """(train dataset, held-out batches) of the objective: rows [start, stop) of each
  global batch of `batch_size` rows (`rows` and `shards` as in
  fmjax.data.pipeline.host_train_dataset).

  next_token reads data.mixture (fmjax.data.pipeline); sft, dpo and
  contrastive read the task datasets (fmjax.data.task_batches). Contrastive
  holds out one batch of every validation pair (cut to a multiple of
  `batch_shards`), so its held-out accuracy is recall@1 over all of them.
  """
  d, name = cfg.data, cfg.objective.name
  if name == "next_token":
    held_out = pipeline.eval_batches(d, tokenizer, batch_size=batch_size,
                                     num_batches=d.eval_batches)
    return (pipeline.host_train_dataset(d, tokenizer, batch_size=batch_size, rows=rows,
                                        shards=shards),
            [{k: v[rows[0]:rows[1]] for k, v in b.items()} for b in held_out])
  if process_count > 1:
    raise ConfigError(f"objective.name={name!r} reads task data on one host only so far; "
                      f"run it on one host, not {process_count}")
  size = d.task_size or None
  if name == "contrastive":
    data_dir = os.path.expanduser(d.data_dir)
    train = task_batches.contrastive_batches(tokenizer, data_dir, "train", seq_len=d.seq_len,
                                             batch_size=batch_size, seed=d.seed)
    pairs = len(task_batches.tasks.PassagePairs(data_dir, "validation", d.seed))
    whole = pairs - pairs % batch_shards
    held_out = list(task_batches.contrastive_batches(
        tokenizer, data_dir, "validation", seq_len=d.seq_len, batch_size=whole, seed=d.seed))
    return train, held_out
  make = task_batches.sft_batches if name == "sft" else task_batches.dpo_batches
  train = make(tokenizer, "train", seq_len=d.seq_len, batch_size=batch_size, seed=d.seed,
               size=size)
  held_out = make(tokenizer, "validation", seq_len=d.seq_len, batch_size=batch_size, seed=d.seed)
  return train, list(itertools.islice(held_out, d.eval_batches if d.eval_batches > 0 else None))
