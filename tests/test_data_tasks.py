"""Task datasets (SFT, DPO, contrastive): splits, verifiable answers, batch layouts."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.train import objectives
from fmjax.data import task_batches, tasks
from conftest import take

SEQ = 128


def test_examples_are_fixed_verifiable_and_the_splits_disjoint():
  train, validation = tasks.Preferences("train", size=3000), tasks.Preferences("validation")
  assert len(validation) == 1000
  for split in (train, validation):
    for i in range(300):
      e = split[i]
      assert e["task"] == tasks.TASKS[i % 3]
      assert tasks.verify(e["task"], e["prompt"], e["chosen"])
      assert not tasks.verify(e["task"], e["prompt"], e["rejected"])
  assert tasks.Preferences("train", size=3000)[17] == train[17]  # a pure function of the index
  assert tasks.Preferences("train", seed=1)[17] != train[17]
  sft = tasks.Instructions("train", size=3000)[17]
  assert sft == {"task": train[17]["task"], "prompt": train[17]["prompt"],
                 "response": train[17]["chosen"]}
  train_prompts = {train[i]["prompt"] for i in range(3000)}
  assert not train_prompts & {validation[i]["prompt"] for i in range(1000)}
  assert len(train_prompts) > 2500


def test_sft_batches_mask_exactly_the_response(tok):
  it = iter(task_batches.sft_batches(tok, "train", seq_len=SEQ, batch_size=4, size=3000))
  batches = take(it, 3)
  rendered = [task_batches.render(tok, e["prompt"], e["response"])
              for e in map(tasks.Instructions("train", size=3000).__getitem__, range(3000))]
  by_prompt = {tuple(p): r for p, r in rendered}
  pieces = 0
  for b in batches:
    assert sorted(b) == ["loss_mask", "positions", "segment_ids", "tokens"]
    assert all(v.shape == (4, SEQ) and v.dtype == np.int32 for v in b.values())
    # The targets the shared objective trains on are exactly the response tokens.
    targets, weights = objectives.next_token_targets({k: jnp.asarray(v) for k, v in b.items()})
    targets, weights = np.asarray(targets), np.asarray(weights)
    for row in range(4):
      seg = b["segment_ids"][row]
      for s in range(1, seg.max() + 1):
        tokens = b["tokens"][row][seg == s]
        np.testing.assert_array_equal(b["positions"][row][seg == s], np.arange(len(tokens)))
        assert tokens[0] == tok.bos_id  # whole examples: never split across rows
        prompt = next(tuple(tokens[:n]) for n in range(len(tokens)) if tuple(tokens[:n]) in by_prompt)
        response = by_prompt[prompt]
        np.testing.assert_array_equal(tokens[len(prompt):], response)
        trained = targets[row][(seg == s) & (weights[row] > 0)]
        np.testing.assert_array_equal(trained, response)
        pieces += 1
  assert pieces >= 12  # several examples are packed into each row
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 2)
  resumed = iter(task_batches.sft_batches(tok, "train", seq_len=SEQ, batch_size=4, size=3000))
  resumed.set_state(state)
  for x, y in zip(take(resumed, 2), expected):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_dpo_batches_pair_chosen_and_rejected(tok):
  b = next(iter(task_batches.dpo_batches(tok, "validation", seq_len=SEQ, batch_size=6)))
  assert all(v.shape == (6, SEQ) for v in b.values()) and len(b) == 8
  prefs = tasks.Preferences("validation")
  for row in range(6):
    e = prefs[row]  # validation is in stored order
    for side in ("chosen", "rejected"):
      prompt, response = task_batches.render(tok, e["prompt"], e[side])
      n = len(prompt) + len(response)
      np.testing.assert_array_equal(b[f"{side}_tokens"][row][:n], prompt + response)
      assert (b[f"{side}_tokens"][row][n:] == 0).all()
      np.testing.assert_array_equal(b[f"{side}_segment_ids"][row], np.arange(SEQ) < n)
      mask = b[f"{side}_loss_mask"][row]
      # mask[t] = 1 exactly when token t+1 is a response token.
      np.testing.assert_array_equal(np.flatnonzero(mask) + 1, np.arange(len(prompt), n))
    assert tok.decode(b["chosen_tokens"][row][b["chosen_loss_mask"][row] == 0]) != ""
    assert not np.array_equal(b["chosen_tokens"][row], b["rejected_tokens"][row])


def test_contrastive_batches_pair_passages_of_one_chapter(tok, data_dir):
  pairs = tasks.PassagePairs(data_dir, "train")
  assert len(pairs) > 1000
  verses_of = dict(pairs.chapters)
  it = iter(task_batches.contrastive_batches(tok, data_dir, "train", seq_len=SEQ,
                                             batch_size=16))
  epoch = len(pairs) // 16
  for batch_number, b in enumerate(take(it, epoch + 2)):
    if batch_number not in (0, epoch - 1, epoch, epoch + 1):
      continue
    assert sorted(b) == sorted(f"{side}_{k}" for side in ("anchor", "positive")
                               for k in ("tokens", "segment_ids", "positions"))
    chapters = []
    for row in range(16):
      a = tok.decode(b["anchor_tokens"][row][1:][b["anchor_tokens"][row][1:] > 3])
      p = tok.decode(b["positive_tokens"][row][1:][b["positive_tokens"][row][1:] > 3])
      chapter = next(name for name, verses in verses_of.items() if a in "\n".join(verses))
      text = "\n".join(verses_of[chapter])
      assert p in text and text.index(a) < text.index(p)  # disjoint: the anchor comes first
      chapters.append(chapter)
    assert len(set(chapters)) == 16  # in-batch negatives are other chapters
