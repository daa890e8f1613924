"""Bring your own net (issue 27): --check, train and evaluate on Caffe files written elsewhere.

The nets are BVLC Caffe's own examples and models (LeNet: scale, no mean; CIFAR-10 quick:
mean_file, an Accuracy top named `accuracy`; GoogLeNet: mean_value, crop 224, auxiliary
heads), as Debian's caffe source package ships them: scripts/install_caffe.sh keeps their
prototxt files in $TINYCAFFE_HOME/caffe-reference (caffe_env.reference_dir()). A test copies
one, points its Data layers at a small LMDB of the sample data and leaves the rest as written.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import make_sample_lmdbs
from tinycaffe import caffe_env, data, sample_data
from tinycaffe.caffe_env import caffe_pb2


def reference(path):
    found = os.path.join(caffe_env.reference_dir(), path)
    assert os.path.isfile(found), "%s missing: scripts/setup.sh keeps Caffe's example nets there" % found
    return found


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory):
    return make_sample_lmdbs(tmp_path_factory.mktemp("foreign"), train=20, seed=9)  # 10 classes, 200 val images


def read_net(path):
    return text_format.Parse(open(path).read(), caffe_pb2().NetParameter())


def adapt(src, dst, lmdb, test_batch=100, train_batch=None, classes=None, input_dims=None):
    """A copy of a reference net whose Data layers read lmdb's train/val splits (and its mean file
    where the net has one); classes: the num_output of the layers named; input_dims: a deploy Input's."""
    net = read_net(src)
    for layer in net.layer:
        if layer.type == "Data":
            test = any(rule.phase == caffe_pb2().TEST for rule in layer.include)
            layer.data_param.source = os.path.join(lmdb, "val_lmdb" if test else "train_lmdb")
            layer.data_param.batch_size = test_batch if test else (train_batch or layer.data_param.batch_size)
            if layer.transform_param.mean_file:
                layer.transform_param.mean_file = os.path.join(lmdb, "mean.binaryproto")
        if layer.type == "Input" and input_dims:
            del layer.input_param.shape[0].dim[:]
            layer.input_param.shape[0].dim.extend(input_dims)
        if classes and layer.name in classes[1]:
            layer.inner_product_param.num_output = classes[0]
    dst.write_text(text_format.MessageToString(net))
    return str(dst)


def random_weights(caffe, train_val, path):
    """The net at its fillers' random start, saved as a .caffemodel (no training needed to compare)."""
    caffe.set_random_seed(1)
    caffe.Net(train_val, caffe.TEST).save(str(path))
    return str(path)


def caffe_test(model, weights, iterations):
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    out = subprocess.run([caffe_env.caffe_binary(), "test", "-model", model, "-weights", weights, "-iterations",
                          str(iterations)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"\] ([\w/.-]+) = ([\d.e+-]+)$", out.stderr, re.M)}


