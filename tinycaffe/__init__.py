"""tinycaffe: reproduce (and beat) a Caffe Tiny ImageNet project with real Caffe 1.0."""
__version__ = "0.1.0"
