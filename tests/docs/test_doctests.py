"""Every docstring example (``>>>``) in the jaxprune package runs as a doctest."""

import doctest
import importlib
import pkgutil

import pytest

import jaxprune


def _doctests():
  finder = doctest.DocTestFinder(exclude_empty=True)
  found = []
  for info in pkgutil.walk_packages(jaxprune.__path__, "jaxprune."):
    module = importlib.import_module(info.name)
    for test in finder.find(module, info.name):
      if test.examples and test.name.startswith(info.name):
        found.append(test)
  return sorted(found, key=lambda t: t.name)


DOCTESTS = _doctests()


def test_docstrings_have_examples():
  names = {t.name for t in DOCTESTS}
  assert {"jaxprune.algorithms.create", "jaxprune.topk.topk_mask"} <= names


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name)
def test_docstring_example(test):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  report = []
  result = runner.run(test, out=report.append)
  assert result.failed == 0, "".join(report)


def test_a_wrong_example_fails():
  parser = doctest.DocTestParser()
  wrong = parser.get_doctest(">>> 1 + 1\n3\n", {}, "wrong", "wrong.py", 0)
  report = []
  assert doctest.DocTestRunner().run(wrong, out=report.append).failed == 1
  assert "Expected:\n    3\nGot:\n    2" in "".join(report)
