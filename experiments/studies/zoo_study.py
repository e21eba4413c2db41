"""The method zoo on the label-scarce Fashion-MNIST setting, beside ground truth and Hinton KD.

  python experiments/studies/zoo_study.py --workdir_root=runs/zoo_6k

A NiN teacher (width 0.25, the seed's fc head, 15 epochs) on the training split, then LeNet
students (width 0.25) on its first 6,000 images for 120 epochs at batch 128, by ground
truth, Hinton KD and every zoo method (`kd_jax.train.zoo`, each at its config's defaults),
seeds 0, 1, 2. The table reports the last epoch, and beside it the epoch chosen on
validation images held out of the training split (`--validation_split`, the last 5,000
training images, held out of every run, the teacher's included), never on the test split.
`--validation_split=0` trains the teacher on all 60,000 images and reports the last epoch
alone.

It is `distillation_study.py` with these defaults (every flag of that script is accepted and
overrides them): one `python -m kd_jax.main` subprocess per run, resumable (finished runs
are skipped, interrupted ones continue from their last checkpoint), the table in
WORKDIR_ROOT/study.md and WORKDIR_ROOT/study.json. A teacher trained by another study can be
reused with --teacher_workdir.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distillation_study  # noqa: E402  pylint: disable=g-import-not-at-top

DEFAULTS = (
  "--student_width=0.25",
  "--student_epochs=120",
  "--student_train_split=train[:6000]",
  "--batch_size=128",
  "--eval_every_epochs=5",
  "--methods=" + ",".join(("ground_truth", "hinton_kd", *distillation_study.ZOO_METHODS)),
)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  given = {arg.split("=")[0] for arg in argv}
  return distillation_study.main([d for d in DEFAULTS if d.split("=")[0] not in given] + argv)


if __name__ == "__main__":
  sys.exit(main())
