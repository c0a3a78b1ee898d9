#!/usr/bin/env bash
# Proves one end of setup.py's version ranges: installs vit_jax[test] pinned by
# constraints/<set>.txt into a fresh venv and runs a fast test subset there.
#
#   constraints/check.sh lowest|newest [VENV_ROOT]
#
# The venv is VENV_ROOT/<set> (default ${TMPDIR:-/tmp}/vit_jax_constraints);
# an existing one is reused (pip then only checks the pins). Python:
# $PYTHON (default python3); lowest.txt is meant for Python 3.11, jax's floor.
set -euo pipefail
set_name=${1:?usage: constraints/check.sh lowest|newest [VENV_ROOT]}
repo=$(cd "$(dirname "$0")/.." && pwd)
pins="$repo/constraints/$set_name.txt"
[[ -f $pins ]] || { echo "no such constraint set: $pins" >&2; exit 2; }
venv="${2:-${TMPDIR:-/tmp}/vit_jax_constraints}/$set_name"

[[ -x $venv/bin/python ]] || "${PYTHON:-python3}" -m venv "$venv"
start=$SECONDS
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e "$repo[test]" -c "$pins"
echo "install: $((SECONDS - start)) s"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import sys
print('python', sys.version.split()[0])
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'scipy',
             'pillow', 'matplotlib', 'ml_collections', 'absl-py', 'tensorflow-cpu', 'tensorboard',
             'tensorflow-datasets', 'tensorflow-metadata', 'protobuf', 'clu',
             'scikit-learn', 'pytest'):
  try:
    print(f'{name:22s} {md.version(name)}')
  except md.PackageNotFoundError:
    print(f'{name:22s} (not installed)')
PY

# A few minutes on 2 CPU cores: images vs TF, checkpoints, model, the input
# pipeline (TFDS mock data included), one short training run.
cd "$repo"
JAX_PLATFORMS=cpu "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_images.py tests/test_checkpoint.py tests/test_shipped_checkpoint.py tests/test_vit.py \
  tests/test_input_pipeline.py tests/test_preprocess.py
