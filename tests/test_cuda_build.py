"""The CUDA flavour (scripts/install_caffe.sh --cuda), checked from its cached build.

Building it takes ~7.5 minutes for one architecture on 2 cores (13 for five), so the suite never builds it:
these tests run where nvcc is present and $TINYCAFFE_HOME/caffe-1.0-cuda exists, and
are skipped otherwise with the reason (and the command that builds it). No GPU is
needed: the architectures are read from libcaffe.so with cuobjdump, and the build's
own caffe and pycaffe run a net in CPU mode, which patch 0006 makes possible.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_dummy_solver
from tinycaffe import caffe_env

PREFIX = os.path.join(caffe_env.tinycaffe_home(), "caffe-1.0-cuda")
STAMP = os.path.join(PREFIX, ".tinycaffe-build")
BUILD_HINT = "scripts/install_caffe.sh --cuda --arch 90"

pytestmark = [
    pytest.mark.skipif(not shutil.which("nvcc"), reason="no nvcc on PATH: the CUDA flavour is not checked here"),
    pytest.mark.skipif(not os.path.isfile(STAMP), reason="no cached CUDA build at %s (build it: %s, ~8 min)"
                       % (PREFIX, BUILD_HINT)),
]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def stamp():
    """flavour=cuda python=3.11 ... cuda=13.0 arch=90+ptx90 cudnn=ON ... as a dict."""
    first = open(STAMP).readline().split()
    return dict(field.split("=", 1) for field in first)


@pytest.fixture(scope="module")
def libcaffe():
    return os.path.realpath(os.path.join(PREFIX, "lib", "libcaffe.so"))


def cuobjdump(stamp):
    major = stamp["cuda"].split(".")[0]
    home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    for path in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump"),
                 os.path.join(caffe_env.tinycaffe_home(), "cuda%s-libs" % major, "wheels", "nvidia",
                              "cu%s" % major, "bin", "cuobjdump")):
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail("no cuobjdump (toolkit, PATH, or the cuda-libs wheel that install_caffe.sh installs)")


def test_libcaffe_holds_code_for_exactly_the_requested_architectures(stamp, libcaffe):
    bins, ptx = re.match(r"([\d,]+)\+ptx(\d+)$", stamp["arch"]).groups()
    tool = cuobjdump(stamp)
    elf = run([tool, "--list-elf", libcaffe])
    assert elf.returncode == 0, elf.stderr
    assert set(re.findall(r"sm_(\d+)", elf.stdout)) == set(bins.split(","))
    listed_ptx = run([tool, "--list-ptx", libcaffe])
    assert set(re.findall(r"sm_(\d+)", listed_ptx.stdout)) == {ptx}
    # Every kernel file contributes one ELF per architecture: dozens, not a stray one.
    assert elf.stdout.count(".sm_%s." % bins.split(",")[0]) > 40


def test_libcaffe_links_cuda_libraries_that_resolve(stamp, libcaffe):
    out = run(["ldd", libcaffe])
    assert "not found" not in out.stdout, out.stdout
    linked = set(re.findall(r"^\s*(lib[a-zA-Z]+)\.so", out.stdout, re.M))
    assert {"libcudart", "libcublas", "libcurand"} <= linked
    assert ("libcudnn" in linked) == (stamp["cudnn"] == "ON")


def test_cudnn_port_calls_the_v7_algorithm_queries(stamp, libcaffe):
    if stamp["cudnn"] != "ON":
        pytest.skip("this cached build has cuDNN off")
    symbols = run(["nm", "-D", "--undefined-only", libcaffe]).stdout
    for query in ("Forward", "BackwardFilter", "BackwardData"):
        assert "cudnnGetConvolution%sAlgorithm_v7" % query in symbols
        # the cuDNN <= 7 calls that cuDNN 8 removed must be gone
        assert not re.search(r"cudnnGetConvolution%sAlgorithm(@|\s|$)" % query, symbols)


def test_cuda_caffe_trains_in_cpu_mode_without_a_gpu(tmp_path):
    """Patch 0006: engine DEFAULT no longer forces cuDNN layers on a CPU-mode net."""
    solver = write_dummy_solver(tmp_path, max_iter=3)
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")  # "Optimization Done" is INFO
    out = run([os.path.join(PREFIX, "bin", "caffe"), "train", "--solver", str(solver)], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "Optimization Done" in out.stderr
    assert (tmp_path / "snap_iter_3.caffemodel").is_file()


def test_cuda_pycaffe_computes_what_the_cpu_build_computes(caffe, repo, tmp_path, stamp):
    """The same deploy net and weights through both flavours' pycaffe, CPU mode: equal."""
    deploy = os.path.join(repo, "prototxt", "alexnet_prelu_bn", "deploy.prototxt")
    net = caffe.Net(deploy, caffe.TEST)
    rng = np.random.default_rng(3)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.05, blob.data.shape)
    weights, image = tmp_path / "w.caffemodel", tmp_path / "x.npy"
    net.save(str(weights))
    x = rng.normal(0, 30, net.blobs["data"].data.shape).astype(np.float32)
    np.save(image, x)
    net.blobs["data"].data[...] = x
    expected = net.forward()["prob"].copy()

    pydir = os.path.join(PREFIX, "lib", "python3", "dist-packages")
    script = ("import numpy as np, caffe; caffe.set_mode_cpu(); "
              "n = caffe.Net(%r, caffe.TEST, weights=%r); n.blobs['data'].data[...] = np.load(%r); "
              "np.save(%r, n.forward()['prob']); print('nccl', caffe.has_nccl())"
              % (deploy, str(weights), str(image), str(tmp_path / "p.npy")))
    env = dict(os.environ, PYTHONPATH=pydir, GLOG_minloglevel="3")
    out = run([sys.executable, "-c", script], env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-1500:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-4, atol=1e-6)
    # NCCL linked in means `caffe train -gpu all` and the tools' multi-GPU path work.
    linked = "libnccl" in run(["ldd", os.path.join(PREFIX, "lib", "libcaffe.so")]).stdout
    assert out.stdout.split()[-2:] == ["nccl", str(linked)]
    assert linked or stamp["libs"] == "system"  # the wheels always bring NCCL
