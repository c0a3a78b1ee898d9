"""One place that turns what a user names into a ready model.

  model = hub.load('ViT-B_16')                      # the paper's ImageNet-21k file
  model = hub.load('imagenet21k+imagenet2012/ViT-B_16')
  model = hub.load('B_16')                          # AugReg (configs/augreg.py names)
  model = hub.load('checkpoints/SmallViT_8-tiny_imagenet-32px.npz')
  model = hub.load('gs://vit_models/imagenet21k/ViT-B_16.npz')   # or https://...
  model = hub.load('/tmp/quickstart')               # a training workdir: its export,
  model = hub.load('/tmp/quickstart', step=200)     # or any of its orbax steps
  top5 = model.predict(['cat.jpg', 'photos/'])     # per image: [{label, name, prob}, ...]
  batch, raw = model.load_images(paths)             # the eval preprocessing, TF-free
  logits = model(batch)                             # = model.module.apply(model.variables, ...)
  start = hub.load('ViT-B_16', num_classes=10, image_size=384)   # fine-tuning's start

A `Model` is the flax module, its variables, the model config, the class
names (when known) and the eval preprocessing (resolution, `pp_eval`,
`crop_fraction`) the model was trained with: predict, evaluate, fewshot,
analysis, export, benchmark, the notebooks and training (its pre-trained and
teacher checkpoints) all load through here.

What decides what:
* Names and URLs become local files through vit_jax.download (cached once).
* The architecture: `model=` if given (it must fit the file), else the
  training workdir's config, else the file's sidecar `.json`, else the one
  preset with the file's parameter tree (`checkpoint.infer_model`).
* The resolution and eval preprocessing: `image_size=` if given, else the
  training run's (a workdir, or a file inside one: its config.json), else
  the file's sidecar's (exports record them), else the resolution the
  position embeddings were trained at, with 'resize'. At any other
  resolution the position embeddings are resized as for fine-tuning
  (`checkpoint.fit_position_embeddings`, the one resize).
* The class names: `labels=`, else the run's labels.txt, else the file's
  `<name>.labels.txt`, else, for an official checkpoint with ImageNet-1k's
  or ImageNet-21k's head, their WordNet names (`download.official_labels`,
  fetched once; without network the classes stay numbered, with a warning).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from absl import logging

from vit_jax import checkpoint as ckpt
from vit_jax import config_schema, download, images, models
from vit_jax.images import CROP_FRACTION, hw
from vit_jax.models import vit
from vit_jax.workdir import LABELS_NAME, Workdir, WorkdirError, read_labels


class HubError(ValueError):
  """What a user named cannot be loaded as a model, and why."""


@dataclasses.dataclass
class Model:
  """A model ready for inference: module, variables and how to feed it."""

  module: Any  # flax module
  params: Any
  model_config: Any  # ml_collections.ConfigDict
  image_size: tuple[int, int]
  batch_stats: Any = None  # BatchNorm models (ResNet-56) only
  pp_eval: str = 'resize'
  crop_fraction: float = CROP_FRACTION
  labels: list[str] | None = None
  source: str = ''  # the file (or workdir step) the params came from

  @property
  def variables(self) -> dict[str, Any]:
    out = {'params': self.params}
    if self.batch_stats is not None:
      out['batch_stats'] = self.batch_stats
    return out

  @property
  def num_classes(self) -> int:
    return int(self.module.num_classes)

  # Inference: what predict, analysis and the notebooks run.

  def __call__(self, batch: Any) -> Any:
    """Logits (N, num_classes) of a preprocessed batch (N, H, W, 3) in [-1, 1]."""
    return self._apply(self.variables, batch)

  @functools.cached_property
  def _apply(self):
    import jax  # pylint: disable=g-import-not-at-top
    return jax.jit(functools.partial(self.module.apply, train=False))

  def load_images(self, paths: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(preprocessed float32 (N, H, W, 3) in [-1, 1], raw uint8 images) of image
    files and/or folders (recursive, sorted).

    The training eval path's pixels without TensorFlow (vit_jax.images): this
    model's `pp_eval`, resolution and `crop_fraction`, and large JPEGs decoded
    at reduced DCT scale exactly as folder-dataset evaluation decodes them.
    Raises images.ImageError naming a file that cannot be read.
    """
    return images.load_images(images.collect_images(paths), self.pp_eval, self.image_size,
                              self.crop_fraction, min_side=self._min_side)

  @property
  def _min_side(self) -> int:
    return images.DCT_MIN_SIDE * min(self.image_size)

  def probs(self, batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities (N, num_classes), float32, `batch_size` images at a time."""
    import jax  # pylint: disable=g-import-not-at-top
    return np.concatenate([np.asarray(jax.nn.softmax(self(batch[i:i + batch_size]), axis=-1))
                           for i in range(0, len(batch), batch_size)])

  def top_k(self, probs: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
    """Per image, the k most probable classes as {'label', 'name', 'prob'}."""
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
    return [[{'label': int(c), 'name': self.labels[c] if self.labels else str(int(c)),
              'prob': float(p[c])} for c in row] for p, row in zip(probs, order)]

  def iter_images(self, paths: Sequence[str], batch_size: int = 32,
                  skipped: list[tuple[str, str]] | None = None
                  ) -> Iterator[tuple[list[str], np.ndarray, list[np.ndarray]]]:
    """(image files, preprocessed batch, raw images), `batch_size` files at a
    time, over files and/or folders (recursive, sorted): one batch in memory.

    After the first batch, a short last batch is padded with zero images to
    `batch_size` (the shape compiled already); its first len(files) rows are
    the images. A file that cannot be read raises images.ImageError, or with
    a `skipped` list is left out and appended to it as (file, reason).
    """
    readable = self._read(images.collect_images(paths), skipped)
    for i, chunk in enumerate(iter(lambda: list(itertools.islice(readable, batch_size)), [])):
      files, raw = [f for f, _ in chunk], [image for _, image in chunk]
      yield files, self._preprocess(raw, batch_size if i else 0), raw

  def _read(self, files: Sequence[str], skipped: list[tuple[str, str]] | None
            ) -> Iterator[tuple[str, np.ndarray]]:
    """(file, raw image) of each file, decoded as folder evaluation does; see
    iter_images for `skipped`."""
    for path in files:
      try:
        yield path, images.read_image(path, self._min_side)
      except images.ImageError as e:
        if skipped is None:
          raise
        skipped.append((path, str(e)))

  def _preprocess(self, raw: list[np.ndarray], pad_to: int = 0) -> np.ndarray:
    """Raw uint8 images -> this model's eval batch, zero-padded to `pad_to` rows."""
    batch = images.eval_batch(raw, self.pp_eval, self.image_size, self.crop_fraction)
    if pad_to > len(batch):
      batch = np.pad(batch, [(0, pad_to - len(batch))] + [(0, 0)] * (batch.ndim - 1))
    return batch

  def iter_probs(self, paths: Sequence[str], batch_size: int = 32,
                 skipped: list[tuple[str, str]] | None = None
                 ) -> Iterator[tuple[list[str], np.ndarray]]:
    """(image files, their probabilities), `batch_size` files at a time (iter_images)."""
    for files, batch, _ in self.iter_images(paths, batch_size, skipped):
      yield files, self.probs(batch, batch_size)[:len(files)]

  def predict(self, paths: Sequence[str], k: int = 5,
              batch_size: int = 32) -> list[list[dict[str, Any]]]:
    """The top-k classes of every image file (folders: recursive, sorted)."""
    return [row for _, probs in self.iter_probs(paths, batch_size)
            for row in self.top_k(probs, k)]


# ---------------------------------------------------------------------------
# Models of a config.
# ---------------------------------------------------------------------------

def build(config: Any, num_classes: int) -> tuple[Any, Any]:
  """(module, model config) of a training config, computing in config.dtype."""
  mc = config_schema.model_config(config)
  return models.get_model(mc, num_classes=num_classes, dtype=config.get('dtype', 'auto')), mc


def init(model: Any, *, num_classes: int, image_size: int, dtype: str = 'auto',
         seed: int = 0, **overrides: Any) -> Model:
  """A randomly initialised `Model` of a preset name or model config (benchmarks).

  `overrides` replace model fields (e.g. attention='einsum', remat='full').
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mc = models.get_config(model)
  module = models.get_model(mc, num_classes=num_classes, dtype=dtype, **overrides)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda k: module.init(k, x, train=False))(jax.random.key(seed))
  return Model(module=module, params=variables['params'], model_config=mc,
               image_size=(image_size, image_size), batch_stats=variables.get('batch_stats'),
               source='random init')


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------

def trained_image_size(params: Any, model_config: Any) -> tuple[int, int] | None:
  """The resolution a ViT's params were trained at, read off its position embeddings."""
  try:
    table = params['Transformer']['posembed_input']
  except (KeyError, TypeError):
    return None
  sh, sw = vit.token_stride(model_config)
  if 'row_embedding' in table:  # posemb='learn2d': the grid is explicit.
    return (np.shape(table['row_embedding'])[1] * sh, np.shape(table['col_embedding'])[1] * sw)
  if 'pos_embedding' not in table:
    return None
  n = np.shape(table['pos_embedding'])[1] - vit.num_prefix_tokens(model_config)
  g = round(np.sqrt(n))
  return (g * sh, g * sw) if g * g == n else None


def load(name: str | os.PathLike, *, model: Any = None, step: int | None = None,
         checkpoint: str | None = None, labels: str | Sequence[str] | None = None,
         image_size: int | Sequence[int] | None = None, dtype: str = 'auto',
         num_classes: int | None = None) -> Model:
  """The `Model` of a preset name, file, URL or training workdir (module docstring).

  model: a preset name or model config; default the workdir's / file's own.
  step: a workdir's orbax step (default: its export, else its latest step).
  checkpoint: with a workdir, another .npz to take the params from.
  labels: a label file or a list of names; default the workdir's labels.txt
    or the file's `<name>.labels.txt`.
  image_size: run at this resolution (position embeddings resized).
  dtype: computation dtype (models.resolve_dtype).
  num_classes: a new head for fine-tuning: the file's head (and `pre_logits`)
    replaced by one zero-initialised linear layer of this many classes (paper
    App. B.1.1; timm's `num_classes=`). Class names then come only from `labels`.
  """
  name = os.fspath(name)
  if not name:
    raise HubError('Name a model: a training workdir, a .npz file, a gs:// or https:// URL, or an '
                   f'official name (a preset such as ViT-B_16: {", ".join(sorted(models.MODEL_CONFIGS))}'
                   '; imagenet21k+imagenet2012/ViT-B_16; an AugReg name such as B_16).')
  wd = Workdir(name)
  config: dict[str, Any] = {}
  try:
    if wd.is_run():
      config = wd.config()
      mc = models.get_config(model) if model else config_schema.model_config(_config_dict(config))
      variables, source = _workdir_variables(wd, mc, step, checkpoint)
    else:
      if step is not None:
        raise HubError(f'step={step} needs a training workdir; {name} is not one '
                       '(no config.json).')
      source = ckpt.local_path(checkpoint or name)
      variables = ckpt.load_variables(source)
      mc = ckpt.infer_model(source, model)
      # A file inside a training workdir (its export, an exported step) comes
      # with that run's labels and eval preprocessing.
      wd = Workdir(os.path.dirname(os.path.abspath(source)))
      config = wd.config() if wd.is_run() else {}
  except (OSError, WorkdirError, ckpt.CheckpointError) as e:
    raise HubError(str(e)) from None
  params = variables['params']
  info = ckpt.describe(params)
  if info.get('num_classes') is None:
    raise HubError(f'{source} has no classification head (`head/kernel`).')
  is_vit = mc.get('model_type', 'vit') == 'vit'
  classes = int(info['num_classes'])
  new_head = num_classes is not None and num_classes != classes
  if new_head:
    if num_classes < 1:
      raise HubError(f'num_classes must be positive, got {num_classes}.')
    classes = int(num_classes)
  if is_vit:
    mc.representation_size = None if new_head else info.get('representation_size')

  # The run's eval preprocessing; for a file outside a run, its sidecar's.
  side = {} if config else ((ckpt.read_sidecar(source) or {}).get('preprocessing') or {})
  pp = config.get('pp') or {'eval': side.get('pp_eval'), 'crop_fraction': side.get('crop_fraction')}
  trained = trained_image_size(params, mc) if is_vit else None
  size = image_size or config.get('image_size') or side.get('image_size') or trained
  if not size:
    raise HubError(f'Cannot tell the input resolution of {source}: pass image_size.')
  size = hw(size)

  module = models.get_model(mc, num_classes=classes, dtype=dtype)
  params = _fit(module, params, size, source, mc, new_head)
  names = (_labels(labels, None, '', classes) if new_head else
           _labels(labels, wd if config else None, source, classes))
  if names is None and not new_head and not config and download.is_official(source):
    names = _official_names(classes)
  return Model(module=module, params=params, model_config=mc, image_size=size,
               batch_stats=variables.get('batch_stats'),
               pp_eval=pp.get('eval') or 'resize',
               crop_fraction=float(pp.get('crop_fraction') or CROP_FRACTION),
               labels=names, source=source)


def _config_dict(config: dict[str, Any]):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(config)


def _workdir_variables(wd: Workdir, mc: Any, step: int | None,
                       checkpoint: str | None) -> tuple[dict[str, Any], str]:
  """The variables of a workdir: `checkpoint`, else its step, export or latest step."""
  if checkpoint:
    path = ckpt.local_path(checkpoint)
    return ckpt.load_variables(path), path
  export = wd.export_path(model_name=mc.get('model_name'))
  if step is None and os.path.isfile(export):
    return ckpt.load_variables(export), export
  from vit_jax.models import mpp  # pylint: disable=g-import-not-at-top
  try:
    step, state = wd.restore(step)
  except WorkdirError as e:
    if step is not None:
      raise
    raise HubError(f'No exported model {export} and {e}') from None
  # The export rule (vit_jax.export.write): the Polyak average when there is one.
  variables = {'params': mpp.export_params(state.get('polyak') or state['params'])}
  if 'batch_stats' in state:
    variables['batch_stats'] = state['batch_stats']
  return variables, f'{wd.checkpoints_dir}/{step}'


def _fit(module: Any, params: Any, size: tuple[int, int], source: str, mc: Any,
         new_head: bool = False) -> Any:
  """`params` in the shapes `module` has at `size` (`checkpoint.fit`: posembs
  resized; with `new_head`, a zero-initialised head), or HubError."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = jax.random.PRNGKey(0)
  expected = jax.eval_shape(lambda: module.init(
      {'params': rng, 'dropout': rng}, jnp.zeros((1, *size, 3)), train=False))['params']
  grid = None
  if mc.get('model_type', 'vit') == 'vit':
    sh, sw = vit.token_stride(mc)
    if size[0] % sh or size[1] % sw:
      raise HubError(f'Cannot run {source} at {size[0]}x{size[1]}: the image size must be '
                     f'a multiple of its {sh}x{sw} patches.')
    grid = (size[0] // sh, size[1] // sw)
  try:
    return ckpt.fit(params, expected, mc, grid=grid, new_head=new_head,
                    source=f'{source} (at {size[0]}x{size[1]})', path=source)
  except ckpt.CheckpointError as e:
    raise HubError(str(e)) from None


def _labels(labels: str | Sequence[str] | None, wd: Workdir | None, source: str,
            num_classes: int) -> list[str] | None:
  """Class names: given, the workdir's labels.txt, or `<file>.labels.txt`.

  Given names must fit the head (else HubError); found ones that do not (a
  run's labels.txt next to a head of other targets, e.g. masked patch
  prediction's colours) are left out with a warning.
  """
  path = labels if isinstance(labels, str) else None
  try:
    if labels is None and wd is not None:
      path, names = wd.file(LABELS_NAME), wd.labels()
    elif labels is None:
      side = source[:-4] + '.labels.txt' if source.endswith('.npz') else None
      path, names = side, (read_labels(side) if side and os.path.isfile(side) else None)
    else:
      names = read_labels(path) if path else [str(n) for n in labels]
  except WorkdirError as e:
    raise HubError(str(e)) from None
  if names is not None and len(names) != num_classes:
    problem = (f'Label file {path or "labels"} has {len(names)} names but the model has '
               f'{num_classes} classes')
    if labels is not None:
      raise HubError(problem + '.')
    logging.warning('%s: its classes stay numbered.', problem)
    return None
  return names


def _official_names(num_classes: int) -> list[str] | None:
  """ImageNet-1k's or -21k's class names for an official head (download.official_labels);
  None, with a warning, when they cannot be had: they only name the classes."""
  try:
    path = download.official_labels(num_classes)
  except download.DownloadError as e:
    logging.warning('Class names of the official %d-class head unavailable: %s', num_classes,
                    str(e).split('\n')[0])
    return None
  return read_labels(path) if path else None


# ---------------------------------------------------------------------------
# Training's checkpoints: the pre-trained start and the DeiT teacher.
# ---------------------------------------------------------------------------

def load_pretrained(path: str, init_params: Any, model_config: Any,
                    grid: Sequence[int] | None = None) -> dict[str, Any]:
  """`path` (a name, URL or file) in the shapes of `init_params`: new head,
  posembs resized (paper App. B.1.1); see `checkpoint.load_pretrained`."""
  return ckpt.load_pretrained(ckpt.local_path(path), init_params, model_config, grid=grid)


def load_teacher(config: Any, num_classes: int) -> tuple[Any, dict[str, Any]] | None:
  """(module, variables) of config.distill's frozen DeiT teacher, or None."""
  distill = config.get('distill')
  if not distill:
    return None
  path = distill.teacher_checkpoint
  if not os.path.exists(path) and download.bucket_path(path) is None and '://' not in path:
    raise ckpt.CheckpointError(
        f'The DeiT teacher config.distill.teacher_checkpoint={path!r} does not exist. Train '
        f'the teacher ({distill.teacher_model}) on the same data first (configs/scratch.py: '
        f'its resnet56 for deit_ti), or point --config.distill.teacher_checkpoint at one.')
  try:
    teacher = load(path, model=distill.teacher_model,
                   image_size=config.image_size, dtype=config.get('dtype', 'auto'))
  except HubError as e:
    raise ckpt.CheckpointError(
        f'Teacher checkpoint {path} cannot be used as '
        f'config.distill.teacher_model={distill.teacher_model!r}: {e}') from None
  if teacher.num_classes != num_classes:
    raise ckpt.CheckpointError(
        f'Teacher checkpoint {distill.teacher_checkpoint} has {teacher.num_classes} classes; '
        f'the data has {num_classes}.')
  return teacher.module, teacher.variables
