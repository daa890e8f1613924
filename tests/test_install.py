"""The Caffe that scripts/install_caffe.sh built: binary, pycaffe, math, failure paths."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

INSTALL = "scripts/install_caffe.sh"


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def test_caffe_binary_reports_version_1_0(caffe_bin):
    out = run([caffe_bin, "--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "caffe version 1.0.0"


def test_pycaffe_version_and_layers(caffe):
    assert caffe.__version__ == "1.0.0"
    layers = set(caffe.layer_type_list())
    # Everything the paper's variants need must be registered in this build.
    for needed in ("Data", "Convolution", "Pooling", "LRN", "ReLU", "PReLU", "BatchNorm",
                   "Scale", "InnerProduct", "Dropout", "SoftmaxWithLoss", "Accuracy", "Softmax"):
        assert needed in layers, needed


def _ip_softmax_net(caffe, tmp_path, n, d, k):
    from caffe import layers as L
    ns = caffe.NetSpec()
    ns.data = L.Input(shape=dict(dim=[n, d]))
    ns.label = L.Input(shape=dict(dim=[n]))
    ns.fc = L.InnerProduct(ns.data, num_output=k)
    ns.loss = L.SoftmaxWithLoss(ns.fc, ns.label)
    path = tmp_path / "ip.prototxt"
    path.write_text("force_backward: true\n" + str(ns.to_proto()))
    return caffe.Net(str(path), caffe.TRAIN)


def test_netspec_forward_backward_matches_the_math(caffe, tmp_path):
    """InnerProduct + SoftmaxWithLoss through real Caffe (OpenBLAS underneath):
    loss and gradients equal the closed form."""
    n, d, k = 6, 5, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, size=n)
    w = rng.normal(size=(k, d)).astype(np.float32)
    b = rng.normal(size=k).astype(np.float32)
    net = _ip_softmax_net(caffe, tmp_path, n, d, k)
    net.params["fc"][0].data[...] = w
    net.params["fc"][1].data[...] = b
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = y
    loss = float(net.forward()["loss"])
    net.backward()

    logits = x @ w.T + b
    np.testing.assert_allclose(net.blobs["fc"].data, logits, rtol=1e-5, atol=1e-5)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(n), y]).mean(), rel=1e-5)
    dlogits = (p - np.eye(k)[y]) / n
    np.testing.assert_allclose(net.params["fc"][0].diff, dlogits.T @ x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.params["fc"][1].diff, dlogits.sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.blobs["data"].diff, dlogits @ w, rtol=1e-4, atol=1e-6)


def test_caffe_train_binary_runs_and_snapshots(caffe_bin, tmp_path):
    """`caffe train` end to end: a solver, a few SGD steps, a snapshot on disk."""
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    net = tmp_path / "net.prototxt"
    net.write_text("""
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 3 dim: 6 dim: 6 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
""")
    solver = caffe_pb2.SolverParameter(net=str(net), base_lr=0.1, lr_policy="fixed", max_iter=5,
                                       display=1, snapshot_prefix=str(tmp_path / "snap"),
                                       solver_mode=caffe_pb2.SolverParameter.CPU, random_seed=1)
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(text_format.MessageToString(solver))
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    out = run([caffe_bin, "train", "--solver", str(solver_path)], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Optimization Done" in out.stderr
    assert (tmp_path / "snap_iter_5.caffemodel").is_file()
    assert (tmp_path / "snap_iter_5.solverstate").is_file()


# ---------------------------------------------------------------- install_caffe.sh itself
def test_install_script_rejects_unknown_flag_listing_valid_ones(repo):
    out = run(["bash", INSTALL, "--gpu"], cwd=repo)
    assert out.returncode != 0
    assert "unknown option '--gpu'" in out.stderr and "--cpu" in out.stderr


def test_install_script_cuda_says_not_ready(repo):
    out = run(["bash", INSTALL, "--cuda"], cwd=repo)
    assert out.returncode != 0
    assert "not ready" in out.stderr and "--cpu" in out.stderr


def test_install_script_second_run_rebuilds_nothing(repo):
    out = run(["bash", INSTALL, "--cpu", "--python", sys.executable], cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "cached build matches" in out.stdout
    assert "compiling" not in out.stdout
    assert "pycaffe 1.0.0 OK" in out.stdout


def _write_patched_files(repo, src):
    """Write, for every file our patches touch, the lines the patch leaves there
    (context + added), so that install_caffe.sh sees the patches as applied."""
    for patch in glob.glob(os.path.join(repo, "scripts/patches/*.patch")):
        target, lines = None, []
        with open(patch) as f:
            for line in f:
                if line.startswith("+++ b/"):
                    target = line[6:].split("\t")[0].strip()
                elif line.startswith("@@"):
                    continue
                elif target and line[:1] in (" ", "+"):
                    lines.append(line[1:])
        path = src / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines))


def test_failed_build_leaves_no_prefix_behind(repo, tmp_path):
    """A source tree whose configure fails: exit non-zero, no prefix, no scratch dir."""
    src = tmp_path / "bad-src"
    _write_patched_files(repo, src)
    (src / "CMakeLists.txt").write_text('cmake_minimum_required(VERSION 3.5)\nmessage(FATAL_ERROR "boom")\n')
    home = tmp_path / "home"
    env = dict(os.environ, TINYCAFFE_HOME=str(home), CAFFE_SRC=str(src))
    out = run(["bash", INSTALL, "--cpu", "--python", sys.executable], cwd=repo, env=env)
    assert out.returncode != 0
    assert "patch already applied" in out.stdout
    assert "cmake configure failed" in out.stderr
    assert not (home / "caffe-1.0-cpu").exists()
    assert [p.name for p in home.iterdir() if p.name.startswith("build-")] == []


def test_caffe_root_uses_an_existing_caffe_and_builds_nothing(repo, caffe_bin, tmp_path):
    prefix = os.path.dirname(os.path.dirname(caffe_bin))  # .../caffe-1.0-cpu
    home = tmp_path / "home"
    env = dict(os.environ, TINYCAFFE_HOME=str(home), CAFFE_ROOT=prefix)
    out = run(["bash", INSTALL, "--cpu", "--python", sys.executable], cwd=repo, env=env)
    assert out.returncode == 0, out.stderr
    assert "using existing Caffe at CAFFE_ROOT=%s" % prefix in out.stdout and "compiling" not in out.stdout
    assert "pycaffe 1.0.0 OK" in out.stdout
    location = (home / "caffe.env").read_text()
    assert "CAFFE_BIN=%s/bin/caffe" % prefix in location and "PYCAFFE_DIR=%s/lib/python3/dist-packages" % prefix in location
    assert not (home / "caffe-1.0-cpu").exists()
