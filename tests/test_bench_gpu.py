"""bench/torch_nets.py: the PyTorch twins that bench/bench_gpu.py times against Caffe.

A timing ratio means something only if both sides compute the same net. Where PyTorch
is installed (the GPU machine, or a scratch venv), every variant's twin must give the
same value as pycaffe in every blob; elsewhere these are skipped with the reason.
"""
import os
import sys

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed here (bench/bench_gpu.py needs it)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_gpu  # noqa: E402

from tinycaffe import nets  # noqa: E402


@pytest.mark.parametrize("variant", nets.VARIANTS)
def test_twin_computes_every_blob_caffe_computes(caffe, variant):
    result = bench_gpu.verify_twin(variant)
    assert result["checked"], result
    assert result["blobs_compared"] >= 8
    assert result["max_rel_diff"] < 1e-4 and result["match"]
    assert result["params_caffe"] == result["params_torch"]
