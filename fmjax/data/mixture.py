"""Weighted mixtures of sources, and curricula that change the weights over steps.

`data.mixture` lists the sources and their weights, comma-separated:

  "kjv"                                   one source
  "kjv:0.7, synthetic:0.3"                two, 70% and 30% of the train tokens
  "kjv:3, web=arrayrecord(/data/web-{split}.array_record-*):1"
                                          weights are normalised; NAME= names a source

A source's name is its NAME= if given, else its spec ("kjv", "synthetic").
`data.curriculum` changes the weights from given steps on:

  "500: kjv:0.5, web:0.5; 900: web:1"     from step 500 half and half, from 900 web only

Weights are fractions of packed rows, hence of tokens: each source is packed
into rows of its own, and grain's `IterDataset.mix` interleaves the rows
deterministically in proportion to the weights. A source that a stage leaves
out keeps its position and carries on where it stopped when a later stage
brings it back.
"""

from __future__ import annotations

import dataclasses

import grain

from fmjax.data import sources


@dataclasses.dataclass(frozen=True)
class Component:
  name: str
  spec: str
  weight: float


def parse_mixture(text: str) -> list[Component]:
  """'kjv:0.7, synthetic:0.3' -> [Component('kjv', 'kjv', 0.7), ...]. Raises ValueError."""
  components = []
  for entry in sources.split_top_level(text, ","):
    entry = entry.strip()
    if not entry:
      raise ValueError(f"empty entry in {text!r}")
    weight = _weight(entry)
    name = spec = entry if weight is None else entry[:entry.rindex(":")].strip()
    head, eq, tail = spec.partition("=")
    if eq and head.strip().isidentifier() and "(" not in head:
      name, spec = head.strip(), tail.strip()
    sources.parse(spec)  # raises on an unknown source or bad arguments
    components.append(Component(name, spec, 1.0 if weight is None else weight))
  names = [c.name for c in components]
  duplicate = next((n for n in names if names.count(n) > 1), None)
  if duplicate:
    raise ValueError(f"source {duplicate!r} appears twice; give one a name with NAME=SPEC")
  return components


def _weight(entry: str) -> float | None:
  """The number after the entry's last top-level ':', or None if it has none."""
  parts = sources.split_top_level(entry, ":")
  if len(parts) == 1:
    return None
  try:
    weight = float(parts[-1])
  except ValueError:
    raise ValueError(f"{entry!r}: the weight after the last ':' must be a number") from None
  if not weight > 0:
    raise ValueError(f"{entry!r}: weights must be > 0")
  return weight


def parse_curriculum(text: str, components: list[Component]) -> list[tuple[int, dict]]:
  """Stages [(first_step, {name: weight})], starting with the mixture's own weights at 0.

  Weights are normalised to sum to 1; sources a stage leaves out get no rows.
  """
  names = [c.name for c in components]
  stages = [(0, _normalised({c.name: c.weight for c in components}))]
  for stage in filter(None, (s.strip() for s in text.split(";"))):
    step, colon, rest = stage.partition(":")
    if not colon or not step.strip().isdigit():
      raise ValueError(f"curriculum stage {stage!r} must look like 'STEP: name:weight, ...'")
    step = int(step)
    if step <= stages[-1][0]:
      raise ValueError(f"curriculum steps must increase and be > 0; got {step} after "
                       f"{stages[-1][0]}")
    weights = {}
    for entry in filter(None, (e.strip() for e in rest.split(","))):
      name, colon, w = entry.rpartition(":")
      name = name.strip()
      if not colon or name not in names:
        raise ValueError(f"curriculum entry {entry!r} must be name:weight with a name from "
                         f"data.mixture ({', '.join(names)})")
      try:
        weights[name] = float(w)
      except ValueError:
        raise ValueError(f"curriculum entry {entry!r}: weight must be a number") from None
      if weights[name] < 0:
        raise ValueError(f"curriculum entry {entry!r}: weight must be >= 0")
    if not sum(weights.values()) > 0:
      raise ValueError(f"curriculum stage {stage!r} gives every source weight 0")
    stages.append((step, _normalised(weights)))
  return stages


def _normalised(weights: dict) -> dict:
  total = sum(weights.values())
  return {n: w / total for n, w in weights.items() if w > 0}


def from_config(d) -> tuple[list[Component], list[tuple[int, dict]]]:
  """(components, stages) of a config's data section. Raises ValueError."""
  components = parse_mixture(d.mixture)
  return components, parse_curriculum(d.curriculum, components)


class ScheduledMix(grain.IterDataset):
  """Rows of several endless datasets, mixed with weights that change at given rows.

  `stages` is [(first_row, {name: weight > 0})], first_row increasing from 0.
  Each stage is a grain `IterDataset.mix` of its sources. At a stage boundary
  the next stage's mix starts its sources from where they were; the state
  holds the row count, the current mix's state and the positions of sources
  the current stage leaves out.
  """

  def __init__(self, parents: dict[str, grain.IterDataset], stages):
    super().__init__(list(parents.values()))
    self._named = dict(parents)
    self._stages = [(int(r), dict(w)) for r, w in stages]

  def __iter__(self):
    return _ScheduledMixIterator(self._named, self._stages)


class _ScheduledMixIterator(grain.DatasetIterator):

  def __init__(self, parents, stages):
    super().__init__()
    self._sources, self._stages = parents, stages
    self._row, self._stage, self._mix, self._idle = 0, -1, None, {}

  def _stage_of(self, row: int) -> int:
    return max(k for k, (first, _) in enumerate(self._stages) if first <= row)

  def _enter(self, stage: int, positions: dict):
    """Starts `stage`'s mix with its sources at `positions` (name -> state); keeps the rest."""
    self.close()
    weights = self._stages[stage][1]
    mix = grain.IterDataset.mix({n: self._sources[n] for n in weights}, weights).__iter__()
    state = mix.get_state()
    state["parents"].update({n: positions[n] for n in weights if n in positions})
    mix.set_state(state)
    self._stage, self._mix = stage, mix
    self._idle = {n: s for n, s in positions.items() if n not in weights}

  def __next__(self):
    stage = self._stage_of(self._row)
    if stage != self._stage:
      positions = dict(self._idle)
      if self._mix is not None:
        positions.update(self._mix.get_state()["parents"])
      self._enter(stage, positions)
    row = next(self._mix)
    self._row += 1
    return row

  def get_state(self):
    if self._mix is None:
      self._enter(self._stage_of(self._row), dict(self._idle))
    return {"row": self._row, "stage": self._stage, "mix": self._mix.get_state(),
            "idle": self._idle}

  def set_state(self, state):
    self._row = state["row"]
    self._enter(state["stage"], state["idle"])
    self._mix.set_state(state["mix"])

  def close(self):
    if self._mix is not None and hasattr(self._mix, "close"):
      self._mix.close()
