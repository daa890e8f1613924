"""tinycaffe: Tiny ImageNet with real BVLC Caffe 1.0 (see README.md)."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements():
    runtime, test, current = [], [], None
    with open(os.path.join(HERE, "requirements.txt")) as f:
        for line in f:
            line = line.strip()
            if line.startswith("# ---"):
                current = test if "test" in line else runtime
            elif line and not line.startswith("#"):
                (current if current is not None else runtime).append(line)
    return runtime, test


def _version():
    with open(os.path.join(HERE, "tinycaffe", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


RUNTIME, TEST = _requirements()

setup(
    name="tinycaffe",
    version=_version(),
    description="Reproduce and beat a Caffe Tiny ImageNet project with real BVLC Caffe 1.0",
    packages=find_packages(include=["tinycaffe", "tinycaffe.*"]),
    package_data={"tinycaffe": ["resources/*.txt"]},
    python_requires=">=3.9",
    install_requires=RUNTIME,
    extras_require={"test": TEST},
)
