"""bench/bench_nets.py's timing nets, which bench_cpu.py, bench_gpu.py and bench_nets.py time
with `caffe time`: every variant's train_val net with its Data layers turned into DummyData,
in a clone without the dataset too (the committed prototxt/ names data/lmdb, which a fresh
clone does not have: the nets then take the shape of the deploy.prototxt beside them, as
--check does)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_nets  # noqa: E402

from tinycaffe import check, nets  # noqa: E402


@pytest.mark.parametrize("variant", ["tiny", "resnet_tiny", "alexnet"])
def test_timing_net_builds_with_dummy_data_of_the_crop(caffe, variant):
    path = bench_nets.timing_net(variant, 8)
    try:
        _, net = check.parse(path)
        dummies = [layer for layer in net.layer if layer.type == "DummyData"]
        assert dummies and not [layer for layer in net.layer if layer.type == "Data"]
        _, source = check.parse(os.path.join(bench_nets.REPO, "prototxt", variant, "train_val.prototxt"))
        crop = [layer for layer in source.layer if layer.type == "Data"][0].transform_param.crop_size
        for layer in dummies:
            assert list(layer.dummy_data_param.shape[0].dim) == [8, 3, crop, crop]
        built = caffe.Net(path, caffe.TRAIN)
        assert built.blobs["data"].data.shape == (8, 3, crop, crop)
    finally:
        os.unlink(path)


def test_every_variant_is_benched_by_default():
    sys.path.insert(0, os.path.dirname(bench_nets.__file__))
    import bench_cpu
    assert sorted(bench_cpu.DEFAULT_VARIANTS.split(",")) == sorted(nets.VARIANTS)
