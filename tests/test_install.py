"""The Caffe that scripts/install_caffe.sh built: binary, pycaffe, math, failure paths."""
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_dummy_solver
from tinycaffe import caffe_env

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
    solver_path = write_dummy_solver(tmp_path, max_iter=5)
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


def test_install_script_cuda_without_a_toolkit_names_the_path(repo, tmp_path):
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-cuda"), TINYCAFFE_HOME=str(tmp_path / "home"))
    out = run(["bash", INSTALL, "--cuda", "--python", sys.executable], cwd=repo, env=env)
    assert out.returncode != 0
    assert "CUDA_HOME=%s: no bin/nvcc there" % (tmp_path / "no-cuda") in out.stderr
    assert not (tmp_path / "home" / "caffe-1.0-cuda").exists()


@pytest.mark.parametrize("args, env, message", [
    (["--arch", "90"], {}, "--arch and --no-cudnn are options of the CUDA flavour: add --cuda"),
    (["--no-cudnn"], {}, "--arch and --no-cudnn are options of the CUDA flavour: add --cuda"),
    (["--cuda"], {"CUDA_LIBS": "conda"}, "CUDA_LIBS=conda (valid: auto, system, wheels)"),
    (["--opencv-tools", "--cuda"], {}, "--opencv-tools builds the CPU flavour only: drop --cuda"),
    (["--cuda", "--opencv-tools"], {}, "--opencv-tools builds the CPU flavour only: drop --cuda"),
    (["--opencv-tools", "--arch", "90"], {}, "--opencv-tools builds the CPU flavour only: drop --arch"),
    (["--opencv-tools", "--no-cudnn"], {}, "--opencv-tools builds the CPU flavour only: drop --no-cudnn"),
])
def test_install_script_rejects_cuda_options_it_cannot_use(repo, tmp_path, args, env, message):
    env = dict(os.environ, TINYCAFFE_HOME=str(tmp_path / "home"), **env)
    out = run(["bash", INSTALL, *args, "--python", sys.executable], cwd=repo, env=env)
    assert out.returncode != 0
    assert message in out.stderr


@pytest.mark.skipif(not shutil.which("nvcc"), reason="no nvcc on PATH: the CUDA architecture check needs one")
def test_install_script_refuses_an_architecture_nvcc_cannot_build(repo, tmp_path):
    env = dict(os.environ, TINYCAFFE_HOME=str(tmp_path / "home"))
    out = run(["bash", INSTALL, "--cuda", "--arch", "35 90", "--python", sys.executable], cwd=repo, env=env)
    assert out.returncode != 0
    assert "--arch 35: CUDA" in out.stderr and "cannot build sm_35 (valid:" in out.stderr and " 90" in out.stderr
    assert not (tmp_path / "home" / "cuda13-libs").exists()  # refused before any download


def test_install_script_second_run_rebuilds_nothing(repo, caffe_bin, tmp_path):
    # A private TINYCAFFE_HOME around the real prefix: the test never switches the
    # machine's active flavour (a GPU box keeps its CUDA build).
    cpu_prefix = os.path.join(caffe_env.tinycaffe_home(), "caffe-1.0-cpu")
    if not os.path.isfile(os.path.join(cpu_prefix, ".tinycaffe-build")):
        pytest.skip("no CPU build here (the active one is %s)" % caffe_bin)
    home = _home_with(tmp_path, "cpu", **{"caffe-1.0-cpu": cpu_prefix})
    out = run(["bash", INSTALL, "--cpu", "--python", sys.executable], cwd=repo,
              env=dict(os.environ, TINYCAFFE_HOME=str(home)))
    assert out.returncode == 0, out.stderr
    assert "cached build matches" in out.stdout
    assert "compiling" not in out.stdout
    assert "pycaffe 1.0.0 OK" in out.stdout


