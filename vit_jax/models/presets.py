"""Model presets keyed by the official checkpoint file names.

Each preset is a ConfigDict in the original repository's structure, so
``VisionTransformer(num_classes=..., **MODEL_CONFIGS['ViT-B_16'])`` works as it
did there. Parameter counts (224px, 1000-class head, no pre_logits) are tested
against the original's in tests/test_presets.py.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
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


# --- Hybrids (ViT paper §3.1): a BiT ResNet (vit_jax/models/resnet.py) feeds the
# ViT; "patches" of 1x1 over its stride-16/32 feature map. R+Ti_16 has only the
# root (conv + max-pool, stride 4) and 8x8 patches, so its grid is /32.
def _hybrid(name: str, base: str, num_layers: tuple[int, ...],
            patch: int = 1) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(MODEL_CONFIGS[base].to_dict())
  cfg.model_name = name
  cfg.patches.size = (patch, patch)
  cfg.resnet = ml_collections.ConfigDict({'num_layers': num_layers, 'width_factor': 1})
  return cfg


for _name, _base, _layers, _p in [
    ('R50+ViT-B_16', 'ViT-B_16', (3, 4, 9), 1),
    ('R50+ViT-L_32', 'ViT-L_32', (3, 4, 6, 3), 1),
    ('R26+ViT-S_32', 'ViT-S_32', (2, 2, 2, 2), 1),
    ('R26+ViT-B_32', 'ViT-B_32', (2, 2, 2, 2), 1),
    ('R+Ti_16', 'ViT-Ti_16', (), 8)]:
  MODEL_CONFIGS[_name] = _hybrid(_name, _base, _layers, _p)


# --- The RPT report's Table 1 (training from scratch; configs/scratch.py).
# Its "ViT-Ti" (2.58M) is the small-dataset ViT of Lee et al. 2021: depth 9,
# width 192, 12 heads of 16, MLP 384. One preset per patch size: 4 for 32px
# (CIFAR), 8 for 64px (Tiny-ImageNet), 16 for 224px (tf_flowers).
for _p in (4, 8, 16):
  MODEL_CONFIGS[f'SmallViT_{_p}'] = _vit(f'SmallViT_{_p}', _p, 192, 384, 12, 9)
  # SL-ViT (Lee et al.): Shifted Patch Tokenization + Locality Self-Attention.
  _cfg = _vit(f'SL-ViT_{_p}', _p, 192, 384, 12, 9)
  _cfg.tokenizer = ml_collections.ConfigDict({'type': 'spt'})
  _cfg.transformer.locality_attention = True
  MODEL_CONFIGS[f'SL-ViT_{_p}'] = _cfg
  # Rot-ViT (RPT report §3.2): Rotated Patch Tokenization, standard attention.
  _cfg = _vit(f'Rot-ViT_{_p}', _p, 192, 384, 12, 9)
  _cfg.tokenizer = ml_collections.ConfigDict({'type': 'rpt'})
  MODEL_CONFIGS[f'Rot-ViT_{_p}'] = _cfg
  # DeiT-Ti (Touvron et al. 2021): ViT-Ti with a distillation token and head.
  _cfg = _vit(f'DeiT-Ti_{_p}', _p, *_VIT['Ti'])
  _cfg.classifier = 'distill'
  MODEL_CONFIGS[f'DeiT-Ti_{_p}'] = _cfg

# ResNet-56 (He et al. 2016, CIFAR variant; vit_jax/models/resnet_cifar.py).
MODEL_CONFIGS['ResNet-56'] = ml_collections.ConfigDict({
    'model_type': 'resnet_cifar', 'model_name': 'ResNet-56', 'blocks_per_stage': 9,
    'widths': (16, 32, 64)})


def get_config(model: Any) -> ml_collections.ConfigDict:
  """A model config as a fresh ConfigDict: a preset name (with a helpful error
  for unknown names) or a model config (ConfigDict or dict), copied."""
  if not isinstance(model, str):
    return ml_collections.ConfigDict(model.to_dict() if hasattr(model, 'to_dict') else model)
  if model not in MODEL_CONFIGS:
    raise ValueError(f'Unknown model {model!r}. Known models: {", ".join(sorted(MODEL_CONFIGS))}')
  return ml_collections.ConfigDict(MODEL_CONFIGS[model].to_dict())


def model_fields() -> frozenset[str]:
  """Every field a model config may set: the constructor fields of the model
  classes (`get_model`'s model_type) and the preset configs' keys."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from vit_jax.models import resnet_cifar  # pylint: disable=g-import-not-at-top
  names = {f.name for cls in (vit.VisionTransformer, resnet_cifar.ResNetCifar)
           for f in dataclasses.fields(cls)} - {'parent', 'name'}
  for preset in MODEL_CONFIGS:
    names |= set(get_config(preset).keys())
  return frozenset(names)


def model_kwargs(config: Any) -> dict[str, Any]:
  """Turns a model config (dict or ConfigDict) into constructor kwargs."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return dict(config)


DTYPES = ('auto', 'float32', 'bfloat16')
# What 'auto' means, for the tools' help texts and the config schema.
AUTO_DTYPE = ('bfloat16 on TPUs and on GPUs with bf16 units (NVIDIA Ampere and newer, AMD), '
              'float32 on CPUs and older GPUs')


def resolve_dtype(dtype: Any = 'auto') -> Any:
  """Computation dtype: 'auto' is bfloat16 where the device has bf16 units
  (TPUs, NVIDIA GPUs from Ampere on, AMD GPUs: `vit.has_16bit_units`) and
  float32 elsewhere.

  There bf16 runs the matmuls on the tensor cores / MXU at about twice the
  f32 rate; CPUs and older GPUs (T4, V100: no bf16 tensor cores) only emulate
  it, slower than f32. A jnp dtype passes through.
  """
  if not isinstance(dtype, str):
    return jnp.dtype(dtype)
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}.')
  if dtype == 'auto':
    dtype = 'bfloat16' if vit.has_16bit_units() else 'float32'
  return jnp.dtype(dtype)


def get_model(name_or_config: Any, num_classes: int | None = None, **overrides: Any):
  """One-call constructor: ``get_model('ViT-B_16', num_classes=10)``.

  `name_or_config` is a preset name or a model config in the original
  structure. `overrides` replace top-level fields (e.g. classifier='gap',
  dtype='bfloat16'; `dtype` goes through `resolve_dtype`).
  """
  kwargs = model_kwargs(get_config(name_or_config))
  kwargs.update(overrides)
  if 'dtype' in kwargs:
    kwargs['dtype'] = resolve_dtype(kwargs['dtype'])
  model_type = kwargs.pop('model_type', 'vit')
  if model_type == 'vit':
    return vit.VisionTransformer(num_classes=num_classes, **kwargs)
  if model_type == 'resnet_cifar':
    from vit_jax.models import resnet_cifar  # pylint: disable=g-import-not-at-top
    kwargs.pop('model_name', None)
    return resnet_cifar.ResNetCifar(num_classes=num_classes, **kwargs)
  raise ValueError(f'Unknown model_type {model_type!r} in model config.')
