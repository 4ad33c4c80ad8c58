"""Shared fixtures: the generated demo dataset, small and cached per session."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo dataset: 4 classes x 30 images of 64 px."""
    from tlopt.demo_data import generate_demo_dataset

    return generate_demo_dataset(
        tmp_path_factory.mktemp("demo") / "data", images_per_class=30, image_size=64, seed=0
    )