def _hunks(patch):
    """[(file, old start, old length, new lines)] of a unified diff, in its order."""
    hunks, target = [], None
    with open(patch) as f:
        for line in f:
            if line.startswith("+++ b/"):
                target = line[6:].split("\t")[0].strip()
            elif line.startswith("@@"):
                old = line.split()[1][1:].split(",")
                hunks.append((target, int(old[0]), int(old[1]) if len(old) > 1 else 1, []))
            elif hunks and line[:1] in (" ", "+") and not line.startswith("+++ "):
                hunks[-1][3].append(line[1:])
    return hunks


def _write_patched_files(repo, src):
    """Write, for every file our patches touch, what the patches leave there: each patch in
    turn replaces its hunks' old lines by their new ones (context + added) in a file whose
    lines no hunk shows are blank, and moves the lines below. Every line any hunk shows is
    then where a real patched tree has it, so the patches reverse one after the other, from
    the last, as on a tree that holds them all."""
    files = {}
    for patch in sorted(glob.glob(os.path.join(repo, "scripts/patches/*.patch"))):
        for target, old_start, old_length, new in reversed(_hunks(patch)):  # from the bottom: the tops stay put
            lines = files.setdefault(target, [])
            at = old_start if old_length == 0 else old_start - 1  # a pure insertion comes after its line
            lines.extend(["\n"] * max(0, at + old_length - len(lines)))
            lines[at:at + old_length] = new
    for target, lines in files.items():
        path = src / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines))


def test_failed_build_leaves_no_prefix_behind(repo, tmp_path):
    """A source tree whose configure fails: exit non-zero, no prefix, no scratch dir."""
    src = tmp_path / "bad-src"
    _write_patched_files(repo, src)
    with open(src / "CMakeLists.txt", "a") as f:  # after the patched lines, which must still reverse
        f.write('\nmessage(FATAL_ERROR "boom")\n')
    home = tmp_path / "home"
    env = dict(os.environ, TINYCAFFE_HOME=str(home), CAFFE_SRC=str(src))
    out = run(["bash", INSTALL, "--cpu", "--python", sys.executable], cwd=repo, env=env)
    assert out.returncode != 0
    patches = glob.glob(os.path.join(repo, "scripts/patches/*.patch"))
    assert out.stdout.count("patch already applied") == len(patches) and "patched:" not in out.stdout, out.stdout
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


def _home_with(tmp_path, flavour_active, **prefixes):
    """A TINYCAFFE_HOME whose caffe.env says flavour_active, with the given prefixes linked in."""
    home = tmp_path / "home"
    home.mkdir()
    for name, target in prefixes.items():
        (home / name).symlink_to(target)
    (home / "caffe.env").write_text("CAFFE_FLAVOUR=%s\n" % flavour_active)
    return home


@pytest.mark.parametrize("prefix, message, flavour_after", [
    ("caffe-1.0-cuda", "keeping the active CUDA build", "cuda"),   # a GPU box stays on CUDA
    ("caffe-1.0-cpu", "cached build matches", "cpu"),              # the CUDA build is gone: CPU
])
def test_no_flavour_flag_keeps_the_active_build_else_cpu(repo, tmp_path, prefix, message, flavour_after):
    """caffe.env says cuda; only `prefix` exists. No flag: reuse, never compile."""
    real = os.path.join(caffe_env.tinycaffe_home(), prefix)
    if not os.path.isfile(os.path.join(real, ".tinycaffe-build")):
        pytest.skip("no cached %s build here (scripts/install_caffe.sh --%s)" % (prefix, flavour_after))
    home = _home_with(tmp_path, "cuda", **{prefix: real})
    out = run(["bash", INSTALL, "--python", sys.executable], cwd=repo, env=dict(os.environ, TINYCAFFE_HOME=str(home)))
    assert out.returncode == 0, out.stderr
    assert message in out.stdout and "compiling" not in out.stdout
    assert "CAFFE_FLAVOUR=%s" % flavour_after in (home / "caffe.env").read_text()
