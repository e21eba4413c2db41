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
.venv/bin/pip install --quiet -r requirements.txt

PY=.venv/bin/python
RUNS=${RUNS:-runs/quickstart}
DATA="--config.data.manual_dir=/usr/share/datasets/fashion-mnist --config.data.data_dir=$RUNS/tfds"

# The study's setting (docs/results.md): NiN width 0.25 with the seed's fc head, LeNet width 0.25.
$PY -m kd_jax.main --config=experiments/nin_teacher.py:dataset=fashion_mnist,width=0.25,head=fc,epochs=3 \
  $DATA --workdir="$RUNS/teacher"
$PY -m kd_jax.main --config=experiments/lenet_student.py:method=hinton_kd,dataset=fashion_mnist,width=0.25,epochs=2 \
  $DATA --config.teacher_workdir="$RUNS/teacher" --workdir="$RUNS/hinton_kd"
$PY -m kd_jax.evaluate --workdir="$RUNS/hinton_kd"
