r"""Fine-tune any checkpoint on your own images: `configs/folder.py:<root>[,scratch]`.

  python -m vit_jax.main --config=configs/folder.py:/data/flowers \
      --config.pretrained_path=checkpoints/SmallViT_8-tiny_imagenet-32px.npz \
      --workdir=/tmp/flowers

Layouts (class names = folder names, in sorted order = label order; files
.jpg .jpeg .png .bmp .gif .webp in any case; sub-folders of a class count):

  root/train/<class>/*  + root/test/<class>/* or root/val/<class>/*
  root/train/<class>/*  alone, or flat root/<class>/*: a deterministic,
                        stratified split holds out 10% of every class as
                        'test' (seeded; logged, and listed in
                        workdir/test_files.txt)

Every image is decoded once before training (in parallel, cached in the
workdir); undecodable files stop the run with the full list, or are left out
with --config.skip_bad_images=True.

What the checkpoint decides (vit_jax.config_schema.resolve_config):
* The architecture: from the sidecar .json written next to every exported
  .npz (and shipped next to checkpoints/*.npz), else from the one preset with
  the same parameter tree. --config.model_name may still be given; it must fit.
* The recipe, by the model's size (`RECIPES` below; any value given on the
  command line wins, e.g. --config.image_size=64 or --config.recipe=paper):
  - 'cpu' (up to 10M parameters, e.g. the shipped SmallViT_8): 32px (its
    pre-training resolution), batch 128, 300 steps, lr 0.03 (the rate the
    paper's lr protocol picks for this checkpoint on digits, CIFAR-10 and
    Tiny-ImageNet, docs/reproduction.md section 9), RPT augmentation.
    MEASURED on 2 CPU cores: CIFAR-10 from ../shared/data as a folder (train/
    + test/, 50,000 / 10,000 JPEGs): accuracy_test 0.529 after 300 steps
    (0.516 with lr 0.01), 1:59 wall for the whole command on quiet cores
    (README "Your own images"). On a GPU this model is input-bound.
  - 'paper' (ViT-B/L/H and anything else above 10M): the ViT paper's
    small-dataset recipe (App. B.1.1, Table 4: 500 steps, batch 512, 384px,
    SGD momentum 0.9, lr 0.003, warm-up 10% then cosine, clip 1.0, inception
    crop + flip), with 8-step gradient accumulation. Expected: on
    flower-like data the paper's 500-step fine-tunes of ViT-B/16 reach ~99%
    (Flowers-102, Table 5). Time, from measured step speeds (not a measured
    fine-tune): ~4.2 min of steps on one H100 (ViT-B/16 training at 384px in
    bfloat16: 1,008 img/s, benchmarks/results/h100-2026-11-26c-gpu_vs_timm.txt);
    on 2 CPU cores ~0.3 img/s (44x the FLOPs of ViT-Ti/16 at 224px, which
    trains at 13.6 img/s there), i.e. days: not a CPU recipe.

The class count comes from the folders unless --config.num_classes is set;
the workdir's labels.txt lists the classes in label order, for
`python -m vit_jax.predict --workdir=DIR image.jpg`.

No checkpoint, no network: `,scratch` trains a small ViT from scratch with
the RPT report's recipe (section 4.2: AdamW 1e-3, weight decay 1e-4, 10%
warmup, cosine; flip/rotation/zoom augmentation) at 32x32, sized for a CPU
(500 steps of batch 128 in ~9 min on 2 busy CPU cores):

  python -m vit_jax.main --config=configs/folder.py:/data/flowers,scratch \
      --workdir=/tmp/flowers_scratch

Expected: well above chance, far below a fine-tune (that gap is the RPT
report's title claim). Measured on a 5,000-image CIFAR-10 subset (500 per
class; 1,000 test images): accuracy_test 0.409 after 500 steps (0.402 at
step 300; chance 0.10).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

# Recipes by model size: the smallest whose max_params holds the model's
# parameter count (head and position embeddings excluded) fills every value
# left None below (vit_jax.config_schema.resolve_config).
RECIPES = {
    'cpu': {'max_params': 10_000_000, 'image_size': 32, 'batch_size': 128,
            'batch_size_eval': 250, 'accum_steps': 1, 'total_steps': 300,
            'lr': {'base': 0.03}, 'pp': {'train': 'rpt_augment'}},
    'paper': {'max_params': 10 ** 12, 'image_size': 384, 'batch_size': 512,
              'batch_size_eval': 512, 'accum_steps': 8, 'total_steps': 500,
              'lr': {'base': 0.003}, 'pp': {'train': 'inception_crop'}},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  root, _, variant = (arg or '').partition(',')
  if not root:
    raise ValueError('Give the image folder: --config=configs/folder.py:/path/to/root '
                     '(root/<class>/*.jpg, or root/train/<class>/*.jpg [+ root/test/...]).')
  if variant not in ('', 'scratch'):
    raise ValueError(f"Unknown variant {variant!r}: use 'configs/folder.py:<root>' "
                     "or 'configs/folder.py:<root>,scratch'.")
  c = common.get_config()
  c.dataset = f'folder:{root}'
  c.train_split = 'train'
  c.test_split = 'test'
  c.eval_every = 100
  c.checkpoint_every = 100
  if variant != 'scratch':
    # The architecture comes from the checkpoint (config_schema.resolve_config).
    c.model_name = None
    c.pretrained_path = common.IMAGENET21K_DIR + '/ViT-B_16.npz'
    c.recipe = config_dict.placeholder(str)  # None: by the model's size.
    c.recipes = ml_collections.ConfigDict(RECIPES)
    for key in ('image_size', 'batch_size', 'batch_size_eval', 'accum_steps',
                'total_steps'):
      c[key] = config_dict.placeholder(int)
    c.lr = ml_collections.ConfigDict({
        'base': config_dict.placeholder(float),
        'warmup_steps': 0.1,  # 10% of total_steps (paper: 50 of 500).
        'decay_type': 'cosine', 'linear_end': 1e-5})
    c.pp.train = config_dict.placeholder(str)
    c.pp.rotation_factor = 0.02  # rpt_augment's factors (configs/scratch.py)
    c.pp.zoom_factor = 0.2
    c.optim.momentum_dtype = 'float32'
    return c

  c.total_steps = 500
  c.model_name = None
  c.model = ml_collections.ConfigDict({
      'model_name': 'vit-scratch',
      'patches': {'size': (4, 4)},
      'hidden_size': 64,
      'transformer': {'mlp_dim': 128, 'num_heads': 4, 'num_layers': 4,
                      'dropout_rate': 0.0, 'attention_dropout_rate': 0.0},
      'classifier': 'token',
      'representation_size': None,
      'resnet': None,
  })
  c.pretrained_path = None
  c.image_size = 32
  c.pp.train = 'rpt_augment'
  c.pp.eval = 'resize'
  c.batch_size = 128
  c.batch_size_eval = 256
  c.accum_steps = 1
  c.lr.base = 1e-3
  c.lr.warmup_steps = c.get_ref('total_steps') // 10
  c.optim = ml_collections.ConfigDict({
      'name': 'adamw', 'weight_decay': 1e-4, 'grad_clip_norm': 1.0,
      'momentum_dtype': 'float32'})
  c.log_every = 20
  return c
