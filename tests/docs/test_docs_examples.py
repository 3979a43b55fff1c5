"""Runs every ```python block of README.md and docs/**/*.md.

Blocks of one page run in order in one namespace (as a reader would paste
them into one session). A block whose preceding line is
``<!-- test: slow -->`` runs only in the slow tier (``pytest -m slow``); one
preceded by ``<!-- test: skip -->`` is never run. Other fences (```bash,
plain ```) are not run. Pages are found by globbing, so a new page is tested
as soon as it exists.
"""

from __future__ import annotations

import pathlib
import re
import traceback
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!--\s*test:\s*(\S+)\s*-->$")
MARKS = ("slow", "skip")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
PYTHON = ("python", "py", "python3")


class Block(NamedTuple):
  line: int  # 1-based line of the first code line
  code: str
  mark: str | None  # None, "slow" or "skip"


def blocks(text: str, name: str = "<page>") -> list[Block]:
  """The fenced code blocks of a markdown page that are Python, with marks."""
  lines = text.splitlines()
  out, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
    start = i + 1
    j = start
    while j < len(lines) and not lines[j].strip().startswith(fence):
      j += 1
    if j == len(lines):
      raise ValueError(f"{name}:{i + 1}: unclosed code fence")
    if lang in PYTHON:
      k = i - 1
      while k >= 0 and not lines[k].strip():
        k -= 1
      mark = None
      if k >= 0 and (mm := MARKER.match(lines[k].strip())):
        mark = mm.group(1)
        if mark not in MARKS:
          raise ValueError(f"{name}:{k + 1}: unknown test mark {mark!r}; use one of {MARKS}")
      body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start:j]]
      out.append(Block(start + 1, "\n".join(body) + "\n", mark))
    i = j + 1
  return out


def pages() -> list[pathlib.Path]:
  return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def run_page(path: pathlib.Path, tiers: tuple, root: pathlib.Path = ROOT) -> int:
  """Executes the page's blocks whose mark is in ``tiers``; returns how many ran."""
  rel = str(path.relative_to(root))
  namespace = {"__name__": "__main__", "__file__": rel}
  ran = 0
  for block in blocks(path.read_text(), rel):
    if block.mark not in tiers:
      continue
    # Pad with newlines so that tracebacks give the page's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, rel, "exec")
    exec(code, namespace)
    ran += 1
  return ran


def _params():
  out = []
  for path in pages():
    rel = str(path.relative_to(ROOT))
    marks = {b.mark for b in blocks(path.read_text(), rel)}
    if None in marks:
      out.append(pytest.param(path, (None,), id=rel))
    if "slow" in marks:
      out.append(pytest.param(path, (None, "slow"), id=f"{rel}[slow]", marks=pytest.mark.slow))
  return out


@pytest.mark.parametrize("path, tiers", _params())
def test_page_examples_run(path, tiers, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # whatever a block writes lands in a scratch directory
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.syspath_prepend(str(ROOT))
  assert run_page(path, tiers) > 0


def test_readme_quick_start_is_collected():
  found = blocks((ROOT / "README.md").read_text())
  assert any(b.mark is None and "jaxprune.sparsify" in b.code for b in found)


def test_block_parser_marks_and_languages():
  page = "\n".join(
    [
      "text",
      "```python",
      "a = 1",
      "```",
      "<!-- test: slow -->",
      "",
      "```python",
      "b = a",
      "```",
      "```bash",
      "echo no",
      "```",
      "<!-- test: skip -->",
      "```py",
      "raise SystemExit",
      "```",
      "- item",
      "  ```python",
      "  c = 2",
      "  ```",
    ]
  )
  found = blocks(page)
  assert [(b.line, b.code, b.mark) for b in found] == [
    (3, "a = 1\n", None),
    (8, "b = a\n", "slow"),
    (15, "raise SystemExit\n", "skip"),
    (19, "c = 2\n", None),
  ]


def test_block_parser_rejects_unknown_mark_and_unclosed_fence():
  with pytest.raises(ValueError, match="unknown test mark 'slwo'"):
    blocks("<!-- test: slwo -->\n```python\nx = 1\n```\n", "p.md")
  with pytest.raises(ValueError, match="p.md:1: unclosed"):
    blocks("```python\nx = 1\n", "p.md")


def test_failing_block_reports_page_line(tmp_path):
  page = tmp_path / "docs" / "p.md"
  page.parent.mkdir()
  page.write_text("# t\n\n```python\nx = 1\ny = x / 0\n```\n")
  with pytest.raises(ZeroDivisionError) as info:
    run_page(page, (None,), root=tmp_path)
  frames = [f for f in traceback.extract_tb(info.value.__traceback__) if f.filename == "docs/p.md"]
  assert frames and frames[-1].lineno == 5


def test_relative_links_outside_the_site_resolve():
  # docs/ links are checked by `mkdocs build --strict`; these two pages are not in the site.
  for name in ("README.md", "RESULTS.md"):
    text = (ROOT / name).read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, name
    for target in targets:
      if "://" in target or target.startswith("#"):
        continue
      path = (ROOT / target.split("#")[0]).resolve()
      assert path.exists(), f"{name} links to {target}, which does not exist"
