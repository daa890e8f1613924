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


def make_sample_lmdbs(root, train=100, seed=0):
    """10 classes x (train, 20 val, 2 test) sample images as LMDBs in root/lmdb; -> that path."""
    from tinycaffe import data
    ds = str(root / "tiny-imagenet-200")
    sample_data.generate(ds, classes=10, train=train, val=20, test=2, seed=seed)
    out = str(root / "lmdb")
    data.make_lmdbs(ds, out, workers=2)
    return out


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory):
    """The quickstart's sample (100 train / 20 val images per class) as LMDBs, once per module
    that asks (the sweep and Slurm tests); modules with other needs define their own."""
    return make_sample_lmdbs(tmp_path_factory.mktemp("lmdb"))


DUMMY_TRAIN_NET = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 3 dim: 8 dim: 8 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def write_dummy_solver(folder, max_iter):
    """A conv net on DummyData and a CPU solver for it (snapshots folder/snap_iter_N); -> solver path."""
    from google.protobuf import text_format
    pb2 = caffe_env.caffe_pb2()
    net = folder / "net.prototxt"
    net.write_text(DUMMY_TRAIN_NET)
    solver = pb2.SolverParameter(net=str(net), base_lr=0.1, lr_policy="fixed", max_iter=max_iter, display=1,
                                 snapshot_prefix=str(folder / "snap"), solver_mode=pb2.SolverParameter.CPU,
                                 random_seed=1)
    path = folder / "solver.prototxt"
    path.write_text(text_format.MessageToString(solver))
    return path


def read_scalars(log_dir):
    """{tag: {step: value}} of every TensorBoard event file in log_dir (resumed runs add files).

    Reads the TFRecord framing (length, CRC, Event, CRC) with tensorboardX's own Event message;
    the writer under test is tensorboardX's SummaryWriter."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            blob = f.read()
        at = 0
        while at < len(blob):
            (length,) = struct.unpack("<Q", blob[at:at + 8])
            event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def wait_for_log(proc, runs_root, text, timeout=120):
    """Block until the caffe.log of the one run under runs_root holds `text` (the terminal shows only
    a progress line by default, so tests watch the run's log, as a user would with tail -f)."""
    import glob
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = glob.glob(os.path.join(str(runs_root), "*", "*", "caffe.log"))
        if logs and text in open(logs[0], errors="replace").read():
            return logs[0]
        assert proc.poll() is None, "training ended before its log said %r" % text
        time.sleep(0.05)
    raise AssertionError("no %r in the run's caffe.log after %d s" % (text, timeout))
