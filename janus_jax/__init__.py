"""janus_jax: DeepSeek Janus / Janus-Pro in JAX and Flax."""

from janus_jax.pretrained import Pretrained, load_pretrained

__all__ = ["Pretrained", "load_pretrained"]
