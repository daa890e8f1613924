"""Where Caffe is: the `caffe` binary and pycaffe, as installed by scripts/install_caffe.sh.

Order of precedence: the CAFFE_BIN environment variable, then the location file
that install_caffe.sh writes ($TINYCAFFE_HOME/caffe.env), then `caffe` on PATH.
pycaffe itself is importable from the project's venv through a .pth file.
"""
import os
import shutil


class CaffeNotFound(RuntimeError):
    pass


def tinycaffe_home():
    return os.environ.get("TINYCAFFE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tinycaffe")


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
        raise CaffeNotFound("cannot import pycaffe (%s); run scripts/setup.sh and use .venv/bin/python" % exc)
    return caffe


_PB2 = []


def caffe_pb2():
    """Caffe's own protobuf messages (caffe.proto.caffe_pb2), imported once."""
    if not _PB2:
        import_caffe()
        from caffe.proto import caffe_pb2 as pb2
        _PB2.append(pb2)
    return _PB2[0]
