"""One params-vs-masks check: every entry point gives the same message, naming the path."""

import jax.numpy as jnp
import pytest

import jaxprune
from jaxprune import export

PARAMS = {"a": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}, "b": jnp.ones((3, 2))}
MISSING = {"a": {"kernel": jnp.ones((4, 3), bool), "bias": jnp.ones((), bool)}}
RENAMED = {**MISSING, "c": jnp.ones((3, 2), bool)}
SHAPE = {**MISSING, "b": jnp.ones((2, 3), bool)}


def _checks():
  yield "", lambda m: jaxprune.apply_masks(PARAMS, m)
  yield "", lambda m: jaxprune.check_masks(PARAMS, m)
  yield "fixed: ", lambda m: jaxprune.fixed(masks=m).init(PARAMS)
  yield "flops: ", lambda m: jaxprune.flops(lambda p, x: x @ p["b"], PARAMS, m, jnp.ones((1, 3)))
  yield "", lambda m: export.to_bcoo(PARAMS, m)


@pytest.mark.parametrize("prefix,check", list(_checks()))
def test_structure_mismatch_has_one_message_naming_the_path(prefix, check):
  with pytest.raises(ValueError, match=f"^{prefix}masks do not match params: only params have 'b'"):
    check(MISSING)
  with pytest.raises(ValueError, match=f"^{prefix}masks do not match params: params have 'b' "):
    check(RENAMED)


@pytest.mark.parametrize("prefix,check", list(_checks())[:4])
def test_shape_mismatch_has_one_message_naming_the_path(prefix, check):
  with pytest.raises(
    ValueError,
    match=rf"^{prefix}masks do not match params at 'b': mask shape \(2, 3\) vs parameter shape",
  ):
    check(SHAPE)


def test_compact_names_the_path_in_the_same_words():
  params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}}
  with pytest.raises(
    ValueError, match="^compact: masks do not match params: params have .Dense_0/bias."
  ):
    jaxprune.compact.compact(params, {"Dense_0": {"kernel": jnp.ones((4, 3), bool)}})
