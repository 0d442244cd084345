"""Every shipped experiment file loads and passes validation as written."""

import glob
import importlib.util
import os

import pytest

from fmjax.nn.sharding import MESH_AXES
from fmjax.validate import validate
from fmjax import config as config_lib
from fmjax.scaling import sizing

EXPERIMENTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_file_validates(path):
  cfg = sizing.resolve(load(path).get_config())
  # A file that fixes its mesh is checked on that many devices, others on the test's 8.
  sizes = [cfg.mesh[a] for a in MESH_AXES]
  n = 1
  for s in sizes:
    n *= max(s, 1)
  devices = n if -1 not in sizes else 8
  validate(cfg, devices)
  assert cfg.train.steps >= 1


def test_there_are_experiments():
  assert len(EXPERIMENTS) >= 5
