"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words").

Pure-functional Flax linen modules whose parameter tree *is* the official
checkpoint tree (``gs://vit_models/imagenet21k/*.npz``): the submodule names
below (``embedding``, ``cls``, ``Transformer/posembed_input``,
``encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3}``, ``encoder_norm``, ``pre_logits``, ``head``) are the keys of those
files, so loading and saving is flatten/unflatten.

Intermediates come out through ``self.sow('intermediates', ...)``; they cost
nothing unless ``apply(..., mutable=['intermediates'])`` asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled', 'distill')
# Paper App. D.4 / Table 8: 1-D learned (the default), 2-D learned (row and
# column tables of D/2 each, concatenated), relative (a learned bias on the
# attention logits), fixed 2-D sine-cosine, and none (a bag of patches).
POSEMBS = ('learn', 'learn2d', 'rel', 'sincos2d', 'none')
# 'auto': cuDNN flash attention where it applies (GPU, bf16/fp16), else einsum.
ATTENTIONS = ('auto', 'einsum', 'xla', 'cudnn')
# The cuDNN kernel wants the token axis padded: ViT's 197 / 577 tokens become
# 208 / 592, the padded keys masked through `key_value_seq_lengths`. 16, not
# 64 or 128: the q/k/v and out projections run on the padded tokens too (one
# H100, ViT-B/16 train step: +4.5% at 224 over 64, +0.6% at 384; RESULTS.md).
ATTENTION_PAD_MULTIPLE = 16
# Rematerialisation policies for `remat` (besides 'full': save nothing).
REMAT_POLICIES = ('full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'nothing_saveable', 'everything_saveable')


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
  """`key` of a dict, ConfigDict or object (the original passes both); missing
  or None gives `default`. The one such reader of the package."""
  if cfg is None:
    return default
  try:
    value = cfg[key]
  except (KeyError, TypeError, AttributeError, IndexError):
    value = getattr(cfg, key, None)
  return default if value is None else value


# Tokens before the patch tokens, per classifier: the class token, and DeiT's
# distillation token. The one source for every module that counts them.
PREFIX_TOKENS = {'token': 1, 'token_unpooled': 1, 'distill': 2}


def num_prefix_tokens(model_config: Any) -> int:
  """Class (+ distillation) tokens of a model config, module or classifier name."""
  classifier = (model_config if isinstance(model_config, str) else
                config_value(model_config, 'classifier', 'token') or 'token')
  return PREFIX_TOKENS.get(classifier, 0)


def token_stride(model_config: Any) -> tuple[int, int]:
  """Input pixels per patch token, (rows, columns): the patch size times the
  hybrid ResNet's downsampling (root conv /2, max-pool /2, every later stage /2)."""
  ph, pw = tuple(config_value(config_value(model_config, 'patches'), 'size'))
  resnet = config_value(model_config, 'resnet')
  s = 4 * 2 ** (len(tuple(config_value(resnet, 'num_layers'))) - 1) if resnet else 1
  return ph * s, pw * s


def sincos2d(h: int, w: int, dim: int, temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, shape (h*w, dim) (paper App. D.4)."""
  if dim % 4:
    raise ValueError(f'sincos2d needs a width divisible by 4, got {dim}.')
  y, x = np.mgrid[:h, :w]
  omega = 1. / temperature**(np.arange(dim // 4) / (dim // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], 1).astype(np.float32)


class IdentityLayer(nn.Module):
  """Named identity, so that `pre_logits` is sow-able even without a Dense."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding `pos_embedding` of shape (1, T, D)."""
  posemb_init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if (self.has_variable('params', 'pos_embedding') and
        self.get_variable('params', 'pos_embedding').shape[1:] != x.shape[1:]):
      pe = self.get_variable('params', 'pos_embedding')
      raise ValueError(
          f'Position embedding has {pe.shape[1]} tokens but the input gives '
          f'{x.shape[1]}. Fine-tuning at a new resolution? Resize the '
          'embedding with vit_jax.checkpoint.interpolate_posembed (done by '
          'checkpoint.load_pretrained).')
    pe = self.param('pos_embedding', self.posemb_init, (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)


def learn2d_table(row: Array, col: Array) -> Array:
  """(1, gh, D/2) row and (1, gw, D/2) column tables -> (1, gh*gw, D), raster order.

  The patch at (i, j) gets concat(row[i], col[j]) (paper App. D.4).
  """
  gh, gw = row.shape[1], col.shape[1]
  grid = jnp.concatenate([jnp.broadcast_to(row[:, :, None], (1, gh, gw, row.shape[-1])),
                          jnp.broadcast_to(col[:, None, :], (1, gh, gw, col.shape[-1]))], -1)
  return grid.reshape(1, gh * gw, -1)


class AddPositionEmbs2D(nn.Module):
  """Learned 2-D position embedding (paper App. D.4, "2-D Pos. Emb.").

  Params: `row_embedding` (1, gh, D/2), `col_embedding` (1, gw, D/2) and, for
  models with a class token, `prefix_embedding` (1, num_prefix, D), the
  prefix tokens' own embedding (they sit on no grid cell).
  """
  grid: tuple[int, int]
  num_prefix_tokens: int = 0
  posemb_init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    if d % 2:
      raise ValueError(f'posemb=learn2d needs an even width, got {d}.')
    (gh, gw), p = self.grid, self.num_prefix_tokens
    if self.has_variable('params', 'row_embedding'):
      have = (self.get_variable('params', 'row_embedding').shape[1],
              self.get_variable('params', 'col_embedding').shape[1])
      if have != (gh, gw):
        raise ValueError(
            f'2-D position embedding is for a {have[0]}x{have[1]} grid but the input gives '
            f'{gh}x{gw}. Resize it with checkpoint.load_pretrained.')
    row = self.param('row_embedding', self.posemb_init, (1, gh, d // 2))
    col = self.param('col_embedding', self.posemb_init, (1, gw, d // 2))
    pe = learn2d_table(row, col)
    if p:
      pe = jnp.concatenate([self.param('prefix_embedding', self.posemb_init, (1, p, d)), pe], 1)
    return x + pe.astype(x.dtype)


def relative_offsets(num_tokens: int) -> np.ndarray:
  """(T, T) index into a (2T-1)-row table of the offset q - k, shifted to >= 0."""
  pos = np.arange(num_tokens)
  return pos[:, None] - pos[None, :] + num_tokens - 1


class _Weights(nn.Module):
  """Declares a `kernel` and `bias` pair without applying them.

  Lets the attention fuse q/k/v into one matmul while the parameter tree keeps
  the checkpoint's separate `query`, `key`, `value` entries.
  """
  kernel_shape: Sequence[int]
  bias_shape: Sequence[int]
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    return (self.param('kernel', self.kernel_init, tuple(self.kernel_shape)),
            self.param('bias', nn.initializers.zeros, tuple(self.bias_shape)))


def _qkv_init(key, shape, dtype=jnp.float32):
  # Flax DenseGeneral's xavier init over (in, heads*head_dim), as in the original.
  d, h, hd = shape
  return nn.initializers.xavier_uniform()(key, (d, h * hd), dtype).reshape(shape)


def _out_init(key, shape, dtype=jnp.float32):
  h, hd, d = shape
  return nn.initializers.xavier_uniform()(key, (h * hd, d), dtype).reshape(shape)


def _cuda_capability() -> tuple[int, int] | None:
  """The default device's NVIDIA compute capability, e.g. (9, 0); None elsewhere."""
  if jax.default_backend() != 'gpu':
    return None
  try:
    major, minor = str(getattr(jax.devices()[0], 'compute_capability', '')).split('.')[:2]
    return int(major), int(minor)
  except ValueError:
    return None   # ROCm names its GPUs 'gfx90a', ...


def has_16bit_units() -> bool:
  """Whether the default device multiplies bf16/fp16 on dedicated units: a TPU,
  an NVIDIA GPU of compute capability 8.0+ (Ampere: bf16 tensor cores, and what
  cuDNN's flash attention needs) or an AMD GPU; not a CPU, not a T4 or V100."""
  if jax.default_backend() == 'cpu':
    return False
  capability = _cuda_capability()
  return capability is None or capability >= (8, 0)


def _resolve_attention(attention: str, dtype: Dtype) -> str:
  """'auto' -> 'cudnn' on an NVIDIA GPU with flash attention (compute
  capability 8.0+) and a 16-bit dtype, else 'einsum'."""
  if attention not in ATTENTIONS:
    raise ValueError(f'attention must be one of {ATTENTIONS}, got {attention!r}')
  if attention != 'auto':
    return attention
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  capability = _cuda_capability()
  return 'cudnn' if half and capability is not None and capability >= (8, 0) else 'einsum'


def fused_attention(x: Array, w: Array, b: Array, out_w: Array, out_b: Array, *,
                    implementation: str, pad_multiple: int | None = None) -> Array:
  """The attention layer through `jax.nn.dot_product_attention`: x (B, T, D),
  q/k/v kernels stacked as w (D, 3, heads, head_dim) and b (3, heads,
  head_dim), the out projection out_w (heads, head_dim, D), out_b (D,) ->
  (B, T, D); softmax(q k^T / sqrt(head_dim)) v, as the einsum path.

  The token axis of x is padded once to a multiple of `pad_multiple`
  (default ATTENTION_PAD_MULTIPLE; cuDNN refuses ViT's 197 or 577 tokens as
  they are), projected by one matmul straight into the kernel's (B, T, 3,
  heads, head_dim) layout, the padded keys are masked by their length, and
  the padding is sliced off after the out projection, so the result equals
  unpadded attention. On an H100 the ViT-B/16 train step ran 5.8% / 6.6%
  faster at 224 / 384 this way than padding q, k and v after a heads-major
  projection (fewer layout copies, benchmarks/RESULTS.md), despite the
  projections running on the padded tokens. `implementation` is
  'cudnn' (flash attention on NVIDIA GPUs) or 'xla' (the same maths on any
  backend; the CPU tests check it against the einsum path).
  """
  t = x.shape[1]
  multiple = pad_multiple or ATTENTION_PAD_MULTIPLE
  x = jnp.pad(x, ((0, 0), (0, -(-t // multiple) * multiple - t), (0, 0)))
  qkv = jnp.einsum('btd,dkhe->btkhe', x, w) + b
  lengths = jnp.full((x.shape[0],), t, jnp.int32)
  out = jax.nn.dot_product_attention(
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, implementation=implementation)
  return (jnp.einsum('bthe,hed->btd', out, out_w) + out_b)[:, :t]


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention, parameter-compatible with the original.

  q/k/v kernels are (D, heads, head_dim), `out` is (heads, head_dim, D). q is
  scaled by 1/sqrt(head_dim). `locality=True` is the Locality Self-Attention of
  SL-ViT (Lee et al. 2021): a learnable temperature (init sqrt(head_dim)) and
  the diagonal (each token's attention to itself) masked out.

  `attention` picks the kernel (ATTENTIONS): `fused_attention`
  needs no attention weights, so the einsum path is kept for `locality` and
  `relative`, for attention dropout at train time, and whenever the caller
  asks for the `intermediates` collection (the analysis tools read the weights).
  With 'auto', a shape the cuDNN kernel refuses (NotImplementedError: e.g. a
  head dim it does not take on this GPU) also runs the einsum path; a kernel
  named explicitly raises.

  `relative=True` is the paper's 1-D relative attention (App. D.4): every
  offset q - k of the raster order (class token first) has a learned key
  `rel_embedding` of shape (2T-1, heads, head_dim); the query attends to
  those keys too, and the resulting logits are added to the content logits
  before the softmax.
  """
  num_heads: int
  dropout_rate: float = 0.
  locality: bool = False
  relative: bool = False
  dtype: Dtype = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by num_heads={self.num_heads}')
    hd = d // self.num_heads
    shapes = dict(kernel_shape=(d, self.num_heads, hd), bias_shape=(self.num_heads, hd),
                  kernel_init=_qkv_init)
    q_w, q_b = _Weights(**shapes, name='query')()
    k_w, k_b = _Weights(**shapes, name='key')()
    v_w, v_b = _Weights(**shapes, name='value')()
    o_w, o_b = _Weights((self.num_heads, hd, d), (d,), _out_init, name='out')()

    w = jnp.stack([q_w, k_w, v_w], axis=1).astype(self.dtype)    # (D, 3, H, hd)
    b = jnp.stack([q_b, k_b, v_b], axis=0).astype(self.dtype)    # (3, H, hd)
    impl = _resolve_attention(self.attention, self.dtype)
    dropout = not deterministic and self.dropout_rate > 0
    if (impl != 'einsum' and not self.locality and not self.relative and not dropout
        and not self.is_mutable_collection('intermediates')):
      try:
        return fused_attention(x.astype(self.dtype), w, b, o_w.astype(self.dtype),
                               o_b.astype(self.dtype), implementation=impl)
      except NotImplementedError:   # The kernel refused this shape, GPU or cuDNN:
        if self.attention != 'auto':   # 'auto' means "cuDNN where it runs".
          raise

    # One fused matmul for q, k and v, written heads-major (k, b, h, t, e) so
    # the two attention matmuls below have leading batch dims (b, h) and need
    # no transposes: ~1.8x faster inference on CPU for many narrow heads
    # (SmallViT: 12 heads of 16), neutral for ViT-Ti/B (benchmarks/RESULTS.md).
    qkv = jnp.einsum('btd,dkhe->kbhte', x.astype(self.dtype), w) + b[:, None, :, None]
    q, k, v = qkv[0], qkv[1], qkv[2]                             # (B, H, T, hd)

    if self.locality:
      temperature = self.param('temperature', nn.initializers.constant(np.sqrt(hd)), ())
      logits = jnp.einsum('bhqe,bhke->bhqk', q, k) / temperature.astype(self.dtype)
      eye = jnp.eye(x.shape[1], dtype=bool)
      logits = jnp.where(eye, jnp.finfo(logits.dtype).min, logits)
    else:
      logits = jnp.einsum('bhqe,bhke->bhqk', q / np.sqrt(hd).astype(self.dtype), k)
    if self.relative:
      t = x.shape[1]
      if (self.has_variable('params', 'rel_embedding') and
          self.get_variable('params', 'rel_embedding').shape[0] != 2 * t - 1):
        raise ValueError(
            f'relative position embedding has '
            f'{self.get_variable("params", "rel_embedding").shape[0]} offsets, the input of '
            f'{t} tokens needs {2 * t - 1}: use the resolution it was trained at.')
      rel = self.param('rel_embedding', nn.initializers.normal(stddev=0.02),
                       (2 * t - 1, self.num_heads, hd))
      rel_logits = jnp.einsum('bhqe,rhe->bhqr', q / np.sqrt(hd).astype(self.dtype),
                              rel.astype(self.dtype))                # (B, H, T, 2T-1)
      logits = logits + rel_logits[:, :, np.arange(t)[:, None], relative_offsets(t)]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    self.sow('intermediates', 'attention_weights', weights)
    if dropout:
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
    out = jnp.einsum('bhqk,bhke->bhqe', weights, v)
    return jnp.einsum('bhqe,hed->bqd', out, o_w.astype(self.dtype)) + o_b.astype(self.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh approximation, as the original) -> Dense."""
  mlp_dim: int
  dropout_rate: float = 0.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    dense = lambda n, name: nn.Dense(
        n, dtype=self.dtype, name=name, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  locality_attention: bool = False
  relative_posemb: bool = False
  dtype: Dtype = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        locality=self.locality_attention, relative=self.relative_posemb, dtype=self.dtype,
        attention=self.attention,
        name='MultiHeadDotProductAttention_1')(y, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name='MlpBlock_3')(
        y, deterministic=deterministic)
    return x + y


class Encoder(nn.Module):
  """Position embedding + `num_layers` blocks + final `encoder_norm`."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  locality_attention: bool = False
  posemb: str = 'learn'
  grid: tuple[int, int] = (0, 0)
  num_prefix_tokens: int = 0
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  remat: str | None = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.posemb == 'learn':
      x = AddPositionEmbs(name='posembed_input')(x)
    elif self.posemb == 'learn2d':
      x = AddPositionEmbs2D(tuple(self.grid), self.num_prefix_tokens, name='posembed_input')(x)
    elif self.posemb == 'sincos2d':
      pe = sincos2d(*self.grid, x.shape[-1])
      pe = np.concatenate([np.zeros((self.num_prefix_tokens, x.shape[-1]), np.float32), pe])
      x = x + jnp.asarray(pe, x.dtype)[None]
    elif self.posemb not in ('none', 'rel'):  # 'rel' lives in the attention.
      raise ValueError(f'posemb must be one of {POSEMBS}, got {self.posemb!r}')
    self.sow('intermediates', 'encoder_input', x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block = Encoder1DBlock
    if self.remat:
      # Recompute each block's activations in the backward pass instead of
      # keeping them (memory for big models); the parameter tree is unchanged.
      if self.remat not in REMAT_POLICIES:
        raise ValueError(f'remat must be None or one of {REMAT_POLICIES}, got {self.remat!r}')
      policy = (None if self.remat == 'full'
                else getattr(jax.checkpoint_policies, self.remat))
      block = nn.remat(Encoder1DBlock, policy=policy, static_argnums=(2,))
    for i in range(self.num_layers):
      x = block(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          locality_attention=self.locality_attention,
          relative_posemb=self.posemb == 'rel', dtype=self.dtype,
          attention=self.attention, name=f'encoderblock_{i}')(x, not train)
      self.sow('intermediates', 'block_outputs', x)
    return nn.LayerNorm(epsilon=1e-6, name='encoder_norm')(x.astype(jnp.float32))


class VisionTransformer(nn.Module):
  """ViT with the original's constructor (``VisionTransformer(**config)``).

  Attributes:
    num_classes: size of the zero-initialised `head`; None for a feature
      extractor (returns the pre-logits).
    patches: {'size': (ph, pw)}.
    transformer: {'mlp_dim', 'num_heads', 'num_layers', 'dropout_rate',
      'attention_dropout_rate'} and optionally 'locality_attention' (SL-ViT).
    hidden_size: token width D.
    resnet: None, or {'num_layers': (...), 'width_factor': w} for the hybrid.
    representation_size: width of the `pre_logits` Dense + tanh, or None.
    classifier: 'token' (class token), 'gap' (mean of tokens, no class
      token; paper App. D.3), 'unpooled' / 'token_unpooled' (per-token
      outputs), 'distill' (DeiT: class + distillation tokens).
    posemb: 'learn' (1-D, default), 'learn2d' (row + column), 'rel'
      (relative attention bias), 'sincos2d' (fixed) or 'none' (paper App. D.4).
    tokenizer: None (patch conv) or a dict {'type': 'spt' | 'rpt', ...}.
    dtype: computation dtype (params stay float32). With bfloat16 the
      matmuls and convolutions run in bf16; LayerNorm statistics, the
      softmax, `encoder_norm`, `pre_logits`, the head and so the logits stay
      float32.
    attention: attention kernel, one of ATTENTIONS ('auto': cuDNN flash
      attention on GPUs in bf16/fp16, the einsum path elsewhere).
    remat: None, or a policy of REMAT_POLICIES: recompute each encoder block
      in the backward pass (memory for ViT-L/H at 384).
  """
  num_classes: int | None
  patches: Any
  transformer: Any
  hidden_size: int
  resnet: Any | None = None
  representation_size: int | None = None
  classifier: str = 'token'
  head_bias_init: float = 0.
  model_name: str | None = None
  posemb: str = 'learn'
  tokenizer: Any | None = None
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  remat: str | None = None

  @nn.compact
  def __call__(self, inputs: Array, *, train: bool = False,
               corruption: Any | None = None) -> Array:
    """Logits (or features). `corruption` (masked patch prediction, see
    vit_jax/models/mpp.py) replaces patch embeddings before the class token
    and position embeddings are added; it creates the `mask_embedding` param."""
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier must be one of {CLASSIFIERS}, got {self.classifier!r}')
    if inputs.ndim != 4:
      raise ValueError(f'expected NHWC images, got shape {inputs.shape}')
    x = inputs

    if self.resnet is not None:
      from vit_jax.models import resnet  # pylint: disable=g-import-not-at-top
      x = resnet.backbone(x, num_layers=tuple(config_value(self.resnet, 'num_layers')),
                          width_factor=config_value(self.resnet, 'width_factor', 1),
                          dtype=self.dtype)
      self.sow('intermediates', 'backbone_features', x)

    ph, pw = tuple(config_value(self.patches, 'size'))
    if self.tokenizer is None:
      x = nn.Conv(self.hidden_size, (ph, pw), strides=(ph, pw), padding='VALID',
                  dtype=self.dtype, name='embedding')(x)
    else:
      from vit_jax.models import embeddings  # pylint: disable=g-import-not-at-top
      x = embeddings.tokenize(x, self.tokenizer, patch_size=(ph, pw),
                              hidden_size=self.hidden_size, train=train, dtype=self.dtype)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    self.sow('intermediates', 'patch_tokens', x)
    if corruption is not None:  # Paper App. B.1.2.
      from vit_jax.models import mpp  # pylint: disable=g-import-not-at-top
      mask = self.param('mask_embedding', nn.initializers.normal(stddev=0.02), (1, 1, c))
      x = mpp.apply_corruption(x, corruption, mask)

    num_prefix = num_prefix_tokens(self.classifier)
    if num_prefix:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
      prefix = [cls]
      if self.classifier == 'distill':
        prefix.append(self.param('dist', nn.initializers.zeros, (1, 1, c)))
      prefix = jnp.concatenate(prefix, axis=1).astype(x.dtype)
      x = jnp.concatenate([jnp.tile(prefix, [n, 1, 1]), x], axis=1)

    t = self.transformer
    x = Encoder(
        num_layers=config_value(t, 'num_layers'), mlp_dim=config_value(t, 'mlp_dim'),
        num_heads=config_value(t, 'num_heads'), dropout_rate=config_value(t, 'dropout_rate', 0.),
        attention_dropout_rate=config_value(t, 'attention_dropout_rate', 0.),
        locality_attention=bool(config_value(t, 'locality_attention', False)),
        posemb=self.posemb, grid=(h, w), num_prefix_tokens=num_prefix, dtype=self.dtype,
        attention=self.attention, remat=self.remat, name='Transformer')(x, train=train)
    self.sow('intermediates', 'encoder_out', x)

    if self.classifier in ('token', 'distill'):
      x = x[:, :num_prefix]                         # (B, 1 or 2, D)
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1, keepdims=True)
    # 'unpooled' / 'token_unpooled': keep every token.

    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, name='pre_logits')(x))
    else:
      x = IdentityLayer(name='pre_logits')(x)
    pooled = self.classifier in ('token', 'gap', 'distill')
    self.sow('intermediates', 'representation', x[:, 0] if pooled else x)  # = pre_logits

    if not self.num_classes:
      return x[:, 0] if pooled else x
    head = nn.Dense(self.num_classes, name='head', kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.constant(self.head_bias_init))
    if self.classifier == 'distill':
      # DeiT: `head` on the class token, `head_dist` on the distillation token.
      logits = jnp.stack([head(x[:, 0]), nn.Dense(
          self.num_classes, name='head_dist', kernel_init=nn.initializers.zeros)(x[:, 1])], 1)
      return logits if train else logits.mean(axis=1)
    x = head(x)
    return x[:, 0] if pooled else x


def get_intermediates(model: nn.Module, params: Any, images: Array,
                      **kwargs: Any) -> tuple[Array, dict[str, Any]]:
  """Runs the model and returns (output, {'path/name': value}).

  Sown values come back as tuples; single sows are unwrapped, repeated sows
  (e.g. `Transformer/block_outputs`) stay a tuple in call order.
  """
  out, state = model.apply({'params': params}, images, mutable=['intermediates'], **kwargs)
  flat = {}
  for path, value in jax.tree_util.tree_flatten_with_path(
      state['intermediates'], is_leaf=lambda v: isinstance(v, tuple))[0]:
    key = '/'.join(str(getattr(p, 'key', p)) for p in path)
    flat[key] = value[0] if len(value) == 1 else value
  return out, flat


def attention_weights(intermediates: dict[str, Any]) -> list[Array]:
  """Per-layer attention weights (B, heads, T, T), ordered by layer."""
  found = {}
  for key, value in intermediates.items():
    parts = key.split('/')
    if parts[-1] == 'attention_weights':
      layer = next(p for p in parts if p.startswith('encoderblock_'))
      found[int(layer.split('_')[1])] = value
  return [found[i] for i in sorted(found)]
