"""vit_jax: fine-tune, train and study Vision Transformers in JAX/Flax.

Version ranges are the ones tested together (see README, "Tested versions").
Accelerators: `pip install -e '.[cuda13]'` (or cuda12, tpu) installs jax's own
accelerator extra at the pinned jax range.
"""

from setuptools import find_packages, setup

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
        'jax>=0.10.0,<0.11',
        'flax>=0.12.0,<0.13',
        'optax>=0.2.5,<0.3',
        'orbax-checkpoint>=0.12.0,<0.13',
        'clu>=0.0.12,<0.1',
        'ml_collections>=1.0,<2',
        'numpy>=1.26,<3',
        'scipy>=1.11,<2',
        'tensorflow-cpu>=2.18,<2.22',
        'tensorflow-datasets>=4.9.7,<5',
        'tensorboard>=2.18,<2.22',
        'importlib_resources',
        'pillow>=10',
        'scikit-learn>=1.3,<2',
        'matplotlib>=3.8,<4',
    ],
    extras_require={
        # jax's accelerator extras, at the jax range above.
        'cuda12': ['jax[cuda12]>=0.10.0,<0.11'],
        'cuda13': ['jax[cuda13]>=0.10.0,<0.11'],
        'tpu': ['jax[tpu]>=0.10.0,<0.11'],
        'test': [
            'pytest>=8,<10',
            'nbclient>=0.10,<0.12',
            'nbformat>=5.9,<6',
            'ipykernel>=6.29,<8',
        ],
    },
)
