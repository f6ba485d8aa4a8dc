"""The package's layering, read from the source: no module imports a higher layer, and
no import cycle, counting imports inside functions too (README's layout section)."""
import ast
import os

from absl.testing import absltest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "jaxdissect")

# Bottom to top; a module may import its own layer and those below it.
LAYERS = (
    # Package __init__ files import nothing; "synthetic" is the empty package.
    ("foundations", ("errors", "entry", "registry", "resources", "config", "sharding", "topk",
                     "likelihood", "similarity", "linear", "visibility", "kernels", "results",
                     "tiny_models", "synthetic")),
    ("data and scoring math", ("data.*", "synthetic.world", "streaming", "store")),
    ("models", ("models.*",)),
    ("computation", ("activations", "labeling", "images")),
    ("analysis", ("trust", "stability", "explanations", "compositional", "sanity",
                  "metrics", "probe_pass", "report", "rundir")),
    ("entry points", ("dissect", "cli", "evaluate", "compare", "applications.*",
                      "synthetic.train", "synthetic.planted", "synthetic.benchmark")),
)


def package_modules() -> dict[str, str]:
  """{dotted name relative to the package: file path} of every module."""
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        relative = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        modules[relative.removesuffix(".__init__").removesuffix("__init__")] = path
  return modules


def imports_of(path: str, modules) -> set[str]:
  """Package modules that `path` imports anywhere in its body."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and \
        node.module.startswith("jaxdissect"):
      base = node.module[len("jaxdissect"):].lstrip(".")
      names = [f"{base}.{a.name}".lstrip(".") for a in node.names] + [base]
    elif isinstance(node, ast.Import):
      names = [a.name[len("jaxdissect"):].lstrip(".") for a in node.names
               if a.name.startswith("jaxdissect")]
    for name in names:
      if name in modules and name:
        found.add(name)
  return found


def layer_of(module: str) -> int:
  for index, (_, patterns) in enumerate(LAYERS):
    for pattern in patterns:
      if module == pattern or (pattern.endswith(".*") and
                               module.startswith(pattern[:-1])) or \
          (pattern.endswith(".*") and module == pattern[:-2]):
        return index
  raise KeyError(module)


class LayeringTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.modules = package_modules()
    self.graph = {m: imports_of(p, self.modules) - {m} for m, p in self.modules.items()
                  if m}

  def test_every_module_has_a_layer(self):
    for module in self.graph:
      self.assertIsNotNone(layer_of(module), module)

  def test_no_module_imports_a_higher_layer(self):
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in self.graph.items() for d in deps
              if layer_of(d) > layer_of(m)]
    self.assertEmpty(upward, "\n".join(upward))

  def test_no_import_cycle(self):
    state, stack = {}, []

    def visit(module):
      state[module] = "open"
      stack.append(module)
      for dep in sorted(self.graph.get(module, ())):
        if state.get(dep) == "open":
          self.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
        if dep not in state:
          visit(dep)
      stack.pop()
      state[module] = "done"

    for module in sorted(self.graph):
      if module not in state:
        visit(module)

  def test_the_checker_sees_a_planted_cycle_and_an_upward_import(self):
    graph = {"labeling": {"dissect"}, "dissect": {"labeling"}}
    self.assertGreater(layer_of("dissect"), layer_of("labeling"))
    self.assertTrue(any(layer_of(d) > layer_of(m) for m, ds in graph.items() for d in ds))
    tmp = self.create_tempfile("x.py", "def f():\n  from jaxdissect import dissect\n")
    self.assertEqual(imports_of(tmp.full_path, self.modules), {"dissect"})


if __name__ == "__main__":
  absltest.main()
