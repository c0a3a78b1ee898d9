"""vit_jax.images (Pillow + numpy) against the training eval path it replaces for
predict/analysis: `input_pipeline.decode_image` + `preprocess.get_eval_fn`.

Decoded pixels must be identical and preprocessed floats equal to 1e-5, on real
JPEGs from ../shared (CIFAR-10, Tiny-ImageNet with its greyscale files) and on
files written here in every accepted format.
"""

import ast
import io
import pathlib
import struct

import numpy as np
import pytest
from conftest import REPO, extract_once, tiny_imagenet_val_dir
from PIL import Image

from vit_jax import images

TOL = 1e-5
# (pp_eval, size, crop_fraction): upscaling and downscaling, square and not.
PP_CASES = [
    ('resize', 224, images.CROP_FRACTION),
    ('resize', 16, images.CROP_FRACTION),
    ('resize', (24, 40), images.CROP_FRACTION),
    ('resize_crop', 224, images.CROP_FRACTION),
    ('resize_crop', 20, 0.6),
    ('resize_crop', (48, 30), 1.0),
]


@pytest.fixture(scope='module')
def tf_eval():
  """(decode(path) -> uint8, preprocess(uint8, pp, size, crop) -> float32) of the training pipeline."""
  tf = pytest.importorskip('tensorflow')
  from vit_jax import input_pipeline, preprocess

  def decode(path):
    return input_pipeline.decode_image(tf.io.read_file(str(path))).numpy()

  def prep(image, pp_eval, size, crop_fraction):
    return preprocess.get_eval_fn(pp_eval, size, crop_fraction=crop_fraction)(tf.constant(image)).numpy()

  return decode, prep


def _compare(paths, tf_eval, pp_every=1, pp_cases=PP_CASES) -> float:
  """Asserts identical decoding and preprocessing within TOL; returns the max abs difference."""
  decode, prep = tf_eval
  worst = 0.0
  for i, path in enumerate(paths):
    ours = images.read_image(str(path))
    theirs = decode(path)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape, path
    np.testing.assert_array_equal(ours, theirs, err_msg=str(path))
    if i % pp_every:
      continue
    for pp_eval, size, crop in pp_cases:
      a = images.eval_preprocess(ours, pp_eval, size, crop)
      b = prep(theirs, pp_eval, size, crop)
      assert a.dtype == np.float32 and a.shape == b.shape, (path, pp_eval, size)
      diff = float(np.abs(a - b).max())
      assert diff <= TOL, (path, pp_eval, size, diff)
      worst = max(worst, diff)
  return worst


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------


def test_real_cifar10_jpegs_match_tensorflow(tf_eval):
  root = extract_once('cifar10_jpeg.tar.gz', 'cifar10_jpeg_test',
                      lambda m: m.name.startswith(('test/', './test/')))
  paths = sorted((root / 'test').glob('*/*.jpg'))[::20]  # 500 files, 50 per class
  assert len(paths) == 500
  worst = _compare(paths, tf_eval, pp_every=10)
  print(f'CIFAR-10: {len(paths)} JPEGs identical; max abs preprocessing difference {worst:.3g}')


def test_real_tiny_imagenet_jpegs_incl_greyscale_match_tensorflow(tf_eval):
  val = tiny_imagenet_val_dir() / 'val' / 'images'
  paths = sorted(val.glob('*.JPEG'))[::20]
  grey = []
  for p in sorted(val.glob('*.JPEG')):
    with Image.open(p) as im:
      if im.mode == 'L':
        grey.append(p)
    if len(grey) == 5:
      break
  assert grey, 'Tiny-ImageNet val is known to hold greyscale JPEGs'
  worst = _compare(paths + grey, tf_eval, pp_every=10)
  worst = max(worst, _compare(grey, tf_eval))
  for p in grey:  # greyscale is expanded to three equal channels
    image = images.read_image(str(p))
    assert image.shape[-1] == 3 and (image == image[..., :1]).all()
  print(f'Tiny-ImageNet: {len(paths) + len(grey)} JPEGs identical ({len(grey)} greyscale); '
        f'max abs preprocessing difference {worst:.3g}')


