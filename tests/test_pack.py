"""scripts/pack_caffe.sh: one relocatable archive of the built Caffe that runs elsewhere.

The active build is packed once, unpacked in a new directory, and run there with a
bare environment: the tools, libcaffe and pycaffe must load only the packed copies of
every library except glibc, the C++ runtime and the GPU driver.
"""
import os
import re
import subprocess
import sys
import tarfile

import pytest

from tinycaffe import caffe_env

PACK = "scripts/pack_caffe.sh"
# What the target machine itself provides (the pack script's SYSTEM_LIBS).
SYSTEM = re.compile(r"^(linux-vdso|ld-linux[-.a-z0-9_]*|libc|libm|libdl|libpthread|librt|libutil|libresolv"
                    r"|libstdc\+\+|libgcc_s)\.so")
BARE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def target_env(bundle, **extra):
    """A bare environment; for a CUDA bundle plus the CUDA libraries a target provides
    (here: the view install_caffe.sh made of them, standing in for the target's wheels)."""
    env = dict(BARE_ENV, **extra)
    if (bundle / "host-libs.txt").read_text().split():
        major = re.search(r" cuda=(\d+)\.", (bundle / "MANIFEST.txt").read_text()).group(1)
        env["LD_LIBRARY_PATH"] = os.path.join(caffe_env.tinycaffe_home(), "cuda%s-libs" % major, "lib")
    return env


@pytest.fixture(scope="module")
def packed(repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    archive = root / "caffe.tar.xz"
    out = run(["bash", PACK, "--out", str(archive)], cwd=repo)
    assert out.returncode == 0, out.stderr
    unpacked = root / "elsewhere"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked)
    (bundle,) = list(unpacked.iterdir())
    return archive, bundle, out.stdout


def elf_files(bundle):
    for folder, _, files in os.walk(bundle):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and open(path, "rb").read(4) == b"\x7fELF":
                yield path


def test_pack_reports_size_and_writes_only_the_finished_archive(packed):
    archive, bundle, stdout = packed
    mib = os.path.getsize(archive) / 2 ** 20
    assert re.search(r"archive: %s \(%.1f MiB, unpacked \d+ MiB\)" % (re.escape(str(archive)), mib), stdout)
    assert not os.path.exists(str(archive) + ".tmp")
    assert bundle.name == "caffe-1.0-%s" % caffe_env.read_location().get("CAFFE_FLAVOUR", "cpu")


def test_every_packed_elf_loads_only_packed_or_system_libraries(packed):
    _, bundle, _ = packed
    checked = 0
    for path in elf_files(bundle):
        out = run(["ldd", path], env=target_env(bundle))
        assert "not found" not in out.stdout, "%s: %s" % (path, out.stdout)
        for soname, target in re.findall(r"^\s*(\S+) => (\S+)", out.stdout, re.M):
            if not SYSTEM.match(soname) and not soname.startswith(("libcublas", "libcurand", "libcudnn", "libnccl")):
                assert target.startswith(str(bundle)), "%s loads %s from %s" % (path, soname, target)
        runpath = run(["patchelf", "--print-rpath", path]).stdout.strip()
        assert runpath.startswith("$ORIGIN"), "%s: RUNPATH %r" % (path, runpath)
        checked += 1
    assert checked >= 10  # the tools, libcaffe, _caffe.so and their libraries


def test_packed_caffe_runs_a_net_with_a_bare_environment(packed, repo):
    _, bundle, _ = packed
    out = run([str(bundle / "bin" / "caffe"), "--version"], env=target_env(bundle))
    assert out.returncode == 0 and out.stdout.strip() == "caffe version 1.0.0", out.stderr
    deploy = os.path.join(repo, "prototxt", "tiny", "deploy.prototxt")
    out = run(["bash", "-c", 'source "$1/env.sh" && caffe time -model "$2" -iterations 2', "_", str(bundle), deploy],
              env=target_env(bundle))
    assert out.returncode == 0, out.stderr[-1500:]
    assert re.search(r"Average Forward-Backward: [\d.]+ ms", out.stderr)


def test_packed_pycaffe_imports_from_the_bundle(packed, repo):
    _, bundle, _ = packed
    script = ("import caffe; caffe.set_mode_cpu(); "
              "n = caffe.Net(%r, caffe.TEST); print(caffe.__file__); print(n.forward()['prob'].shape)"
              % os.path.join(repo, "prototxt", "tiny", "deploy.prototxt"))
    env = target_env(bundle, PYTHONPATH=str(bundle / "python"), GLOG_minloglevel="3")
    out = run([sys.executable, "-c", script], env=env, cwd=str(bundle))
    assert out.returncode == 0, out.stderr[-1500:]
    lines = out.stdout.split()
    assert lines[0] == str(bundle / "python" / "caffe" / "__init__.py")
    assert lines[1:] == ["(1,", "200)"]


def test_manifest_says_what_the_target_needs(packed):
    _, bundle, _ = packed
    manifest = (bundle / "MANIFEST.txt").read_text()
    assert re.search(r"^needs glibc: 2\.\d+ or newer .*GLIBCXX_3\.4\.\d+$", manifest, re.M)
    assert re.search(r"^python for pycaffe: 3\.\d+$", manifest, re.M)
    packed_libs = re.search(r"^packed libraries: (.*)$", manifest, re.M).group(1).split()
    assert "libopenblas.so.0" in packed_libs and "libprotobuf.so.32" in packed_libs
    assert (bundle / "check.sh").stat().st_mode & 0o111
    if "blas=openblas-openmp" in manifest:  # the CPU flavour of patch 0011: its OpenMP runtime travels too
        import ctypes
        assert "libgomp.so.1" in packed_libs
        # OpenBLAS says how it was built: 0 sequential, 1 pthreads, 2 OpenMP
        assert ctypes.CDLL(str(bundle / "lib" / "libopenblas.so.0")).openblas_get_parallel() == 2


def test_check_script_names_a_missing_library(packed, tmp_path):
    """Take libcaffe away (no system has it): check.sh must say so, and fail."""
    _, bundle, _ = packed
    copy = tmp_path / bundle.name
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    os.remove(os.path.realpath(copy / "lib" / "libcaffe.so"))
    out = run([str(copy / "check.sh")], env=target_env(bundle))
    assert out.returncode == 1
    assert "check: missing libraries: libcaffe.so.1.0.0" in out.stderr


def test_pack_refuses_a_prefix_without_caffe(repo, tmp_path):
    out = run(["bash", PACK, "--prefix", str(tmp_path)], cwd=repo)
    assert out.returncode != 0
    assert "%s: expected bin/caffe and lib/libcaffe.so" % tmp_path in out.stderr
