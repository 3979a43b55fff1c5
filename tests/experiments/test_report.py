"""The results pages' generated tables match the data in results/."""

import json
import os
import sys

import pytest

from experiments import report

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
import mkdocs_hooks  # noqa: E402


def test_committed_results_pages_are_up_to_date(capsys):
  assert report.main(["--check"]) == 0, capsys.readouterr().out


def test_every_table_is_on_a_page():
  text = "".join(open(p).read() for p in report.pages())
  used = {m.group(2) for m in report.REGION.finditer(text)}
  assert used == set(report.TABLES)


def test_render_rewrites_a_stale_region_and_rejects_unknown_names():
  page = "a\n<!-- generated: lenet-sweep -->\nold table\n<!-- /generated -->\nb\n"
  out = report.render(page)
  assert "old table" not in out
  assert "| gradual_magnitude | 88.18 ± 0.22 (3) |" in out
  assert out.startswith("a\n") and out.endswith("<!-- /generated -->\nb\n")
  with pytest.raises(ValueError, match="p.md: unknown generated table 'nope'"):
    report.render("<!-- generated: nope -->\n<!-- /generated -->\n", "p.md")


def test_check_names_a_stale_page_and_changes_nothing(tmp_path, monkeypatch, capsys):
  page = tmp_path / "study.md"
  text = "<!-- generated: rescale -->\nstale\n<!-- /generated -->\n"
  page.write_text(text)
  monkeypatch.setattr(report, "PAGES", str(tmp_path))
  assert report.main(["--check"]) == 1
  stale = json.loads(capsys.readouterr().out.splitlines()[-1])["stale"]
  assert stale == [os.path.relpath(page, report.ROOT)]
  assert page.read_text() == text
  assert report.main([]) == 0
  assert "| 98% | ERK, rescale_init |" in page.read_text()


def test_dataset_is_inferred_only_where_provable():
  fmnist = {"test_accuracy": 0.8123, "workdir": "a"}
  assert report.with_inferred_dataset([fmnist])[0]["dataset"] == "fashion_mnist"
  digits = {"test_accuracy": 290 / 297, "workdir": "b"}
  with pytest.raises(ValueError, match="b: no dataset recorded"):
    report.with_inferred_dataset([digits])
  recorded = {"test_accuracy": 0.5, "dataset": "digits"}
  assert report.with_inferred_dataset([recorded]) == [recorded]


class _Page:
  def __init__(self, src_uri):
    self.file = type("F", (), {"src_uri": src_uri})()


def test_site_hook_points_results_links_at_the_copied_files():
  md = "![a](../../results/x.png) [b](lenet_sweep.md) ![c](https://e.org/results/y.png)"
  out = mkdocs_hooks.on_page_markdown(md, _Page("results/toolbox.md"), {}, None)
  assert out == "![a](x.png) [b](lenet_sweep.md) ![c](https://e.org/results/y.png)"
  out = mkdocs_hooks.on_page_markdown("![a](../results/x.png)", _Page("index.md"), {}, None)
  assert out == "![a](results/x.png)"


def test_site_hook_unescapes_pipes_in_table_code_only():
  md = "| `a \\| b` | \\|w\\| |\ntext `x \\| y`"
  assert mkdocs_hooks.unescape_table_code(md) == "| `a | b` | \\|w\\| |\ntext `x \\| y`"
