"""Classify image files (any JPEG or PNG, any size) with one model or an ensemble: the top-k
classes with wnid, words and probability, DIGITS' "classify one / classify many".

An image is decoded exactly as make_lmdb.py decodes it (Pillow, grey and palette images to
three channels, resized to the LMDB's side with the same filter, BGR C x H x W) and then goes
through the path evaluate.py takes on the val LMDB (the net's TEST transform from its
train_val, Caffe's center crop, the averaged softmax of the models): a val JPEG gets the same
probabilities here as its record in the val LMDB gets there.
"""
import os

import numpy as np

from . import data, evaluate, fit

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DEFAULT_TOP = 5  # classes listed per image


class ClassifyError(evaluate.EvalError):
    """Bad input: one line naming the file and what was expected."""


def image_paths(inputs):
    """The image files named, folders searched at any depth (sorted within each folder)."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            inside = sorted(_images_under(item))
            if not inside:
                raise ClassifyError("%s: no JPEG or PNG files in this folder (expected %s)"
                                    % (item, ", ".join(IMAGE_SUFFIXES)))
            found.extend(inside)
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise ClassifyError("%s: no such image file or folder" % item)
    return found


def _images_under(top):
    """JPEG/PNG files below a folder, symlinked folders followed once (a link loop is no endless walk)."""
    seen = set()
    for folder, subfolders, names in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        for name in names:
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield os.path.join(folder, name)


def data_lmdb(deploy, train_val, lmdb):
    """The LMDB that says the images' side and the classes: --lmdb, else the TEST LMDB of the net's
    train_val (beside the deploy file, as in a run dir). ClassifyError when there is none."""
    if lmdb:
        if os.path.isdir(os.path.join(lmdb, "val_lmdb")):  # make_lmdb.py's folder rather than its val_lmdb
            return os.path.join(lmdb, "val_lmdb")
        if not os.path.isfile(os.path.join(lmdb, "data.mdb")):
            raise ClassifyError("--lmdb %s: no such LMDB (expected make_lmdb.py's val_lmdb, or its folder)" % lmdb)
        return lmdb
    source = evaluate.trained_lmdb(deploy, train_val)
    if source and os.path.isdir(source):
        return source
    raise ClassifyError("%s: no train_val.prototxt beside it naming a val LMDB that exists here; give --lmdb "
                        "(make_lmdb.py's val_lmdb: its labels.txt, mean and image size are the model's)" % deploy)


class Classifier:
    """Models loaded once; classify() any number of image files with them."""

    def __init__(self, models, lmdb=None, mean=None, labels=None, train_val=None, gpu=None, weights=None):
        self.lmdb = data_lmdb(models[0][0], train_val, lmdb)
        folder = fit.dataset_dir(self.lmdb)
        self.labels = data.read_labels(labels or os.path.join(folder, "labels.txt"))
        self.nets = []
        for (deploy, caffemodel), w in zip(models, weights or [1.0] * len(models)):
            net = evaluate.load_net(deploy, caffemodel, gpu)
            if evaluate.net_classes(net) != len(self.labels):
                raise ClassifyError("%s has %d class outputs but %s lists %d classes"
                                    % (deploy, evaluate.net_classes(net), labels or folder + "/labels.txt",
                                       len(self.labels)))
            self.nets.append((net, w))
        self.names = [w for _, w in models]
        self.pre = evaluate.ensemble_preprocessing([d for d, _ in models], train_val,
                                                   mean or os.path.join(folder, "mean.binaryproto"), mean is not None,
                                                   self.lmdb, evaluate.net_crop(self.nets[0][0]))
        shape = fit.image_shape(self.lmdb)
        self.side = shape[-1] if shape else evaluate.net_crop(self.nets[0][0])

    def probabilities(self, paths, batch=evaluate.DEFAULT_BATCH, progress=None, failed=None):
        """The ensemble's averaged softmax for each image that decodes (images x classes), and the
        paths they are of. An image that does not decode is skipped; failed (a list) gets its message."""
        def records():
            for path in paths:
                try:
                    raw, _, _ = data.decode_bgr_chw(path, self.side)
                except data.DataError as exc:
                    if failed is None:
                        raise ClassifyError(str(exc)) from exc
                    failed.append(str(exc))
                    continue
                yield path, -1, np.frombuffer(raw, np.uint8).reshape(3, self.side, self.side)
        pred = evaluate.predict_images(self.nets, records(), self.side, self.pre, "center", batch, progress,
                                       self.names)
        return pred.probs, pred.keys

    def classify(self, paths, top=DEFAULT_TOP, batch=evaluate.DEFAULT_BATCH, progress=None, failed=None):
        """[{"image": path, "top": [{"wnid", "words", "prob"}, ...]}, ...] in the order of paths; with
        failed (a list), images that do not decode are left out and their messages put there."""
        if top < 1:
            raise ClassifyError("--top %d: expected a number of classes >= 1" % top)
        probs, kept = self.probabilities(paths, batch, progress, failed)
        out = []
        for path, p in zip(kept, probs):
            best = np.argsort(-p, kind="stable")[:top]
            out.append({"image": path, "top": [{"wnid": self.labels[c][0], "words": self.labels[c][1],
                                                "prob": float(p[c])} for c in best]})
        return out
