"""Where Caffe is: the `caffe` binary and pycaffe, as installed by scripts/install_caffe.sh.

Order of precedence: the CAFFE_BIN environment variable, then the location file
that install_caffe.sh writes ($TINYCAFFE_HOME/caffe.env), then `caffe` on PATH.
pycaffe itself is importable from the project's venv through a .pth file.
"""
import functools
import importlib
import importlib.util
import os
import shutil
import sys


class CaffeNotFound(RuntimeError):
    pass


def tinycaffe_home():
    return os.environ.get("TINYCAFFE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tinycaffe")


def reference_dir():
    """BVLC Caffe's own examples/ and models/ prototxt files, kept by install_caffe.sh."""
    return os.path.join(tinycaffe_home(), "caffe-reference")


def location_file():
    return os.path.join(tinycaffe_home(), "caffe.env")


def read_location():
    """The KEY=VALUE pairs of caffe.env, or {} when Caffe was never installed."""
    values = {}
    try:
        with open(location_file()) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    values[key] = value
    except FileNotFoundError:
        pass
    return values


def caffe_binary():
    """Absolute path of the `caffe` tool; raises CaffeNotFound with what to run."""
    candidates = [os.environ.get("CAFFE_BIN"), read_location().get("CAFFE_BIN"), shutil.which("caffe")]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise CaffeNotFound("no caffe binary found (CAFFE_BIN, %s, PATH); run scripts/setup.sh" % location_file())


def import_caffe():
    """Import pycaffe quietly (glog to warnings and up) or say how to get it."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe  # noqa: F401  (pycaffe, from the .pth that setup.sh writes)
    except ImportError as exc:
        raise CaffeNotFound("cannot import pycaffe (%s); run scripts/setup.sh and use .venv/bin/python" % exc) from exc
    return caffe


PB2_MODULE = "caffe.proto.caffe_pb2"


def caffe_pb2():
    """Caffe's own protobuf messages (caffe/proto/caffe_pb2.py of the built pycaffe).

    Loaded from its file, without running caffe/__init__.py: that one loads
    _caffe.so (libcaffe, Boost, and for the CUDA flavour the CUDA libraries), which
    tools that only read and write messages do not need. It is registered under its
    real name, so a later `import caffe` reuses this very module (one descriptor pool,
    one set of classes).
    """
    if PB2_MODULE in sys.modules:
        return sys.modules[PB2_MODULE]
    if "caffe" in sys.modules:
        import_caffe()
        return importlib.import_module(PB2_MODULE)
    spec = importlib.util.find_spec("caffe")
    if spec is None or not spec.submodule_search_locations:
        raise CaffeNotFound("cannot find pycaffe; run scripts/setup.sh and use .venv/bin/python")
    path = os.path.join(spec.submodule_search_locations[0], "proto", "caffe_pb2.py")
    pb2_spec = importlib.util.spec_from_file_location(PB2_MODULE, path)
    module = importlib.util.module_from_spec(pb2_spec)
    sys.modules[PB2_MODULE] = module
    try:
        pb2_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PB2_MODULE]
        raise
    return module


@functools.lru_cache(maxsize=None)  # a build's answer: asked once per process (a sweep worker asks per trial)
def registered_layer_types():
    """The layer types this Caffe build knows (ImageData and WindowData need OpenCV, which the
    tinycaffe build leaves out)."""
    return frozenset(import_caffe().layer_type_list())


@functools.lru_cache(maxsize=None)
def has_leveldb():
    """Whether libcaffe links LevelDB (the tinycaffe build: -DUSE_LEVELDB=OFF)."""
    import subprocess
    pydir = read_location().get("PYCAFFE_DIR")
    root = read_location().get("CAFFE_ROOT")
    for lib in ([os.path.join(root, "lib", "libcaffe.so")] if root else []) + \
            ([os.path.join(pydir, "caffe", "_caffe.so")] if pydir else []):
        if os.path.exists(lib):
            out = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
            return "libleveldb" in out
    return False
