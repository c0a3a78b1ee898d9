"""vit_jax: fine-tune, train and study Vision Transformers in JAX/Flax."""

__version__ = '0.1.0'
