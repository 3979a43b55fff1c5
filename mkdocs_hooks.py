"""mkdocs hooks: the API reference from ``__all__``, and ``results/`` files in the site.

* A line ``<!-- api: MODULE -->`` in a page becomes one ``::: MODULE.NAME``
  mkdocstrings directive per name in ``MODULE.__all__`` (in that order), so a
  name added to ``__all__`` is documented without editing the page.
* Plots and data live in ``results/`` at the repository root, next to the
  code that writes them; pages link them with their repository-relative path
  (``../../results/x.png`` from ``docs/results/page.md``, which also works on a
  code host). The hook copies ``results/`` into the site and rewrites those
  links to the copies.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import subprocess
import sys

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.abspath(__file__))
RESULTS = "results"
API = re.compile(r"^<!-- api: ([\w.]+) -->$", re.M)
LINK = re.compile(r"(\]\()([^)\s]+)")
CODE = re.compile(r"`[^`\n]+`")
ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|obj|exc):(?=<code)")
TILDE = re.compile(r"<code>~(?:\w+\.)*(\w+)</code>")  # Sphinx's ~a.b.c shows c


_TARGETS = r"""
import importlib, json, sys, types
out = {}
for module in sys.argv[1:]:
  mod = importlib.import_module(module)
  rows = []
  for name in mod.__all__:
    obj, public = getattr(mod, name), f"{module}.{name}"
    target = public
    if not isinstance(obj, types.ModuleType) and public in sys.modules:
      target = f"{obj.__module__}.{obj.__qualname__}"
    rows.append([name, target])
  out[module] = rows
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def api_targets(module: str) -> tuple:
  """``(name, documented path)`` for every name in ``module.__all__``, in order.

  The documented path is the public one, except where a function or class
  shadows a submodule of the same name (``jaxprune.flops`` the function, not
  the module): there it is the object's defining path, shown under the public
  name. Read in a subprocess: importing the package into the mkdocs process
  changes what mkdocstrings renders for its submodules.
  """
  out = subprocess.run(
    [sys.executable, "-c", _TARGETS, module],
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  return tuple(tuple(row) for row in json.loads(out.splitlines()[-1])[module])


def api_markdown(module: str, sections: tuple = ()) -> str:
  """mkdocstrings directives for every name in ``module.__all__``.

  A submodule that has its own section (its name in ``sections``) is shown
  here without its members.
  """
  out = []
  for name, target in api_targets(module):
    public = f"{module}.{name}"
    options = [f'heading: "{public}"'] if target != public else []
    options += ["members: false"] if target in sections else []
    block = "".join(f"\n      {o}" for o in options)
    out.append(f"::: {target}" + (f"\n    options:{block}" if block else "") + "\n")
  return "\n".join(out)


def on_files(files, config):
  for folder, _, names in os.walk(os.path.join(ROOT, RESULTS)):
    for name in sorted(names):
      if name.endswith(".md"):
        continue  # a table a script wrote, not a page of the site
      rel = os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
      if files.get_file_from_path(rel) is None:
        files.append(File(rel, ROOT, config["site_dir"], config["use_directory_urls"]))
  return files


def _rewrite_results_link(match, page_dir: str) -> str:
  target = match.group(2)
  if "://" in target or target.startswith("#"):
    return match.group(0)
  resolved = posixpath.normpath(posixpath.join("docs", page_dir, target))
  if not resolved.startswith(RESULTS + "/"):
    return match.group(0)
  return match.group(1) + posixpath.relpath(resolved, page_dir or ".")


def unescape_table_code(markdown: str) -> str:
  """``\\|`` inside code spans of table rows becomes ``|``.

  A code host's tables need the pipe in a code span escaped; Python-Markdown
  keeps the backslash there, and needs no escape.
  """

  def row(line: str) -> str:
    if not line.lstrip().startswith("|"):
      return line
    return CODE.sub(lambda m: m.group(0).replace("\\|", "|"), line)

  return "\n".join(row(line) for line in markdown.split("\n"))


def on_page_markdown(markdown, page, config, files):
  sections = tuple(API.findall(markdown))
  markdown = API.sub(lambda m: api_markdown(m.group(1), sections), markdown)
  markdown = unescape_table_code(markdown)
  page_dir = posixpath.dirname(page.file.src_uri)
  return LINK.sub(lambda m: _rewrite_results_link(m, page_dir), markdown)


def on_page_content(html, page, config, files):
  """Drops the Sphinx roles (``:func:``) that some docstrings put before code."""
  return TILDE.sub(r"<code>\1</code>", ROLE.sub("", html))
