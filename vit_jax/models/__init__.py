"""Models: ViT (vit.py), hybrid ResNet backbone (resnet.py), tokenizers
(embeddings.py), the RPT report's CIFAR ResNet (resnet_cifar.py) and presets."""

from vit_jax.models.presets import AUTO_DTYPE, DTYPES, MODEL_CONFIGS, get_config, get_model, resolve_dtype
from vit_jax.models.vit import VisionTransformer

__all__ = ['AUTO_DTYPE', 'DTYPES', 'MODEL_CONFIGS', 'VisionTransformer', 'get_config', 'get_model',
           'resolve_dtype']