# ---------------------------------------------------------------------------
# Files written here
# ---------------------------------------------------------------------------


def _photo(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
  """Smooth gradients plus noise: exercises chroma upsampling unlike flat colours do."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256]
                  + [np.full((h, w), 200)] * (channels - 3), -1)
  noise = rng.integers(-40, 41, (h, w, channels))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def _to_h1v2(jpeg: bytes) -> bytes:
  """Turns a baseline 4:2:2 (h2v1) JPEG into a valid 4:4:0 (h1v2) one.

  Pillow cannot write 4:4:0. Both have 4 blocks per MCU, so swapping the luma
  sampling factors and the image's width and height keeps the scan valid (the
  content is scrambled, which does not matter here).
  """
  sof = jpeg.index(b'\xff\xc0')
  h, w, n = struct.unpack('>HHB', jpeg[sof + 5:sof + 10])
  assert n == 3 and jpeg[sof + 11] == 0x21, 'expected a 4:2:2 baseline JPEG'
  out = bytearray(jpeg)
  out[sof + 5:sof + 9] = struct.pack('>HH', w, h)
  out[sof + 11] = 0x12
  return bytes(out)


def _written_files(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
  files = {}

  def save(name, array, fmt, mode=None, **kw):
    path = tmp / name
    (Image.fromarray(array).convert(mode) if mode else Image.fromarray(array)).save(path, fmt, **kw)
    files[name] = path

  rgb = _photo(37, 53)
  for sub in ('4:4:4', '4:2:2', '4:2:0'):
    save(f'jpeg_{sub.replace(":", "")}.jpg', rgb, 'JPEG', quality=85, subsampling=sub)
  for h, w in ((1, 1), (2, 3), (3, 2), (5, 4), (9, 17), (64, 7)):  # 1-2 sample wide chroma, odd edges
    save(f'jpeg_420_{h}x{w}.jpg', _photo(h, w, seed=h * w), 'JPEG', quality=90, subsampling='4:2:0')
    save(f'jpeg_422_{h}x{w}.jpg', _photo(h, w, seed=h + w), 'JPEG', quality=90, subsampling='4:2:2')
  save('jpeg_420_progressive.jpg', _photo(40, 30), 'JPEG', quality=70, progressive=True)
  save('jpeg_420_restart.jpg', _photo(41, 29), 'JPEG', quality=70, restart_marker_blocks=2)
  save('jpeg_grey.jpg', _photo(33, 21)[..., 0], 'JPEG', quality=80)
  save('jpeg_cmyk.jpg', _photo(20, 24, 4), 'JPEG', mode='CMYK', quality=90)
  buf = io.BytesIO()
  Image.fromarray(_photo(26, 18)).save(buf, 'JPEG', quality=90, subsampling='4:2:2')
  (tmp / 'jpeg_440.jpg').write_bytes(_to_h1v2(buf.getvalue()))
  files['jpeg_440.jpg'] = tmp / 'jpeg_440.jpg'

  save('rgba.png', _photo(30, 45, 4), 'PNG')
  save('grey.png', _photo(30, 20)[..., 1], 'PNG')
  save('grey_alpha.png', _photo(12, 10, 4)[..., :2].copy(), 'PNG', mode='LA')
  palette = Image.fromarray(_photo(16, 24)).convert('P', palette=Image.Palette.ADAPTIVE, colors=32)
  palette.save(tmp / 'palette_transparent.png', transparency=3)
  files['palette_transparent.png'] = tmp / 'palette_transparent.png'
  Image.fromarray((_photo(10, 14)[..., 0].astype(np.uint16) * 257 + 3).astype(np.uint16)).save(
      tmp / 'grey16.png')
  files['grey16.png'] = tmp / 'grey16.png'
  save('rgb.bmp', _photo(17, 23), 'BMP')
  gif = Image.fromarray(_photo(21, 19)).convert('P', palette=Image.Palette.ADAPTIVE, colors=64)
  gif.save(tmp / 'plain.gif')
  files['plain.gif'] = tmp / 'plain.gif'
  frames = [Image.fromarray(_photo(15, 16, seed=s)).convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
            for s in (1, 2)]
  frames[0].save(tmp / 'animated_transparent.gif', save_all=True, append_images=frames[1:], transparency=0,
                 duration=50)
  files['animated_transparent.gif'] = tmp / 'animated_transparent.gif'
  save('lossless.webp', _photo(19, 27), 'WEBP', lossless=True)
  save('lossy.webp', _photo(19, 27), 'WEBP', quality=80)
  return files


def test_written_files_of_every_format_match_tensorflow(tmp_path, tf_eval):
  files = _written_files(tmp_path)
  worst = 0.0
  for name, path in files.items():
    worst = max(worst, _compare([path], tf_eval))
  # The special cases really are what their names say.
  with Image.open(files['jpeg_440.jpg']) as im:
    assert [layer[1:3] for layer in im.layer] == [(1, 2), (1, 1), (1, 1)]
  with Image.open(files['jpeg_420_progressive.jpg']) as im:
    assert im.info.get('progressive') and [layer[1:3] for layer in im.layer][0] == (2, 2)
  with Image.open(files['jpeg_cmyk.jpg']) as im:
    assert im.mode == 'CMYK'
  with Image.open(files['grey16.png']) as im:
    assert im.mode.startswith('I')
  with Image.open(files['animated_transparent.gif']) as im:
    assert im.n_frames == 2 and im.info.get('transparency') == 0
  print(f'{len(files)} written files identical; max abs preprocessing difference {worst:.3g}')


def _gif_bytes(screen, frame, transparency=None):
  """A one-frame GIF89a whose frame (left, top, width, height) need not fill the
  (width, height) screen: the case Pillow cannot write. 4-colour global
  palette; LZW with a clear code before every pixel, so every code is 3 bits."""
  left, top, fw, fh = frame
  out = bytearray(b'GIF89a' + struct.pack('<HHBBB', *screen, 0xF1, 1, 0))
  out += bytes([10, 20, 30, 200, 100, 50, 0, 255, 0, 0, 0, 255])
  if transparency is not None:
    out += bytes([0x21, 0xF9, 4, 1, 0, 0, transparency, 0])
  out += b'\x2c' + struct.pack('<HHHHB', left, top, fw, fh, 0)
  codes = [c for i in range(fw * fh) for c in (4, i % 3 + 1)] + [5]
  bits = sum(c << (3 * i) for i, c in enumerate(codes))
  data = bits.to_bytes(-(-3 * len(codes) // 8), 'little')
  out += bytes([2]) + b''.join(bytes([len(data[i:i + 255])]) + data[i:i + 255]
                               for i in range(0, len(data), 255))
  return bytes(out + b'\x00\x3b')


@pytest.mark.parametrize('frame,transparency', [
    ((2, 1, 4, 3), None), ((2, 1, 4, 3), 2), ((0, 0, 8, 6), 0), ((1, 0, 5, 6), 3),
    ((5, 4, 3, 2), None)])
def test_gif_first_frame_offset_and_transparency_as_tensorflow(frame, transparency):
  """TensorFlow sizes the image by the first frame, draws it at its offset on
  black (clipped) and paints transparent pixels black; read_image does the same."""
  tf = pytest.importorskip('tensorflow')
  data = _gif_bytes((8, 6), frame, transparency)
  np.testing.assert_array_equal(images.decode_image(data), tf.io.decode_gif(data).numpy()[0])


def test_large_jpegs_dct_scaled_as_evaluation_decodes_them(tmp_path, tf_eval):
  """read_image(path, min_side) = input_pipeline.decode_image(data, min_side): 1/2, 1/4, 1/8 scale."""
  tf = pytest.importorskip('tensorflow')
  from vit_jax import input_pipeline
  files = {}
  for sub in ('4:4:4', '4:2:2', '4:2:0'):
    for h, w in ((300, 200), (257, 517)):
      path = tmp_path / f'{sub.replace(":", "")}_{h}x{w}.jpg'
      Image.fromarray(_photo(h, w, seed=h)).save(path, quality=85, subsampling=sub)
      files[path.name] = path
  Image.fromarray(_photo(264, 200)[..., 0]).save(tmp_path / 'grey.jpg', quality=85)
  files['grey.jpg'] = tmp_path / 'grey.jpg'
  buf = io.BytesIO()
  Image.fromarray(_photo(200, 264)).save(buf, 'JPEG', quality=85, subsampling='4:2:2')
  (tmp_path / '440.jpg').write_bytes(_to_h1v2(buf.getvalue()))
  files['440.jpg'] = tmp_path / '440.jpg'
  Image.fromarray(_photo(300, 200)).save(tmp_path / 'big.png')
  files['big.png'] = tmp_path / 'big.png'
  scales = set()
  for path in files.values():
    for min_side in (None, 16, 30, 60, 100):
      theirs = input_pipeline.decode_image(tf.io.read_file(str(path)), min_side).numpy()
      ours = images.read_image(str(path), min_side)
      np.testing.assert_array_equal(ours, theirs, err_msg=f'{path.name} min_side={min_side}')
      scales.add(round(max(Image.open(path).size) / max(ours.shape[:2])))
  assert scales == {1, 2, 4, 8}, scales  # every DCT scale was exercised
  batch, raw = images.load_images([str(files['big.png']), str(files['420_300x200.jpg'])], 'resize', 8,
                                  min_side=images.DCT_MIN_SIDE * 8)
  assert batch.shape == (2, 8, 8, 3) and raw[0].shape == (300, 200, 3) and raw[1].shape == (75, 50, 3)


def test_alpha_dropped_and_greyscale_expanded(tmp_path):
  rgba = _photo(6, 7, 4)
  Image.fromarray(rgba).save(tmp_path / 'a.png')
  np.testing.assert_array_equal(images.read_image(str(tmp_path / 'a.png')), rgba[..., :3])
  grey = _photo(6, 7)[..., 0]
  Image.fromarray(grey).save(tmp_path / 'g.png')
  np.testing.assert_array_equal(images.read_image(str(tmp_path / 'g.png')), np.stack([grey] * 3, -1))


def test_resize_matches_tensorflow_on_random_pixels(tf_eval):
  """Arbitrary sizes and crop fractions, including 1-pixel images and outputs."""
  _, prep = tf_eval
  rng = np.random.default_rng(1)
  worst = 0.0
  for h, w in ((1, 1), (3, 7), (32, 32), (97, 61)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for pp_eval, size, crop in PP_CASES + [('resize', 1, 1.0), ('resize_crop', (5, 3), 0.33)]:
      a, b = images.eval_preprocess(image, pp_eval, size, crop), prep(image, pp_eval, size, crop)
      assert a.shape == b.shape and a.dtype == np.float32
      worst = max(worst, float(np.abs(a - b).max()))
  assert worst <= TOL
  print(f'random pixels: max abs preprocessing difference {worst:.3g}')


# ---------------------------------------------------------------------------
# API, errors
# ---------------------------------------------------------------------------


def test_load_images_batch_and_raw(tmp_path):
  for i, (h, w) in enumerate(((10, 12), (40, 8))):
    Image.fromarray(_photo(h, w, seed=i)).save(tmp_path / f'{i}.png')
  paths = images.collect_images([str(tmp_path)])
  batch, raw = images.load_images(paths, 'resize_crop', 8, crop_fraction=images.CROP_FRACTION)
  assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.float32
  assert -1.0 <= batch.min() and batch.max() <= 1.0
  assert [r.shape for r in raw] == [(10, 12, 3), (40, 8, 3)] and raw[0].dtype == np.uint8
  np.testing.assert_array_equal(batch[1], images.eval_preprocess(raw[1], 'resize_crop', 8))
  with pytest.raises(ValueError, match='pp.eval'):
    images.eval_preprocess(raw[0], 'inception_crop', 8)
  with pytest.raises(ValueError, match='crop_fraction'):
    images.eval_preprocess(raw[0], 'resize_crop', 8, crop_fraction=0.0)


def test_collect_images_recursive_sorted_and_messages(tmp_path):
  for rel in ('b/2.PNG', 'b/1.jpg', 'a/z.webp', 'a/sub/y.gif', 'notes.txt', 'c.Bmp'):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b'x')
  found = [str(pathlib.Path(p).relative_to(tmp_path)) for p in images.collect_images([str(tmp_path)])]
  assert found == ['c.Bmp', 'a/z.webp', 'a/sub/y.gif', 'b/1.jpg', 'b/2.PNG']
  assert images.collect_images([str(tmp_path / 'notes.txt')]) == [str(tmp_path / 'notes.txt')]
  with pytest.raises(images.ImageError, match='neither an image file nor a directory'):
    images.collect_images([str(tmp_path / 'missing.jpg')])
  (tmp_path / 'empty').mkdir()
  with pytest.raises(images.ImageError, match=r'No image files \(.jpg, .jpeg'):
    images.collect_images([str(tmp_path / 'empty')])


@pytest.mark.parametrize('name,content,reason', [
    ('empty.jpg', b'', 'empty file'),
    ('text.png', b'this is not an image at all', 'not an image file'),
    ('truncated.jpg', None, 'truncated or corrupt JPEG'),
    ('truncated.png', None, 'truncated or corrupt PNG'),
])
def test_unreadable_files_raise_image_error_naming_file_and_reason(tmp_path, name, content, reason):
  path = tmp_path / name
  if content is None:
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 64)).save(buf, 'JPEG' if name.endswith('.jpg') else 'PNG')
    content = buf.getvalue()[:len(buf.getvalue()) // 2]
  path.write_bytes(content)
  with pytest.raises(images.ImageError) as e:
    images.read_image(str(path))
  assert isinstance(e.value, ValueError)
  message = str(e.value)
  assert str(path) in message and reason in message and '\n' not in message


def test_missing_file_raises_image_error(tmp_path):
  with pytest.raises(images.ImageError, match='Cannot read image file .*missing.png'):
    images.read_image(str(tmp_path / 'missing.png'))


def test_images_module_needs_no_tensorflow():
  """images.py imports nothing of TensorFlow (it is the core path's reader)."""
  tree = ast.parse((REPO / 'vit_jax' / 'images.py').read_text())
  imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  imported |= {(n.module or '').split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert not imported & {'tensorflow', 'tensorflow_datasets', 'tf_keras', 'keras'}, imported


def test_crop_fraction_default_lives_in_images_only():
  """Every default of pp.crop_fraction is images.CROP_FRACTION (no literal 0.875 in vit_jax/ or configs/)."""
  import inspect

  from vit_jax import preprocess
  assert inspect.signature(preprocess.get_eval_fn).parameters['crop_fraction'].default == images.CROP_FRACTION
  offenders = []
  for path in sorted([*(REPO / 'vit_jax').rglob('*.py'), *(REPO / 'configs').rglob('*.py')]):
    if path.name == 'images.py':
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Constant) and node.value == 0.875:
        offenders.append(f'{path.relative_to(REPO)}:{node.lineno}')
  assert not offenders, offenders
