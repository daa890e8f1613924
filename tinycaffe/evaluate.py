"""Run deploy nets over an LMDB: val top-1/top-5, per-class accuracy, confusions, and the
averaged softmax of several models (ensembles) for the submission file.

Preprocessing is Caffe's TEST transform: the image minus mean.binaryproto, then the
crop (the deploy input's side); `center` is Caffe's own center crop, so top-1 agrees
with `caffe test` on the train_val net of the same model.
"""
import os
import time

import numpy as np

from . import data
from .caffe_env import caffe_pb2, import_caffe
from .files import PrototxtError, read_prototxt

TTA_MODES = ("center", "mirror", "10crop")
DEFAULT_BATCH = 50  # images per forward (x crops per image)
DEFAULT_VAL_LMDB = "data/lmdb/val_lmdb"  # make_lmdb.py's outputs, relative to the repo root
DEFAULT_TEST_LMDB = "data/lmdb/test_lmdb"
DEFAULT_MEAN = "data/lmdb/mean.binaryproto"


def add_model_arguments(parser, lmdb_help):
    """--deploy, --weights, --lmdb (val by default) and --mean, as every model tool takes them."""
    parser.add_argument("--deploy", required=True, help="deploy.prototxt (e.g. a run dir's)")
    parser.add_argument("--weights", required=True, help=".caffemodel")
    parser.add_argument("--lmdb", default=DEFAULT_VAL_LMDB, help="%s (default %s)" % (lmdb_help, DEFAULT_VAL_LMDB))
    parser.add_argument("--mean", default=DEFAULT_MEAN, help="mean.binaryproto (default %s)" % DEFAULT_MEAN)


class EvalError(Exception):
    """Bad input: one line naming the file and what was expected."""


# ---------------------------------------------------------------- crops
def crop_offsets(side, crop, mode):
    """(y, x, flip) for each view of an image: Caffe's center crop, its mirror, AlexNet's 10 crops."""
    c = (side - crop) // 2  # Caffe's DataTransformer: (height - crop_size) / 2
    if mode == "center":
        return [(c, c, False)]
    if mode == "mirror":
        return [(c, c, False), (c, c, True)]
    if mode == "10crop":
        e = side - crop
        corners = [(0, 0), (0, e), (e, 0), (e, e), (c, c)]
        return [(y, x, f) for f in (False, True) for y, x in corners]
    raise EvalError("unknown --tta '%s' (valid: %s)" % (mode, ", ".join(TTA_MODES)))


def views(chw_minus_mean, crop, offsets):
    out = []
    for y, x, flip in offsets:
        v = chw_minus_mean[:, y:y + crop, x:x + crop]
        out.append(v[:, :, ::-1] if flip else v)
    return out


# ---------------------------------------------------------------- models
def trained_blob_shapes(deploy, weights):
    """Layer name -> parameter shapes stored in the caffemodel, read before Caffe sees it (Caffe
    aborts on a shape mismatch and silently leaves a renamed layer at its random initialisation).
    The deploy file is parsed here too, so that a typo is a FILE:LINE:COL error, not a glog abort."""
    for path, what in ((deploy, "deploy prototxt"), (weights, ".caffemodel")):
        if not os.path.isfile(path):
            raise EvalError("%s: no such %s" % (path, what))
    try:
        read_prototxt(deploy, caffe_pb2().NetParameter())
    except PrototxtError as exc:
        raise EvalError(str(exc)) from exc
    trained = caffe_pb2().NetParameter()
    with open(weights, "rb") as f:
        try:
            trained.ParseFromString(f.read())
        except Exception as exc:  # protobuf's DecodeError
            raise EvalError("%s: not a .caffemodel (%s)" % (weights, exc)) from exc
    return {layer.name: [list(b.shape.dim) for b in layer.blobs] for layer in trained.layer if layer.blobs}


