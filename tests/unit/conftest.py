"""Fixtures the trainer tests share."""

from __future__ import annotations

import pytest
from train_helpers import make_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four small captioned training images (train_helpers.make_images), one folder per test module."""
    return make_images(tmp_path_factory.mktemp("data") / "images")
