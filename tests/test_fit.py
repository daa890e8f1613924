"""tinycaffe.fit: what a net's class outputs are (through in-place and pass-through layers), and
the refusals before Caffe (class count, crop, empty LMDB) on real generated LMDBs."""
import shutil

import pytest
from google.protobuf import text_format

from tinycaffe import data, fit, gen, sample_data
from tinycaffe.caffe_env import caffe_pb2

HEADS = {
    "inner product": ('layer { name: "fc_out" type: "InnerProduct" bottom: "x" top: "fc_out" '
                      'inner_product_param { num_output: 7 } }', "fc_out"),
    "in-place dropout on the scores": ('layer { name: "fc_out" type: "InnerProduct" bottom: "x" top: "fc_out" '
                                       'inner_product_param { num_output: 7 } } '
                                       'layer { name: "drop" type: "Dropout" bottom: "fc_out" top: "fc_out" }',
                                       "fc_out"),
    "convolution + global pooling": ('layer { name: "cls" type: "Convolution" bottom: "x" top: "cls" '
                                     'convolution_param { num_output: 7 kernel_size: 1 } } '
                                     'layer { name: "relu" type: "ReLU" bottom: "cls" top: "cls" } '
                                     'layer { name: "gap" type: "Pooling" bottom: "cls" top: "gap" '
                                     'pooling_param { pool: AVE global_pooling: true } }', "cls"),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_net_classes_through_in_place_and_pooling_layers(head):
    body, name = HEADS[head]
    scores = "gap" if "pooling" in head else "fc_out"
    net = text_format.Merge(body + ' layer { name: "loss" type: "SoftmaxWithLoss" bottom: "%s" bottom: "label" '
                                   'top: "loss" }' % scores, caffe_pb2().NetParameter())
    assert fit.net_classes(net) == (7, name)


def test_net_without_a_classifier_has_no_class_count():
    net = text_format.Merge('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" }',
                            caffe_pb2().NetParameter())
    assert fit.net_classes(net) is None


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    ds = str(root / "tiny-imagenet-200")
    sample_data.generate(ds, classes=6, train=2, val=1, test=1, seed=5)
    data.make_lmdbs(ds, str(root / "lmdb"), workers=1, splits=["train", "val"])
    empty = root / "empty"
    data.make_lmdbs(ds, str(empty), workers=1, splits=["train", "val"])
    shutil.rmtree(str(empty / "train_lmdb"))
    data.write_split([], str(empty / "train_lmdb"), 64, 1)  # a valid LMDB with no records
    return str(root / "lmdb"), str(empty)


def generated(tmp_path, lmdb_dir, classes=6):
    cfg = gen.GenConfig(out=str(tmp_path), lmdb_dir=lmdb_dir, mode="cpu", num_classes=classes, val_size=6)
    gen.generate(["tiny"], cfg)
    path = str(tmp_path / "tiny" / "train_val.prototxt")
    return path, text_format.Merge(open(path).read(), caffe_pb2().NetParameter())


def test_a_fitting_net_passes(lmdbs, tmp_path):
    path, net = generated(tmp_path, lmdbs[0])
    fit.check_data_layers(net, path)


def test_another_class_count_is_a_one_line_error(lmdbs, tmp_path):
    path, net = generated(tmp_path, lmdbs[0], classes=8)
    with pytest.raises(fit.FitError) as err:
        fit.check_data_layers(net, path)
    assert "has 8 class outputs but" in str(err.value) and "lists 6 classes" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_empty_lmdb_is_refused(lmdbs, tmp_path):
    path, net = generated(tmp_path, lmdbs[1])
    with pytest.raises(fit.FitError) as err:
        fit.check_data_layers(net, path)
    assert "train_lmdb, which is empty (no records)" in str(err.value)


def test_a_corrupt_lmdb_is_a_one_line_error(lmdbs, tmp_path):
    broken = tmp_path / "lmdb" / "train_lmdb"
    shutil.copytree(lmdbs[0], str(tmp_path / "lmdb"))
    (broken / "data.mdb").write_bytes(b"")
    with pytest.raises(data.DataError) as err:
        fit.image_shape(str(broken))
    assert "train_lmdb: not a readable LMDB (" in str(err.value) and "\n" not in str(err.value)
