#!/bin/bash
# Runs every experiment of docs/reproduction.md, one `python -m vit_jax.main`
# per table cell, each into its own workdir (re-running resumes or skips).
#
#   CIFAR10_DIR=/data/cifar10 TINY_IMAGENET_DIR=/data/tiny-imagenet-200 \
#   WORKDIRS=workdirs bash benchmarks/reproduce.sh [pretrain|table1|table5|methods|all]
#
# CIFAR10_DIR holds train/<class>/*.jpg and test/<class>/*.jpg (e.g. the JPEG
# CIFAR-10 archive extracted); TINY_IMAGENET_DIR the extracted
# tiny-imagenet-200 folder. Budgets are the ones docs/reproduction.md reports
# (sized for 2 CPU cores); raise the steps on real hardware.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CIFAR10_DIR:?set CIFAR10_DIR to the CIFAR-10 image folder}"
: "${TINY_IMAGENET_DIR:?set TINY_IMAGENET_DIR to the extracted tiny-imagenet-200}"
W=${WORKDIRS:-workdirs}
CKPT=checkpoints/SmallViT_8-tiny_imagenet-32px.npz
what=${1:-all}

run() {  # run <workdir> <args...>: skipped when the workdir has finished.
  local wd=$W/$1; shift
  if [[ -f $wd/final_metrics.json ]]; then echo "done: $wd"; return; fi
  echo "=== $(date -u +%T) $wd"
  python -m vit_jax.main --workdir="$wd" "$@"
}

# The shipped checkpoint (77 min on 2 CPU cores); `all` leaves it out: the
# Table 5 runs fine-tune the committed checkpoints/*.npz.
if [[ $what == pretrain ]]; then
  run pretrain_tiny_imagenet --config=configs/pretrain_tiny_imagenet.py
fi

# Table 1 (RPT report): from scratch on CIFAR-10 under one budget for every
# model: 250 steps of batch 128 (32,000 images, 0.64 epochs).
T1=(--config.dataset=folder:$CIFAR10_DIR --config.batch_size=128
    --config.batch_size_eval=500 --config.total_steps=250
    --config.eval_every=125 --config.checkpoint_every=125 --config.log_every=10)
if [[ $what == table1 || $what == all ]]; then
  for m in vit_ti sl_vit rot_vit resnet56; do
    run table1_${m}_cifar10 --config=configs/scratch.py:$m,cifar10 "${T1[@]}"
  done
fi

# Table 5 (RPT report): fine-tuning the shipped checkpoint vs. training the
# same model from scratch, equal steps (config.scratch_baseline).
if [[ $what == table5 || $what == all ]]; then
  # digits at 40px: the quickstart, 300 steps of batch 64.
  run quickstart --config=configs/quickstart.py
  # CIFAR-10 at 32px (the checkpoint's resolution): 400 steps of batch 128.
  run table5_cifar10 --config=configs/finetune_shipped.py:cifar10 \
      --config.dataset=folder:$CIFAR10_DIR
  # Tiny-ImageNet val at 48px (pre-training was 32px): 200 steps of batch 128.
  run table5_tiny_imagenet --config=configs/finetune_shipped.py:tiny_imagenet \
      --config.dataset=folder:$TINY_IMAGENET_DIR
fi

# The paper's remaining methods (docs/reproduction.md, sections 6-9).
if [[ $what == methods || $what == all ]]; then
  # Masked patch prediction on Tiny-ImageNet at 32px (600 steps of batch 128),
  # then the digits fine-tune of the quickstart from its encoder (and, from
  # the same config, the scratch twin).
  run mpp_tiny_imagenet --config=configs/mpp.py:tiny_imagenet \
      --config.dataset=folder:$TINY_IMAGENET_DIR --config.total_steps=600
  run mpp_finetune_digits --config=configs/finetune_shipped.py:digits \
      --config.pretrained_path=$W/mpp_tiny_imagenet/SmallViT_8.npz --config.polyak_decay=0.99
  # MPP at the supervised checkpoint's budget (4,800 steps, section 6b), its
  # fine-tune over three seeds (no scratch twin: section 10 has those).
  run mpp_tin_4800 --config=configs/mpp.py:tiny_imagenet \
      --config.dataset=folder:$TINY_IMAGENET_DIR --config.total_steps=4800 \
      --config.eval_every=800 --config.checkpoint_every=400 --config.keep_checkpoints=20
  for s in 0 1 2; do
    run ft_mpp4800_seed$s --config=configs/finetune_shipped.py:digits --config.seed=$s \
        --config.scratch_baseline=None --config.pretrained_path=$W/mpp_tin_4800/SmallViT_8.npz
  done
  # Supervised pre-training (the shipped checkpoint) on the same fine-tune,
  # with Polyak averaging (decay 0.99 over 300 steps).
  run polyak_digits --config=configs/finetune_shipped.py:digits --config.polyak_decay=0.99
  # Position-embedding ablation (Table 8) on CIFAR-10 from scratch.
  for p in none learn learn2d rel sincos2d; do
    run posemb_$p --config=configs/posemb_ablation.py:$p --config.dataset=folder:$CIFAR10_DIR
  done
  # Class token vs. global average pooling, each at two peak rates (App. D.3).
  for r in token,1e-3 gap,1e-3 gap,3e-4 token,3e-4; do
    run head_${r/,/_} --config=configs/head_ablation.py:$r --config.dataset=folder:$CIFAR10_DIR
  done
  # The learning-rate protocol (Table 4) for the digits fine-tune.
  if [[ ! -f $W/sweep_digits/sweep.json ]] || ! grep -q '"final": {' $W/sweep_digits/sweep.json; then
    python -m vit_jax.sweep --config=configs/finetune_shipped.py:digits \
        --workdir=$W/sweep_digits
  fi
fi
