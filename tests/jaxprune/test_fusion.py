"""The masking fuses with the inner optimizer's elementwise work.

Reads the compiled HLO (``jax.jit(f).lower(...).compile().as_text()``) of a
training step with Adam, dense and through :func:`jaxprune.sparsify`, and
compares, over the instructions of the entry computation that write an array
shaped like a pruned kernel, how many there are and which float arrays they
read. Masking adds only bool mask operands to the fusions the dense step has
anyway: no extra pass over the parameters, gradients or optimizer moments. The
checks use instruction shapes only, not fusion names, so they survive XLA's
renaming; an unfused ``where`` or a recomputed moment update makes them fail.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxprune

SHAPES = {"w1": (96, 64), "w2": (64, 48)}
_DEF = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[([\d,]*)\]\{?[\d,]*\}? ([\w\-]+)\((.*)$")


def _entry(hlo):
  return hlo[hlo.index("\nENTRY") :].splitlines()


def _kernel_writes(hlo, shape):
  """``(op, f32 operand count, pred operand count)`` for each entry instruction
  writing an f32 array of ``shape`` (layout and fusion names ignored)."""
  shapes, out = {}, []
  dims = ",".join(map(str, shape))
  for line in _entry(hlo):
    m = _DEF.match(line)
    if not m:
      continue
    name, dtype, d, op, rest = m.groups()
    shapes[name] = (dtype, d)
    if dtype != "f32" or d != dims or op in ("parameter", "bitcast", "copy", "get-tuple-element"):
      continue
    args = re.findall(r"%[\w.\-]+", rest.split(")", 1)[0])
    kinds = [shapes.get(a, ("?", ""))[0] for a in args if shapes.get(a, ("", ""))[1] == dims]
    out.append((op, kinds.count("f32"), kinds.count("pred")))
  return sorted(out)


def _compiled_step(tx):
  params = {
    k: jax.random.normal(jax.random.PRNGKey(i), s) * 0.1 for i, (k, s) in enumerate(SHAPES.items())
  }
  x = jax.random.normal(jax.random.PRNGKey(9), (32, 96))

  def loss(p):
    return jnp.mean((jax.nn.relu(x @ p["w1"]) @ p["w2"]) ** 2)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return step.lower(params, tx.init(params)).compile().as_text()


@pytest.mark.parametrize(
  "algorithm",
  [
    dict(name="static", sparsity=0.9),
    # Non-update steps of a mask-changing algorithm: the update is a while_loop of zero trips.
    dict(name="rigl", sparsity=0.9, update_every=10**8, end_step=10**9),
  ],
  ids=["static", "rigl_non_update"],
)
def test_masked_adam_step_adds_no_pass_over_float_arrays(algorithm):
  dense = _compiled_step(optax.adam(1e-3))
  algo = jaxprune.create(algorithm.pop("name"), distribution="uniform", **algorithm)
  sparse = _compiled_step(jaxprune.sparsify(optax.adam(1e-3), algo))
  for shape in SHAPES.values():
    d, s = _kernel_writes(dense, shape), _kernel_writes(sparse, shape)
    assert len(d) >= 3, d  # mu, nu and the parameter update at least
    # Same instructions, reading the same float arrays; masks only add bool operands.
    assert [(op, f32) for op, f32, _ in s] == [(op, f32) for op, f32, _ in d], (shape, d, s)
    assert 0 < sum(pred for _, _, pred in s) <= len(s), (shape, s)


def _kernel_copies(hlo, shape):
  """Entry-computation ``copy`` instructions writing an array of ``shape``, any dtype."""
  dims = ",".join(map(str, shape))
  return [
    m.group(2)
    for m in map(_DEF.match, _entry(hlo))
    if m and m.group(3) == dims and m.group(4) == "copy"
  ]


@pytest.mark.parametrize("name", ["set", "rigl", "gradual_magnitude"])
def test_non_update_step_copies_no_more_than_static(name):
  """The mask update of a mask-changing algorithm runs in place (a loop of zero
  or one trip): a step without a mask update copies no more kernel-shaped
  arrays than a ``static`` step, never a float array (gradients, params), and
  passes none through an entry-level ``conditional`` (whose identity branch
  would copy it on every step)."""
  kw = dict(sparsity=0.9, distribution="uniform")
  static = _compiled_step(jaxprune.sparsify(optax.adam(1e-3), jaxprune.create("static", **kw)))
  if name == "gradual_magnitude":
    kw.update(initial_sparsity=0.0, start_step=10**8, end_step=10**9, update_every=10**8)
  else:
    kw.update(update_every=10**8, end_step=10**9)
  sparse = _compiled_step(jaxprune.sparsify(optax.adam(1e-3), jaxprune.create(name, **kw)))
  for shape in SHAPES.values():
    s, d = _kernel_copies(sparse, shape), _kernel_copies(static, shape)
    assert "f32" not in s, (shape, s)
    assert len(s) <= len(d), (shape, s, d)
    dims = ",".join(map(str, shape))
    conds = [line for line in _entry(sparse) if " conditional(" in line]
    assert not [c for c in conds if f"[{dims}]" in c.split(" conditional(")[0]], (shape, conds)