def evaluate(repo, deploy, weights, lmdb, tmp_path, *more):
    out = subprocess.run([sys.executable, "tools/evaluate.py", "--deploy", deploy, "--weights", weights, "--lmdb",
                          os.path.join(lmdb, "val_lmdb"), "--quiet", "--gpu", "cpu", "--out", str(tmp_path), *more],
                         cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.load(open(tmp_path / "eval_center.json"))


# ---------------------------------------------------------------- evaluate = caffe test, the net's own preprocessing
def test_lenet_scale_without_mean_equals_caffe_test(repo, caffe, lmdb_dir, tmp_path):
    tv = adapt(reference("examples/mnist/lenet_train_test.prototxt"), tmp_path / "train_val.prototxt", lmdb_dir)
    deploy = adapt(reference("examples/mnist/lenet.prototxt"), tmp_path / "deploy.prototxt", lmdb_dir,
                   input_dims=[1, 3, 64, 64])
    weights = random_weights(caffe, tv, tmp_path / "lenet.caffemodel")
    theirs = caffe_test(tv, weights, 2)
    ours = evaluate(repo, deploy, weights, lmdb_dir, tmp_path / "ours")
    assert ours["top1"] == pytest.approx(theirs["accuracy"], abs=1e-6)
    assert ours["preprocessing"].startswith("no mean, times 0.00390625")


def test_cifar10_quick_mean_file_equals_caffe_test_named_by_train_val(repo, caffe, lmdb_dir, tmp_path):
    tv = adapt(reference("examples/cifar10/cifar10_quick_train_test.prototxt"), tmp_path / "cifar10_quick_tt.prototxt",
               lmdb_dir)
    deploy = adapt(reference("examples/cifar10/cifar10_quick.prototxt"), tmp_path / "cifar10_quick.prototxt",
                   lmdb_dir, input_dims=[1, 3, 64, 64])
    weights = random_weights(caffe, tv, tmp_path / "quick.caffemodel")
    theirs = caffe_test(tv, weights, 2)
    ours = evaluate(repo, deploy, weights, lmdb_dir, tmp_path / "ours", "--train-val", tv)
    assert ours["top1"] == pytest.approx(theirs["accuracy"], abs=1e-6)
    assert ours["preprocessing"].startswith("minus %s" % os.path.join(lmdb_dir, "mean.binaryproto"))
    conflict = subprocess.run([sys.executable, "tools/evaluate.py", "--deploy", deploy, "--weights", weights,
                               "--train-val", tv, "--lmdb", os.path.join(lmdb_dir, "val_lmdb"),
                               "--mean", os.path.join(str(tmp_path), "other.binaryproto")], cwd=repo,
                              capture_output=True, text=True)
    assert conflict.returncode == 1 and "was trained with mean file" in conflict.stderr


@pytest.fixture(scope="module")
def big_lmdb(tmp_path_factory):
    """The sample classes at 256x256 (GoogLeNet crops 224): 50 val images."""
    root = tmp_path_factory.mktemp("big")
    ds = str(root / "tiny-imagenet-200")
    sample_data.generate(ds, classes=10, train=1, val=5, test=1, seed=11)
    data.make_lmdbs(ds, str(root / "lmdb"), workers=2, size=256, splits=["train", "val"])
    return str(root / "lmdb")


def test_googlenet_mean_value_equals_caffe_test_and_its_heads_are_no_problem(repo, caffe, big_lmdb, tmp_path):
    heads = (10, ("loss1/classifier", "loss2/classifier", "loss3/classifier"))
    tv = adapt(reference("models/bvlc_googlenet/train_val.prototxt"), tmp_path / "train_val.prototxt", big_lmdb,
               test_batch=10, train_batch=1, classes=heads)
    deploy = adapt(reference("models/bvlc_googlenet/deploy.prototxt"), tmp_path / "deploy.prototxt", big_lmdb,
                   classes=heads)
    weights = random_weights(caffe, tv, tmp_path / "googlenet.caffemodel")
    theirs = caffe_test(tv, weights, 5)
    ours = evaluate(repo, deploy, weights, big_lmdb, tmp_path / "ours", "--batch", "10")
    assert ours["top1"] == pytest.approx(theirs["loss3/top-1"], abs=1e-6)
    assert ours["top5"] == pytest.approx(theirs["loss3/top-5"], abs=1e-6)
    assert ours["preprocessing"].startswith("minus mean_value 104, 117, 123")
    check = subprocess.run([sys.executable, "tools/gen_prototxt.py", "--check", tv, deploy], cwd=repo,
                           capture_output=True, text=True)
    assert check.returncode == 0 and "2 file(s) checked, 0 problem(s)" in check.stdout, check.stderr[-2000:]
    assert "only (not used by the deploy net): loss1/classifier, loss1/conv, loss1/fc, loss2/classifier" \
        in check.stdout


# ---------------------------------------------------------------- training a brought net
def test_cifar10_quick_trains_and_reports_its_accuracy_named_accuracy(repo, lmdb_dir, tmp_path):
    tv = adapt(reference("examples/cifar10/cifar10_quick_train_test.prototxt"), tmp_path / "train_val.prototxt",
               lmdb_dir)
    solver = text_format.Parse(open(reference("examples/cifar10/cifar10_quick_solver.prototxt")).read(),
                               caffe_pb2().SolverParameter())
    solver.net, solver.max_iter, solver.test_interval, solver.test_iter[0] = tv, 20, 20, 2
    solver.snapshot_prefix, solver.solver_mode = str(tmp_path / "quick"), solver.CPU
    (tmp_path / "solver.prototxt").write_text(text_format.MessageToString(solver))
    out = subprocess.run(["bash", "scripts/train.sh", str(tmp_path / "solver.prototxt"), "--gpu", "cpu",
                          "--runs-root", str(tmp_path / "runs")], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"finished after 20 iterations, val top-1 [\d.]+ at iteration 20", out.stderr)
    assert "note: no deploy.prototxt beside %s" % tv in out.stderr
    report = subprocess.run([sys.executable, "tools/report.py", str(tmp_path / "runs")], cwd=repo,
                            capture_output=True, text=True)
    row = next(line for line in report.stdout.splitlines() if "finished" in line)
    assert "%" in row and "—" not in row.split("|")[5], row


# ---------------------------------------------------------------- --check as Caffe reads the files
@pytest.mark.parametrize("files, total", [
    (("examples/mnist/lenet_train_test.prototxt", "examples/mnist/lenet.prototxt"), "431,080"),
    (("examples/cifar10/cifar10_quick_train_test.prototxt", "examples/cifar10/cifar10_quick.prototxt"), "145,578"),
])
def test_check_takes_the_input_shape_from_the_deploy_net(repo, files, total):
    out = subprocess.run([sys.executable, os.path.join(repo, "tools/gen_prototxt.py"), "--check", *files],
                         cwd=caffe_env.reference_dir(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "total: %s parameters" % total in out.stdout and "4,257,080" not in out.stdout


def test_check_without_any_shape_says_so_and_makes_up_none(repo):
    out = subprocess.run([sys.executable, os.path.join(repo, "tools/gen_prototxt.py"), "--check",
                          "examples/mnist/mnist_autoencoder.prototxt"], cwd=caffe_env.reference_dir(),
                         capture_output=True, text=True)
    assert out.returncode == 0 and "input shapes unknown" in out.stdout and "total:" not in out.stdout, out.stderr
    given = subprocess.run([sys.executable, os.path.join(repo, "tools/gen_prototxt.py"), "--check",
                            "examples/mnist/mnist_autoencoder.prototxt", "--input-shape", "1,28,28"],
                           cwd=caffe_env.reference_dir(), capture_output=True, text=True)
    assert given.returncode == 0 and "total:" in given.stdout, given.stderr


V1_NET = """name: "v1"
layers { name: "data" type: DATA top: "data" top: "label"
  data_param { source: "%s" batch_size: 4 backend: LMDB } transform_param { crop_size: 60 } }
layers { name: "fc" type: INNER_PRODUCT bottom: "data" top: "fc" inner_product_param { num_output: 10 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" top: "loss" }
"""


def test_a_v1_net_is_upgraded_as_caffe_does(repo, tmp_path):
    """A V1 net whose LMDB is not there yet: upgraded, its DATA layer swapped for a dummy like any
    other (Caffe went looking for the LMDB: `No such file`)."""
    path = tmp_path / "v1.prototxt"
    path.write_text(V1_NET % (tmp_path / "not_yet_lmdb"))
    out = subprocess.run([sys.executable, "tools/gen_prototxt.py", "--check", str(path), "--input-shape", "3,64,64"],
                         cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0 and "No such file" not in out.stdout + out.stderr, out.stderr
    assert "total: 108,010 parameters" in out.stdout  # 10 x 3*60*60 + 10


@pytest.mark.parametrize("edit, needle", [
    # Caffe refuses a non-repeated field given twice; Python's Merge let the last one win.
    (lambda t: t.replace("num_output: 20", "num_output: 20\n    num_output: 30", 1),
     'should not have multiple "num_output" fields'),
    (lambda t: t.replace('type: "Data"', 'type: "ImageData"', 1),
     "layer 'mnist' has type ImageData, which this Caffe build does not have (it needs OpenCV"),
    (lambda t: t.replace("backend: LMDB", "backend: LEVELDB", 1), "reads a LevelDB, which this Caffe build cannot"),
])
def test_check_refuses_what_caffe_or_this_build_refuses(repo, tmp_path, edit, needle):
    path = tmp_path / "lenet_train_test.prototxt"
    path.write_text(edit(open(reference("examples/mnist/lenet_train_test.prototxt")).read()))
    out = subprocess.run([sys.executable, "tools/gen_prototxt.py", "--check", str(path)], cwd=repo,
                         capture_output=True, text=True)
    assert out.returncode == 1 and needle in out.stderr, out.stderr


def test_legacy_solver_type_adagrad_with_momentum_and_a_twice_given_base_lr(repo, tmp_path):
    text = open(reference("examples/mnist/lenet_solver.prototxt")).read()
    (tmp_path / "adagrad.prototxt").write_text(text + "\nsolver_type: ADAGRAD\n")
    (tmp_path / "twice.prototxt").write_text(text + "\nbase_lr: 0.5\n")
    out = subprocess.run([sys.executable, os.path.join(repo, "tools/gen_prototxt.py"), "--check", "adagrad.prototxt",
                          "twice.prototxt"],
                         cwd=str(tmp_path), capture_output=True, text=True)
    assert out.returncode == 1
    assert "adagrad.prototxt: AdaGrad takes no momentum" in out.stderr
    assert 'should not have multiple "base_lr" fields' in out.stderr


def test_a_train_val_given_as_deploy_is_one_line(repo, lmdb_dir, tmp_path, caffe):
    tv = adapt(reference("examples/mnist/lenet_train_test.prototxt"), tmp_path / "train_val.prototxt", lmdb_dir)
    weights = random_weights(caffe, tv, tmp_path / "lenet.caffemodel")
    out = subprocess.run([sys.executable, "tools/evaluate.py", "--deploy", tv, "--weights", weights, "--lmdb",
                          os.path.join(lmdb_dir, "val_lmdb")], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "a train_val net (layer 'mnist' reads data): give its deploy net" in out.stderr


def test_every_data_problem_is_named_with_advice_for_a_net_of_ones_own(repo, lmdb_dir, tmp_path):
    tv = adapt(reference("examples/mnist/lenet_train_test.prototxt"), tmp_path / "train_val.prototxt", lmdb_dir)
    text = open(tv).read().replace("num_output: 10", "num_output: 12")
    text = text.replace("scale: 0.00390625", "scale: 0.00390625\n    crop_size: 100")
    (tmp_path / "train_val.prototxt").write_text(text)
    out = subprocess.run([sys.executable, "tools/gen_prototxt.py", "--check", tv], cwd=repo, capture_output=True,
                         text=True)
    assert out.returncode == 1
    assert "has 12 class outputs" in out.stderr and "set num_output: 10 in layer 'ip2'" in out.stderr
    assert "--num-classes" not in out.stderr
    assert out.stderr.count("crops 100x100 but the images") == 2  # the TRAIN and the TEST layer


def test_check_of_a_repo_solver_from_elsewhere_looks_in_the_repo(repo, tmp_path):
    out = subprocess.run([sys.executable, os.path.join(repo, "tools/gen_prototxt.py"), "--check",
                          os.path.join(repo, "prototxt", "tiny", "solver.prototxt")], cwd=str(tmp_path),
                         capture_output=True, text=True)
    assert out.returncode == 0 and "0 problem(s)" in out.stdout, out.stderr


def test_reference_files_are_caffes_own():
    assert "BVLC Caffe examples/ and models/" in open(os.path.join(caffe_env.reference_dir(), "SOURCE")).read()
    assert np.isclose(read_net(reference("examples/mnist/lenet_train_test.prototxt")).layer[0]
                      .transform_param.scale, 0.00390625)
