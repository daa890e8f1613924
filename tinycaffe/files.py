"""Small file helpers every module shares: atomic writes and prototxt reading."""
import contextlib
import os
import re

from google.protobuf import text_format


class PrototxtError(ValueError):
    """A prototxt that cannot be read or parsed; the message is `FILE:LINE:COL: reason`."""


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Write to path + '.tmp' and rename it into place only when the block completes."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)  # in the try: a failed rename (path is a folder, ...) leaves no .tmp either
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path, text):
    with atomic_open(path) as f:
        f.write(text)


def parse_prototxt(path, text, message):
    """Parse text (read from path) into message (a caffe_pb2 message) and return it, as Caffe's
    C++ TextFormat::Parse does: a non-repeated field given twice (num_output, base_lr) is an
    error, not the last one silently winning (Python's Merge)."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise PrototxtError("%s:%s:%s: %s" % (path, exc.GetLine(), exc.GetColumn(),
                                             re.sub(r"^\d+:\d+ : ", "", str(exc)))) from exc
    return message


def read_prototxt(path, message):
    """Read the text-format file at path into message and return it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise PrototxtError("%s: cannot read (%s)" % (path, exc.strerror)) from exc
    return parse_prototxt(path, text, message)
