"""Masks follow their parameters' sharding; mask updates never gather a parameter.

Neuron/channel types rank whole units, so their per-unit norms (one float per
unit) are gathered; the parameters themselves never are.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import math, re
    import jax, jax.numpy as jnp, numpy as np, optax, jaxprune
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("model",))
    spec = NamedSharding(mesh, P(None, "model"))
    params = {"w": jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (64, 32)), spec),
              "b": jnp.zeros(32)}
    GATHER = r"= \\w+\\[([\\d,]*)\\][^=]*all-gather\\("

    def gathered_sizes(hlo):
        return [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(GATHER, hlo)]

    # Control: the pattern finds the gather of a function that replicates the parameter.
    replicate = jax.jit(lambda w: w * 2.0, out_shardings=NamedSharding(mesh, P()))
    control = gathered_sizes(replicate.lower(params["w"]).compile().as_text())
    assert 64 * 32 in control, control
    cases = [("rigl", {}), ("set", {}), ("static", {}), ("gradual_magnitude", {}),
             ("rigl", {"sparsity_type": "2:4"}), ("gradual_magnitude", {"sparsity_type": "neuron"})]
    for name, extra in cases:
        algo = jaxprune.create(name, sparsity=0.9, end_step=100, update_every=2, **extra)
        tx = jaxprune.sparsify(optax.adam(1e-2), algo)
        state = jax.jit(tx.init)(params)
        assert state.masks["w"].sharding.is_equivalent_to(spec, 2), (name, state.masks["w"].sharding)

        @jax.jit
        def step(p, s):
            g = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"]) * p["b"].sum() + p["w"] ** 2))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = params
        for _ in range(5):
            p, state = step(p, state)
        assert state.masks["w"].sharding.is_equivalent_to(spec, 2), (name, state.masks["w"].sharding)
        if name != "gradual_magnitude" and not extra:
            assert int(state.masks["w"].sum()) == 64 * 32 - int(0.9 * 64 * 32), name
        hlo = step.lower(p, state).compile().as_text()
        # Never a parameter: at most the per-unit norms that rank neurons (32 floats).
        gathered = gathered_sizes(hlo)
        if extra.get("sparsity_type") == "neuron":
            assert all(n <= 32 for n in gathered), (name, extra, gathered)
        else:
            assert not gathered, (name, extra, gathered)
        if extra.get("sparsity_type") == "2:4":
            m = np.asarray(state.masks["w"]).reshape(16, 4, 32).sum(axis=1)
            assert (m == 2).all()
    print("OK")
""")


def test_masks_sharded_like_params_without_gathers():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("OK")
