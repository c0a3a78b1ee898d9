"""vit_jax: fine-tune, train and study Vision Transformers in JAX/Flax.

Two layers of dependencies (README, "Installing"):

  pip install -e .            core: models, checkpoints (load, convert, inspect),
                              download, predict, analysis, export, benchmark.
                              No TensorFlow: installs wherever jax does
                              (Apple Silicon, aarch64, the newest Python).
  pip install -e '.[train]'   adds what training and evaluation on real data
                              need: tf.data, TFDS, TensorBoard.
  pip install -e '.[test]'    everything above plus the test tools.

Accelerators: `pip install -e '.[train,cuda13]'` (or cuda12, tpu) installs
jax's own accelerator extra at the pinned jax range.

Version ranges: floors are the versions of constraints/lowest.txt, proven
together by `constraints/check.sh lowest`; constraints/newest.txt is the newest
set proven (README, "Tested versions"). Caps policy: libraries that break their
API in minor releases (jax, flax, optax, orbax, TensorFlow and TensorBoard,
which moves in lockstep with TF) are capped one minor version ahead of the
newest tested one (jax 0.10 tested: jax<0.12 lets next month's 0.11 in); libraries that keep their API across minor releases (numpy,
scipy, matplotlib, scikit-learn, ml_collections, TFDS) are capped at their next major
version only, and pillow and absl-py not at all (the parts used here have been
stable for a decade).
"""

from setuptools import find_packages, setup

JAX_RANGE = '>=0.10.0,<0.12'

setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformer (ViT) in JAX/Flax: official checkpoints, '
    'fine-tuning, training from scratch, Rotated Patch Tokenization.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',   # jax 0.10's own floor.
    packages=find_packages(include=['vit_jax', 'vit_jax.*']),
    install_requires=[
        'jax' + JAX_RANGE,
        'flax>=0.12.0,<0.14',
        'optax>=0.2.5,<0.4',
        'orbax-checkpoint>=0.12.0,<0.14',
        'ml_collections>=1.0,<2',
        # Parameter tables: the training log, `python -m vit_jax.checkpoint`.
        'clu>=0.0.12,<0.1',
        'absl-py>=1.0',       # flags and logging of the command-line tools.
        'numpy>=2.0,<3',      # 2.0: jax 0.10's floor.
        'scipy>=1.14,<2',     # 1.14: jax 0.10's floor.
        # Image reading and eval preprocessing for predict/analysis
        # (vit_jax/images.py, TensorFlow-free).
        'pillow>=10',
        # Core, not [train]: analysis draws its attention maps and plots with it.
        'matplotlib>=3.9,<4',
    ],
    extras_require={
        # Training and evaluation on real data: the tf.data input pipeline,
        # TFDS datasets, TensorBoard summaries.
        'train': [
            # 2.20: 2.18 needs ml-dtypes < 0.5 (jax 0.10: >= 0.5), 2.19's
            # decode_image cannot read WebP (folder datasets accept it).
            'tensorflow-cpu>=2.20,<2.23',
            'tensorboard>=2.20,<2.23',
            'tensorflow-datasets>=4.9.7,<5',
            # [train], not core: only the 'digits' training dataset loads from it.
            'scikit-learn>=1.5,<2',
        ],
        # jax's accelerator extras, at the jax range above.
        'cuda12': ['jax[cuda12]' + JAX_RANGE],
        'cuda13': ['jax[cuda13]' + JAX_RANGE],
        'tpu': ['jax[tpu]' + JAX_RANGE],
        # The tests exercise everything, training included.
        'test': [
            'vit_jax[train]',
            'pytest>=8,<10',
            'nbclient>=0.10,<0.12',
            'nbformat>=5.9,<6',
            'ipykernel>=6.29,<8',
        ],
    },
)
