"""Every preset has the original's parameter count (224px, 1000-class head, no pre_logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models

# 224px, 1000-class head, no pre_logits: the original repository's counts.
EXPECTED = {
    'ViT-Ti_16': 5_717_416,
    'ViT-S_16': 22_050_664,
    'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232,
    'ViT-B_8': 86_576_872,
    'ViT-L_16': 304_326_632,
    'ViT-L_32': 306_535_400,
    'ViT-H_14': 632_045_800,
}


def count(name, res=224, num_classes=1000, **kw):
  model = models.get_model(name, num_classes=num_classes, **kw)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_param_count(name):
  assert count(name) == EXPECTED[name]


def test_all_presets_build():
  for name in models.MODEL_CONFIGS:
    assert count(name, res=64 if 'Ti_8' in name else 224) > 0, name


def test_in21k_shape_with_pre_logits():
  # ImageNet-21k checkpoints: pre_logits (D x D) and a 21843-class head.
  n = count('ViT-B_16', num_classes=21843, representation_size=768)
  assert n == EXPECTED['ViT-B_16'] + 768 * 768 + 768 + 768 * (21843 - 1000) + (21843 - 1000)


def test_unknown_model_error():
  with pytest.raises(ValueError, match='Unknown model .*ViT-B_16'):
    models.get_model('ViT-Q_16')
