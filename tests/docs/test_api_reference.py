"""The docs site builds strictly, and its API reference documents every public name."""

import html
import os
import pathlib
import re
import subprocess
import sys

import griffe

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import mkdocs_hooks  # noqa: E402

MODULES = ("jaxprune", "jaxprune.oneshot", "jaxprune.shrink", "jaxprune.qat")


def test_api_targets_cover_all_of_every_module():
  import jaxprune
  import jaxprune.oneshot
  import jaxprune.qat
  import jaxprune.shrink

  for module, mod in zip(MODULES, (jaxprune, jaxprune.oneshot, jaxprune.shrink, jaxprune.qat)):
    names = [name for name, _ in mkdocs_hooks.api_targets(module)]
    assert names == list(mod.__all__)
  targets = dict(mkdocs_hooks.api_targets("jaxprune"))
  # The function jaxprune.flops shadows the module jaxprune.flops: the function is documented.
  assert targets["flops"] == "jaxprune.flops.flops"
  assert targets["create"] == "jaxprune.create"


def test_every_public_name_has_a_docstring():
  package = griffe.load("jaxprune", search_paths=[str(ROOT)])
  missing = []
  for module in MODULES:
    for name, target in mkdocs_hooks.api_targets(module):
      obj = package[target.removeprefix("jaxprune.")]
      if obj.is_alias:
        obj = obj.final_target
      if obj.docstring is None or not obj.docstring.value.strip():
        missing.append(f"{module}.{name}")
  assert not missing, f"public names without a docstring: {missing}"


def test_site_builds_strictly_with_every_public_name(tmp_path):
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  out = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  page = (tmp_path / "api" / "index.html").read_text()
  for module in MODULES:
    for name, target in mkdocs_hooks.api_targets(module):
      m = re.search(f'id="{re.escape(target)}"', page)
      assert m, f"{module}.{name} ({target}) is not in the API reference"
      section = page[m.end() : m.end() + 20000]
      heading = re.search(r"</h\d>", section)
      assert html.escape(f"{module}.{name}") in section[: heading.start()], f"{module}.{name}"
      body = re.sub(r"<[^>]+>", " ", section[heading.end() :].split("doc-heading", 1)[0])
      assert len(body.split()) >= 3, f"{module}.{name} is shown without its docstring"
  # Plots that result pages link from results/ are in the site.
  assert (tmp_path / "results" / "accuracy_vs_sparsity.png").is_file()
