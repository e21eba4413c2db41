"""Ships `experiments/` (the configs) inside the package as `kd_jax.experiments`.

Everything else is in pyproject.toml. The configs stay at the top of the checkout; pyproject's
package finder cannot map a directory outside the package, this one line can.
"""

from setuptools import find_namespace_packages, setup

# Namespace-aware: a subpackage without an __init__.py (kd_jax/train) ships too.
packages = find_namespace_packages(include=["kd_jax", "kd_jax.*"], exclude=["*.__pycache__"])
setup(
  packages=[*packages, "kd_jax.experiments"],
  package_dir={"kd_jax.experiments": "experiments"},
)
