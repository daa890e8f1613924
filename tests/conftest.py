"""Shared fixtures: real pycaffe on CPU, and a small generated sample dataset."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tinycaffe import caffe_env, sample_data  # noqa: E402


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def caffe():
    """pycaffe in CPU mode; a missing install is a failure, never a skip."""
    module = caffe_env.import_caffe()
    module.set_mode_cpu()
    return module


@pytest.fixture(scope="session")
def caffe_bin():
    return caffe_env.caffe_binary()


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    """4 classes x (12 train, 3 val, 3 test): enough to check layout quickly."""
    out = str(tmp_path_factory.mktemp("sample") / "tiny-imagenet-200")
    summary = sample_data.generate(out, classes=4, train=12, val=3, test=3, seed=7)
    return out, summary
