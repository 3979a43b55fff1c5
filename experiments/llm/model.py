"""A LLaMA-family decoder in Flax Linen (Touvron et al. 2023, "LLaMA").

RMSNorm, rotary position embeddings (Su et al. 2021, RoFormer) in the
"rotate half" layout of Hugging Face checkpoints, grouped-query attention
(Ainslie et al. 2023), SwiGLU MLP (Shazeer 2020) and, optionally, tied input and
output embeddings. Kernels are Flax ``(in, out)``. Param names follow the
Hugging Face LLaMA names: ``embed_tokens``, ``layers_{i}/{input_layernorm,
self_attn/{q,k,v,o}_proj, post_attention_layernorm, mlp/{gate,up,down}_proj}``,
``norm`` (and ``lm_head`` when embeddings are not tied).

Blocks are applied one at a time by the one-shot driver: ``Block(cfg).apply(
{"params": params[f"layers_{i}"]}, x)``; :func:`embed` and :func:`head` are the two
ends of the model.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class Config(NamedTuple):
  vocab_size: int = 49152
  dim: int = 576
  n_layers: int = 30
  n_heads: int = 9
  n_kv_heads: int = 3
  hidden_dim: int = 1536
  rope_base: float = 100000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads


SMOLLM2_135M = Config()


class RMSNorm(nn.Module):
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


def rope(x, base: float):
  """Rotary embedding, "rotate half" layout, positions ``0..T-1``; x is (B, T, H, D)."""
  t, d = x.shape[1], x.shape[-1]
  inv = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
  ang = jnp.concatenate([ang, ang], axis=-1)[None, :, None, :]
  x1, x2 = x[..., : d // 2], x[..., d // 2 :]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * jnp.cos(ang) + rotated * jnp.sin(ang)


class Attention(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    b, t, _ = x.shape
    hd = c.head_dim
    dense = lambda f, name: nn.Dense(f, use_bias=False, name=name)
    q = dense(c.n_heads * hd, "q_proj")(x).reshape(b, t, c.n_heads, hd)
    k = dense(c.n_kv_heads * hd, "k_proj")(x).reshape(b, t, c.n_kv_heads, hd)
    v = dense(c.n_kv_heads * hd, "v_proj")(x).reshape(b, t, c.n_kv_heads, hd)
    q, k = rope(q, c.rope_base), rope(k, c.rope_base)
    groups = c.n_heads // c.n_kv_heads
    k = jnp.repeat(k, groups, axis=2)  # query head h reads key/value head h // groups
    v = jnp.repeat(v, groups, axis=2)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
    causal = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(causal, att, -jnp.inf), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, c.n_heads * hd)
    return dense(c.dim, "o_proj")(y)


class MLP(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):
    dense = lambda f, name: nn.Dense(f, use_bias=False, name=name)
    h = nn.silu(dense(self.cfg.hidden_dim, "gate_proj")(x)) * dense(self.cfg.hidden_dim, "up_proj")(
      x
    )
    return dense(self.cfg.dim, "down_proj")(h)


class Block(nn.Module):
  """One residual decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  cfg: Config

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    x = x + Attention(c, name="self_attn")(RMSNorm(c.norm_eps, name="input_layernorm")(x))
    return x + MLP(c, name="mlp")(RMSNorm(c.norm_eps, name="post_attention_layernorm")(x))


class LLaMA(nn.Module):
  cfg: Config

  def setup(self):
    c = self.cfg
    self.embed_tokens = nn.Embed(c.vocab_size, c.dim)
    self.layers = [Block(c, name=f"layers_{i}") for i in range(c.n_layers)]
    self.norm = RMSNorm(c.norm_eps)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False)

  def embed(self, tokens):
    return self.embed_tokens(tokens)

  def head(self, x):
    x = self.norm(x)
    if self.cfg.tie_embeddings:
      return self.embed_tokens.attend(x)
    return self.lm_head(x)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for blk in self.layers:
      x = blk(x)
    return self.head(x)


def block_names(params) -> list[str]:
  """The ``layers_{i}`` keys of ``params``, in block order."""
  names = [k for k in params if k.startswith("layers_")]
  return sorted(names, key=lambda k: int(k.split("_")[1]))


def embed(cfg: Config, params, tokens):
  return LLaMA(cfg).apply({"params": params}, tokens, method=LLaMA.embed)


def head(cfg: Config, params, x):
  return LLaMA(cfg).apply({"params": params}, x, method=LLaMA.head)


def block_apply(cfg: Config):
  """``f(block_params, x) -> y`` for one decoder block."""
  blk = Block(cfg)
  return lambda p, x: blk.apply({"params": p}, x)


def init(cfg: Config, key, seqlen: int = 8):
  return LLaMA(cfg).init(key, jnp.zeros((1, seqlen), jnp.int32))["params"]
