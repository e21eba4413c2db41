#!/usr/bin/env bash
# Sets up kd_jax on a fresh machine and runs the distillation job end to end on real
# Fashion-MNIST: NiN teacher → Hinton-KD LeNet student → evaluation. About 15 minutes
# on a 2-core CPU. Re-running resumes (finished runs are not repeated).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  # Real Fashion-MNIST (the MNIST IDX format) from Debian; needs root.
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# The README's set-up: the pinned requirements and kd_jax itself (editable; its commands).
.venv/bin/pip install --quiet -r requirements.txt -e .

RUNS=${RUNS:-runs/quickstart}
DATA="--config.data.manual_dir=/usr/share/datasets/fashion-mnist --config.data.data_dir=$RUNS/tfds"

# The study's setting (docs/results.md): NiN width 0.25 with the seed's fc head, LeNet width 0.25.
.venv/bin/kd-jax-train --config=nin_teacher:dataset=fashion_mnist,width=0.25,head=fc,epochs=3 \
  $DATA --workdir="$RUNS/teacher"
.venv/bin/kd-jax-train --config=lenet_student:method=hinton_kd,dataset=fashion_mnist,width=0.25,epochs=2 \
  $DATA --config.teacher_workdir="$RUNS/teacher" --workdir="$RUNS/hinton_kd"
.venv/bin/kd-jax-evaluate --workdir="$RUNS/hinton_kd"
