"""tinycaffe: reproduce (and beat) a Caffe Tiny ImageNet project with real Caffe 1.0."""
__version__ = "0.1.0"

import os as _os

# The checkout this package lives in: defaults such as data/lmdb and prototxt/ are
# relative to it, so that they work from any directory (paths the user types are not).
REPO_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))


def repo_path(relative):
    """A default path of the project (data/lmdb/..., prototxt/..., runs) made absolute."""
    return _os.path.join(REPO_ROOT, relative)
