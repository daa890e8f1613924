"""Data files shipped inside the package."""
import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def reference_wnids():
    """The 200 real Tiny ImageNet wnids, in the release's (unsorted) order."""
    with open(os.path.join(HERE, "wnids.txt")) as f:
        return tuple(line.strip() for line in f if line.strip())
