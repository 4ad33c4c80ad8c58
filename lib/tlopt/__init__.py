"""tlopt: Bayesian optimization of transfer learning for small medical image datasets."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's x86 builds use oneDNN's kernels by default only on CPUs with AVX-512; on an
# AVX2 CPU they train a VGG16 2-3x faster than the default Eigen kernels (docs/decisions.md).
# Set before TensorFlow is imported; a user's own value wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
