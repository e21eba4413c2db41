"""The allowed values of every config choice, in one place.

The schema (`kd_jax.config_schema`) validates configs against these, and the code that acts
on a choice reads its list from here too, so the two can never disagree. Plain tuples: this
module imports nothing, so a config validates without JAX or TensorFlow.
"""

DATASETS = ("cifar10", "mnist", "fashion_mnist")
# Training methods of the teacher/student trainer (`kd_jax.train.steps.make_objective`).
# The method zoo (`kd_jax.train.zoo`): one loss each from `kd_jax.losses`, with the feature
# taps, auxiliary modules and memories the method needs in the train state.
ZOO_METHODS = (
  "dkd",
  "logit_standardized_kd",
  "dist",
  "fitnet",
  "attention_transfer",
  "pkt",
  "similarity_preserving",
  "rkd",
  "vid",
  "crd",
)
METHODS = ("ground_truth", "logit_regression", "noisy_teacher", "hinton_kd", *ZOO_METHODS)
# Attention transfer's normalisation: torchdistill's code, or the paper's.
ATTENTION_MODES = ("code", "paper")
MODELS = ("nin", "lenet", "convnet")
# Image preprocessing (`kd_jax.data`): minus the training set's mean image (of [0, 1] or
# [0, 255] pixels), per-channel standardisation, or none.
PREPROCESS = ("mean_image", "mean_image_255", "standardize", "none")
# Amalgamation's per-sample teacher selection (`kd_jax.amalgamation.routing`).
SELECTIONS = ("entropy", "max_softmax", "energy", "teacher_card", "pool_lda")
ROUTINGS = ("hard", "soft")
# Amalgamation's logit term: KL to the routed union target, or routed logit regression.
LOGIT_LOSSES = ("kl", "l2")
ON_NONFINITE = ("stop", "skip")
DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest")
NIN_HEADS = ("gap", "fc")
CONVNET_NORMS = ("batch", "none")
