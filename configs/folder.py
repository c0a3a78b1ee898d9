r"""Train on your own images: `configs/folder.py:/path/to/root[,scratch]`.

Layout (class names = folder names; .jpg/.jpeg/.png/.bmp, any case):

  root/train/<class>/*.jpg
  root/test/<class>/*.jpg        (no test folder? split the train folder:
                                  --config.train_split='train[:90%]'
                                  --config.test_split='train[90%:]')

Tiny-ImageNet's own layout (train/<wnid>/images, val/ + val_annotations.txt)
also works, with --config.test_split=val.

1. Fine-tune ViT-B_16 (ImageNet-21k), the paper's small-dataset recipe (App.
   B.1.1: 500 steps, warmup 50, cosine, SGD momentum 0.9, lr 0.003, clip 1.0,
   batch 512, 384px):

     gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .
     python -m vit_jax.main --config=configs/folder.py:/data/flowers \
         --workdir=/tmp/flowers --config.pretrained_path=ViT-B_16.npz

   Expected: on flower-like data the paper's 500-step fine-tunes reach ~99%
   (Flowers-102, Table 5). On a CPU, make it practical with e.g.
   --config.model_name=ViT-B_32 --config.pretrained_path=ViT-B_32.npz
   --config.image_size=224 --config.batch_size=64 --config.accum_steps=1.

2. No checkpoint, no network: `,scratch` trains a small ViT from scratch with
   the RPT report's recipe (section 4.2: AdamW 1e-3, weight decay 1e-4, 10%
   warmup, cosine; flip/rotation/zoom augmentation) at 32x32, sized for a CPU
   (500 steps of batch 128 in ~9 min on 2 busy CPU cores):

     python -m vit_jax.main --config=configs/folder.py:/data/flowers,scratch \
         --workdir=/tmp/flowers_scratch

   Expected: well above chance, far below a fine-tune (that gap is the RPT
   report's title claim). Measured on a 5,000-image CIFAR-10 subset (500 per
   class; 1,000 test images): accuracy_test 0.409 after 500 steps (0.402 at
   step 300; chance 0.10).

The class count comes from the folders; the workdir's labels.txt lists the
classes in label order, for `python -m vit_jax.predict`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  root, _, variant = (arg or '').partition(',')
  if not root:
    raise ValueError('Give the image folder: --config=configs/folder.py:/path/to/root '
                     '(with root/train/<class>/*.jpg and root/test/<class>/*.jpg).')
  if variant not in ('', 'scratch'):
    raise ValueError(f"Unknown variant {variant!r}: use 'configs/folder.py:<root>' "
                     "or 'configs/folder.py:<root>,scratch'.")
  c = common.get_config()
  c.dataset = f'folder:{root}'
  c.train_split = 'train'
  c.test_split = 'test'
  c.total_steps = 500
  c.eval_every = 100
  c.checkpoint_every = 100
  if variant != 'scratch':
    c.model_name = 'ViT-B_16'
    c.lr.base = 0.003
    c.lr.warmup_steps = 50
    return c

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
