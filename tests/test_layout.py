"""The package layout: no import cycles, and each package imports only the layers below it.

Read from the source with ast, so the test needs no imports of its own and sees
imports inside functions as well as those at the top.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fmjax")

# What each part of fmjax may import (besides itself). The commands at the top
# (main, sample, bench, ...) and fmjax.validate may import anything.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "nn": {"errors"},
    "data": {"errors"},
    "runtime": {"errors", "config"},
    "hf": {"errors", "config", "nn", "data"},
    "posttrain": {"errors", "config", "nn", "data", "hf", "runtime"},
    "evaluation": {"errors", "config", "nn", "data", "hf", "posttrain", "runtime"},
    "train": {"errors", "config", "nn", "data", "hf", "posttrain", "runtime", "evaluation"},
    "scaling": {"errors", "config", "nn", "train", "evaluation"},
}


def module_name(path: str, root: str = ROOT) -> str:
  rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  """{module: the fmjax modules it imports}, over every .py file under `root`."""
  files = {module_name(os.path.join(d, f), root): os.path.join(d, f)
           for d, _, names in os.walk(root) for f in names if f.endswith(".py")}

  def resolve(name):  # "fmjax.nn.model.forward" -> "fmjax.nn.model"
    while name and name not in files:
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for mod, path in files.items():
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                          ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" for a in node.names]  # a module, or a name in `base`
      else:
        continue
      # the package itself ("from fmjax import x" names it too) is no dependency
      targets |= {resolve(n) for n in names if n.split(".")[0] == "fmjax"} - {"", "fmjax", mod}
    graph[mod] = targets
  return graph


def cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def part(module: str) -> str:
  """'fmjax.nn.model' -> 'nn'; 'fmjax.main' -> 'main'."""
  return module.split(".")[1] if "." in module else ""


def breaches(graph) -> list[str]:
  return [f"{m} imports {t}" for m, targets in sorted(graph.items()) if part(m) in ALLOWED
          for t in sorted(targets) if part(t) != part(m) and part(t) not in ALLOWED[part(m)]]


def test_fmjax_has_no_import_cycles():
  assert cycles(import_graph()) == []


def test_each_package_imports_only_the_layers_below_it():
  assert breaches(import_graph()) == []


def test_every_package_is_placed_in_a_layer():
  packages = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
  assert packages <= set(ALLOWED)


def unexplained_inner_imports(root: str = ROOT) -> list[str]:
  """Imports inside functions with no comment saying why: on the line itself, or on a
  comment line just above the run of imports (and blank lines) it belongs to."""
  out = []
  for d, _, names in os.walk(root):
    for f in sorted(n for n in names if n.endswith(".py")):
      path = os.path.join(d, f)
      lines = open(path).read().split("\n")
      for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
          continue
        for node in ast.walk(fn):
          if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
          i = node.lineno - 1
          said = "#" in lines[i]
          while not said and i > 0:
            i -= 1
            above = lines[i].strip()
            said = above.startswith("#")
            if not (said or not above or above.startswith(("import ", "from "))):
              break
          if not said:
            out.append(f"{os.path.relpath(path, root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
  return sorted(set(out))


def test_imports_inside_functions_say_why():
  assert unexplained_inner_imports() == []


@pytest.fixture
def tree(tmp_path):
  """A small package `fmjax` with a cycle a -> b -> a and a breach nn -> train."""
  pkg = tmp_path / "fmjax"
  for sub in ("nn", "train"):
    (pkg / sub).mkdir(parents=True)
    (pkg / sub / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from fmjax import b\n")
  (pkg / "b.py").write_text("def f():\n  from fmjax.a import x\n")
  (pkg / "nn" / "model.py").write_text("from fmjax.train.loop import run\n")
  (pkg / "train" / "loop.py").write_text("from . import helpers\nfrom ..nn import model\n")
  (pkg / "train" / "helpers.py").write_text("")
  return str(pkg)


def test_the_checks_find_a_cycle_and_a_breach(tree):
  graph = import_graph(tree)
  assert graph["fmjax.train.loop"] == {"fmjax.train.helpers", "fmjax.nn.model"}
  assert ["fmjax.a", "fmjax.b"] in cycles(graph)
  assert ["fmjax.nn.model", "fmjax.train.loop"] in cycles(graph)
  assert breaches(graph) == ["fmjax.nn.model imports fmjax.train.loop"]
  assert unexplained_inner_imports(tree) == ["b.py:2: from fmjax.a import x"]
