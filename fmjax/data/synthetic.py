"""A synthetic corpus whose entropy rate is known exactly: a sparse Markov chain.

The chain has `states` states. From state i it moves to `branching` successors:
i itself, i+1 (mod states), and branching-2 others drawn at random, with
probabilities drawn from a flat Dirichlet. The self loop and the ring make it
irreducible and aperiodic, so it has one stationary distribution pi, and its
entropy rate is, exactly,

    H = -sum_i pi_i sum_j P_ij log P_ij   (nats per token).

Document d of a split is a stretch of `doc_len` states drawn from the chain,
starting from pi, with a generator seeded by (seed, split, d): documents are a
pure function of their index, so the source needs no files, any document can
be read in any order, and the splits never share a random stream.

Tokens are the ids `FIRST_ID + state`, given to the model directly, without
sentencepiece and without bos or eos: every token the model predicts then has
its predecessor in view, so the best possible expected loss per predicted
token is exactly H. Scaling-law fits use it as the irreducible loss E.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools

import numpy as np

FIRST_ID = 4  # after pad, unk, bos, eos
SPLITS = {"train": 0, "validation": 1}


@dataclasses.dataclass(frozen=True)
class Chain:
  """The chain's parameters; everything else is derived from them."""
  states: int = 256
  branching: int = 8
  seed: int = 0
  doc_len: int = 512
  train_docs: int = 100_000
  validation_docs: int = 1_000

  def __post_init__(self):
    if self.states < 3:
      raise ValueError(f"synthetic: states={self.states} must be >= 3")
    if not 2 <= self.branching <= self.states:
      raise ValueError(f"synthetic: branching={self.branching} must be in [2, states]")
    if self.doc_len < 2 or self.train_docs < 1 or self.validation_docs < 1:
      raise ValueError("synthetic: doc_len must be >= 2 and train_docs, validation_docs >= 1")

  @property
  def vocab_size(self) -> int:
    """The smallest model vocabulary that holds every token of this source."""
    return FIRST_ID + self.states

  @functools.lru_cache(maxsize=8)
  def transitions(self) -> tuple[np.ndarray, np.ndarray]:
    """(successors, probabilities), both (states, branching); rows of probabilities sum to 1."""
    rng = np.random.default_rng(np.random.SeedSequence((self.seed, 0x5EED)))
    n, k = self.states, self.branching
    succ = np.empty((n, k), np.int64)
    for i in range(n):
      others = np.setdiff1d(np.arange(n), [i, (i + 1) % n])
      succ[i] = np.concatenate([[i, (i + 1) % n], rng.choice(others, k - 2, replace=False)])
    succ.flags.writeable = False
    prob = rng.dirichlet(np.ones(k), size=n)
    prob.flags.writeable = False
    return succ, prob

  def matrix(self) -> np.ndarray:
    """The dense transition matrix P (states, states), float64."""
    succ, prob = self.transitions()
    p = np.zeros((self.states, self.states))
    np.put_along_axis(p, succ, prob, axis=1)
    return p

  @functools.lru_cache(maxsize=8)
  def stationary(self) -> np.ndarray:
    """pi with pi P = pi and sum(pi) = 1 (unique: the chain is irreducible)."""
    # (P^T - I) pi = 0 with one equation replaced by sum(pi) = 1: a linear solve.
    a = self.matrix().T - np.eye(self.states)
    a[-1] = 1.0
    b = np.zeros(self.states)
    b[-1] = 1.0
    pi = np.linalg.solve(a, b)
    pi.flags.writeable = False
    return pi

  def entropy_rate(self) -> float:
    """H = -sum_i pi_i sum_j P_ij log P_ij, in nats per token."""
    _, prob = self.transitions()
    return float(-(self.stationary() * (prob * np.log(prob)).sum(axis=1)).sum())

  def metadata(self) -> dict:
    return {"entropy_nats_per_token": self.entropy_rate(), "vocab_size": self.vocab_size,
            **dataclasses.asdict(self)}


class Documents:
  """A random-access source of one split: record d is {"tokens": int32 (doc_len,)}.

  Pickles as its chain and split (for grain worker processes).
  """

  def __init__(self, chain: Chain, split: str):
    if split not in SPLITS:
      raise ValueError(f"synthetic: no split {split!r}; splits are {', '.join(SPLITS)}")
    self.chain, self.split = chain, split
    succ, prob = chain.transitions()
    self._succ = succ.tolist()
    self._cum = np.cumsum(prob, axis=1).tolist()
    for row in self._cum:
      row[-1] = 1.0  # so that u in [0, 1) always finds a successor
    self._first = np.cumsum(chain.stationary()).tolist()
    self._first[-1] = 1.0

  def __reduce__(self):
    return Documents, (self.chain, self.split)

  def __len__(self) -> int:
    return self.chain.train_docs if self.split == "train" else self.chain.validation_docs

  def __getitem__(self, d: int) -> dict:
    if not 0 <= d < len(self):
      raise IndexError(f"synthetic {self.split} has {len(self)} documents, asked for {d}")
    u = np.random.default_rng((self.chain.seed, SPLITS[self.split], d)).random(self.chain.doc_len)
    u = u.tolist()
    state = bisect.bisect_right(self._first, u[0])
    out = [state]
    succ, cum = self._succ, self._cum
    for x in u[1:]:
      state = succ[state][bisect.bisect_right(cum[state], x)]
      out.append(state)
    return {"tokens": np.asarray(out, np.int32) + FIRST_ID}

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def parse(arg: str) -> Chain:
  """'states=512,branching=16' -> Chain(states=512, branching=16); '' -> the defaults."""
  fields = {f.name for f in dataclasses.fields(Chain)}
  kwargs = {}
  for item in filter(None, (a.strip() for a in arg.split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in fields or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"synthetic({arg}): expected key=integer with keys "
                       f"{', '.join(sorted(fields))}, got {item!r}")
    kwargs[key] = int(value)
  return Chain(**kwargs)
