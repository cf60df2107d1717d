"""janus_jax: DeepSeek Janus / Janus-Pro in JAX and Flax."""

__all__ = ["Pretrained", "load_pretrained"]


def __getattr__(name: str):
  # Lazy, so that `python -m janus_jax.convert` does not import convert twice.
  if name in __all__:
    from janus_jax import pretrained

    return getattr(pretrained, name)
  raise AttributeError(f"module 'janus_jax' has no attribute {name!r}")
