"""What a data source tells the loop about a dataset (no TensorFlow here).

Shared by `vit_jax.input_pipeline` (tf.data) and `vit_jax.synthetic`, the
two modules `config_schema.data_module` chooses between, and by `vit_jax.predict`
(which must not import TensorFlow for its file listing).
"""

from __future__ import annotations

from typing import NamedTuple

# Image files the folder datasets and predict accept (any case).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


class DatasetInfo(NamedTuple):
  num_classes: int
  num_train: int
  num_test: int
  class_names: tuple[str, ...]
  # 'folder:<root>/train = 90% of every class of <root> (...)' and the like.
  train_description: str = ''
  test_description: str = ''
  # The test files when 'test' was held out of a folder without test/ or val/.
  held_out_test_files: tuple[str, ...] = ()
