"""Model presets keyed by the official checkpoint file names.

Each preset is a ConfigDict in the original repository's structure, so
``VisionTransformer(num_classes=..., **MODEL_CONFIGS['ViT-B_16'])`` works as it
did there. Parameter counts (224px, 1000-class head, no pre_logits) are tested
against the original's in tests/test_presets.py.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from vit_jax.models import vit


def _vit(name: str, patch: int, hidden: int, mlp: int, heads: int, layers: int,
         representation_size: int | None = None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      model_name=name,
      patches=dict(size=(patch, patch)),
      hidden_size=hidden,
      transformer=dict(mlp_dim=mlp, num_heads=heads, num_layers=layers,
                       attention_dropout_rate=0.0, dropout_rate=0.0),
      classifier='token',
      representation_size=representation_size,
      resnet=None,
  ))


# Paper Table 1 (Base/Large/Huge) plus the Ti/S sizes of Steiner et al. (AugReg).
_VIT = {
    'Ti': (192, 768, 3, 12),
    'S': (384, 1536, 6, 12),
    'B': (768, 3072, 12, 12),
    'L': (1024, 4096, 16, 24),
    'H': (1280, 5120, 16, 32),
}

MODEL_CONFIGS: dict[str, ml_collections.ConfigDict] = {}
for _size, _patches in [('Ti', (16,)), ('S', (8, 16, 32)), ('B', (8, 16, 32)),
                        ('L', (16, 32)), ('H', (14,))]:
  for _p in _patches:
    _name = f'ViT-{_size}_{_p}'
    MODEL_CONFIGS[_name] = _vit(_name, _p, *_VIT[_size])

# A 2-layer toy preset, the shape of ../shared/golden/tiny.npz: for tests/demos.
MODEL_CONFIGS['testing'] = _vit('testing', 4, 64, 128, 2, 2)


def get_config(name: str) -> ml_collections.ConfigDict:
  """Returns a copy of preset `name`, with a helpful error for unknown names."""
  if name not in MODEL_CONFIGS:
    raise ValueError(f'Unknown model {name!r}. Known models: {", ".join(sorted(MODEL_CONFIGS))}')
  return ml_collections.ConfigDict(MODEL_CONFIGS[name].to_dict())


def model_kwargs(config: Any) -> dict[str, Any]:
  """Turns a model config (dict or ConfigDict) into constructor kwargs."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return dict(config)


def get_model(name_or_config: Any, num_classes: int | None = None, **overrides: Any):
  """One-call constructor: ``get_model('ViT-B_16', num_classes=10)``.

  `name_or_config` is a preset name or a model config in the original
  structure. `overrides` replace top-level fields (e.g. classifier='gap').
  """
  cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
  kwargs = model_kwargs(cfg)
  kwargs.update(overrides)
  model_type = kwargs.pop('model_type', 'vit')
  if model_type == 'vit':
    return vit.VisionTransformer(num_classes=num_classes, **kwargs)
  if model_type == 'resnet_cifar':
    from vit_jax.models import resnet_cifar  # pylint: disable=g-import-not-at-top
    kwargs.pop('model_name', None)
    return resnet_cifar.ResNetCifar(num_classes=num_classes, **kwargs)
  raise ValueError(f'Unknown model_type {model_type!r} in model config.')