def load_net(deploy, weights, gpu=None):
    """A TEST-phase pycaffe Net with weights checked against deploy first."""
    blobs = trained_blob_shapes(deploy, weights)
    caffe = import_caffe()
    if gpu is not None:
        caffe.set_device(int(gpu))
        caffe.set_mode_gpu()
    else:
        caffe.set_mode_cpu()
    net = caffe.Net(deploy, caffe.TEST)
    for name, params in net.params.items():
        if name not in blobs:
            raise EvalError("%s: layer '%s' has no weights in %s (renamed layer? weights would stay random)"
                            % (deploy, name, weights))
        want = [list(p.data.shape) for p in params]
        if blobs[name] != want:
            raise EvalError("%s: layer '%s' has shapes %s in %s but %s in the deploy net"
                            % (deploy, name, blobs[name], weights, want))
    net.copy_from(weights)
    return net


def output_blob(net):
    return "prob" if "prob" in net.blobs else net.outputs[-1]


# ---------------------------------------------------------------- running over an LMDB
def predict(nets_and_weights, lmdb_path, mean, tta="center", batch=DEFAULT_BATCH, progress=None):
    """Averaged probabilities of several (net, model weight) pairs over every record.

    Returns (keys, labels, probs of shape N x classes, per-model probs list, seconds).
    """
    if not os.path.isfile(os.path.join(lmdb_path, "data.mdb")):
        raise EvalError("%s: not an LMDB (no data.mdb)" % lmdb_path)
    nets = [n for n, _ in nets_and_weights]
    crop = nets[0].blobs["data"].data.shape[-1]
    classes = {n.blobs[output_blob(n)].data.shape[1] for n in nets}
    if len(classes) != 1:
        raise EvalError("the models disagree on the class count: %s" % sorted(classes))
    offsets = crop_offsets(mean.shape[-1], crop, tta)
    keys, labels, per_model = [], [], [[] for _ in nets]
    t0 = time.time()

    def flush(images):
        stack = np.stack([v for img in images for v in views(img, crop, offsets)])
        for i, net in enumerate(nets):
            net.blobs["data"].reshape(*stack.shape)
            net.reshape()
            net.blobs["data"].data[...] = stack
            out = net.forward()[output_blob(net)].reshape(len(images), len(offsets), -1).mean(axis=1)
            per_model[i].append(out.copy())
        if progress:
            progress(len(images))

    pending = []
    for key, datum in data.iter_lmdb(lmdb_path):
        chw = np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
        if chw.shape != mean.shape:
            raise EvalError("%s: record %s is %s but the mean is %s" % (lmdb_path, key, chw.shape, mean.shape))
        pending.append(chw.astype(np.float32) - mean)
        keys.append(key)
        labels.append(datum.label)
        if len(pending) == batch:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    seconds = time.time() - t0
    model_probs = [np.concatenate(p) if p else np.zeros((0, classes.pop())) for p in per_model]
    weights = np.array([w for _, w in nets_and_weights], np.float64)
    weights = weights / weights.sum()
    ensemble = sum(w * p for w, p in zip(weights, model_probs))
    return keys, np.array(labels), ensemble, model_probs, seconds


def topk_accuracy(probs, labels, k):
    """Caffe's Accuracy layer rule: right when fewer than k classes score strictly higher than
    the true one (ties count in the label's favour)."""
    if not len(labels):
        return 0.0
    true_scores = probs[np.arange(len(labels)), labels]
    better = (probs > true_scores[:, None]).sum(axis=1)
    return float(np.mean(better < k))


def per_class_accuracy(probs, labels, num_classes):
    pred = probs.argmax(1)
    return [(c, int((labels == c).sum()), float((pred[labels == c] == c).mean()) if (labels == c).any() else None)
            for c in range(num_classes)]


def confusions(probs, labels, top=10):
    """Most frequent (true, predicted) pairs with true != predicted."""
    pred = probs.argmax(1)
    pairs = {}
    for t, p in zip(labels.tolist(), pred.tolist()):
        if t != p:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    return sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def run_dir_of(weights):
    """Where a model's outputs go by default: its run dir (the parent of snapshots/) or its folder."""
    folder = os.path.dirname(os.path.abspath(weights))
    return os.path.dirname(folder) if os.path.basename(folder) == "snapshots" else folder
