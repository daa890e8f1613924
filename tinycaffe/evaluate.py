"""Run deploy nets over an LMDB: val top-1/top-5, per-class accuracy, confusions, and the
averaged softmax of several models (ensembles) for the submission file.

Preprocessing is Caffe's TEST transform: the image minus mean.binaryproto, then the
crop (the deploy input's side); `center` is Caffe's own center crop, so top-1 agrees
with `caffe test` on the train_val net of the same model.
"""
import os
import time

import numpy as np

from . import data, fit, repo_path
from .caffe_env import caffe_pb2, import_caffe
from .files import PrototxtError, read_prototxt

TTA_MODES = ("center", "mirror", "10crop")
DEFAULT_BATCH = 50  # images per forward (x crops per image)
DEFAULT_VAL_LMDB = "data/lmdb/val_lmdb"  # make_lmdb.py's outputs, relative to the repo root
DEFAULT_TEST_LMDB = "data/lmdb/test_lmdb"
DEFAULT_MEAN = "data/lmdb/mean.binaryproto"
MEAN_HELP = "mean.binaryproto (default: the one beside --lmdb)"
LABELS_HELP = "labels.txt (default: the one beside --lmdb)"


def add_model_arguments(parser, lmdb_help, default_lmdb=DEFAULT_VAL_LMDB):
    """--deploy, --weights, --lmdb (val by default) and --mean, as every model tool takes them."""
    parser.add_argument("--deploy", required=True, help="deploy.prototxt (e.g. a run dir's)")
    parser.add_argument("--weights", required=True, help=".caffemodel")
    add_data_arguments(parser, lmdb_help, default_lmdb)


def add_data_arguments(parser, lmdb_help, default_lmdb):
    """--lmdb, --mean and --labels; the last two default to the files beside the LMDB."""
    parser.add_argument("--lmdb", default=None, help="%s (default %s)" % (lmdb_help, default_lmdb))
    parser.add_argument("--mean", default=None, help=MEAN_HELP)
    parser.add_argument("--labels", default=None, help=LABELS_HELP)
    parser.set_defaults(default_lmdb=default_lmdb)


def resolve_data_arguments(args):
    """Fill --lmdb, --mean, --labels in place: an LMDB brings its own mean and labels (make_lmdb.py
    writes them beside it), never another dataset's; the default LMDB is the repo's data/lmdb."""
    args.lmdb = args.lmdb or repo_path(args.default_lmdb)
    folder = fit.dataset_dir(args.lmdb)
    args.mean = args.mean or os.path.join(folder, "mean.binaryproto")
    args.labels = args.labels or os.path.join(folder, "labels.txt")


def check_batch(batch):
    if batch < 1:
        raise EvalError("--batch %d: expected images per forward >= 1" % batch)


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


def score_blob(net):
    """The blob Caffe's Accuracy layer reads in train_val: the input of the deploy net's Softmax
    (the last InnerProduct's outputs), or the output blob when there is no Softmax."""
    out = output_blob(net)
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type == "Softmax" and out in net.top_names[name]:
            return net.bottom_names[name][0]
    return out


def net_classes(net):
    return net.blobs[output_blob(net)].data.shape[1]


def input_blob(net):
    """The deploy net's image input (`data` in generated nets; whatever a hand-edited one calls it)."""
    return net.inputs[0] if net.inputs else "data"


def net_crop(net):
    return net.blobs[input_blob(net)].data.shape[-1]


# ---------------------------------------------------------------- what the data is
def lmdb_kind(lmdb_path):
    """"test" (unlabelled records, test_N.JPEG keys) or "labelled" (val, train), from the first record."""
    for key, datum in data.iter_lmdb(lmdb_path, limit=1):
        return "test" if datum.label == data.TEST_LABEL else "labelled"
    raise EvalError("%s: empty LMDB (no records)" % lmdb_path)


def require_lmdb_kind(lmdb_path, kind, tool):
    """Refuse, before any inference, an LMDB of the wrong split."""
    found = lmdb_kind(lmdb_path)
    if found == kind:
        return
    if kind == "test":
        raise EvalError("%s: its records are labelled (a val or train LMDB); %s needs the unlabelled test "
                        "LMDB (make_lmdb.py's test_lmdb)" % (lmdb_path, tool))
    raise EvalError("%s: a test LMDB (unlabelled records, label -1); %s needs a labelled one (make_lmdb.py's "
                    "val_lmdb)" % (lmdb_path, tool))


def read_mean_for(mean_path, lmdb_path, crop):
    """mean.binaryproto checked against the LMDB's images and the net's crop, before inference."""
    if not os.path.isfile(mean_path):
        raise EvalError("%s: no such mean file (expected mean.binaryproto from make_lmdb.py)" % mean_path)
    mean = data.read_mean(mean_path)
    shape = fit.image_shape(lmdb_path)
    if shape and tuple(shape) != mean.shape:
        raise EvalError("%s is %s but the images of %s are %s: the mean comes from another LMDB (use the "
                        "mean.binaryproto make_lmdb.py wrote beside it)"
                        % (mean_path, "x".join(map(str, mean.shape)), lmdb_path, "x".join(map(str, shape))))
    if mean.shape[1] < crop or mean.shape[2] < crop:
        raise EvalError("the deploy net crops %dx%d but the images of %s are %dx%d: make the LMDB with "
                        "--size >= %d or generate the net with --crop <= %d"
                        % (crop, crop, lmdb_path, mean.shape[1], mean.shape[2], crop, min(mean.shape[1:])))
    return mean


def check_classes(net, deploy, labels_path):
    """Refuse a model whose class outputs are not the labels' count."""
    count = len(data.read_labels(labels_path))
    if net_classes(net) != count:
        raise EvalError("%s has %d class outputs but %s lists %d classes: the model and the LMDB come from "
                        "different datasets" % (deploy, net_classes(net), labels_path, count))


# ---------------------------------------------------------------- running over an LMDB
class Predictions:
    """What predict() returns: per image keys and labels, the ensemble's averaged softmax
    (probs), and per model its averaged softmax and its averaged scores (the Softmax's input,
    what Caffe's Accuracy layer ranks)."""

    def __init__(self, keys, labels, probs, model_probs, model_scores, seconds):
        self.keys, self.labels, self.probs = keys, labels, probs
        self.model_probs, self.model_scores, self.seconds = model_probs, model_scores, seconds


def predict(nets_and_weights, lmdb_path, mean, tta="center", batch=DEFAULT_BATCH, progress=None, names=None):
    """Averaged probabilities of several (net, model weight) pairs over every record -> Predictions.
    names: what to call each model in an error (its .caffemodel), default "model N"."""
    check_batch(batch)
    nets = [n for n, _ in nets_and_weights]
    crop = net_crop(nets[0])
    crops = {net_crop(n) for n in nets}
    if len(crops) != 1:
        raise EvalError("the models' deploy nets take different crops %s: an ensemble needs one" % sorted(crops))
    classes = {net_classes(n) for n in nets}
    if len(classes) != 1:
        raise EvalError("the models disagree on the class count: %s" % sorted(classes))
    offsets = crop_offsets(mean.shape[-1], crop, tta)
    keys, labels = [], []
    per_model = [([], []) for _ in nets]  # (probs, scores) chunks
    t0 = time.time()

    def flush(images):
        stack = np.stack([v for img in images for v in views(img, crop, offsets)])
        for net, (probs, scores) in zip(nets, per_model):
            net.blobs[input_blob(net)].reshape(*stack.shape)
            net.reshape()
            net.blobs[input_blob(net)].data[...] = stack
            net.forward()
            for blob, out in ((output_blob(net), probs), (score_blob(net), scores)):
                out.append(net.blobs[blob].data.reshape(len(images), len(offsets), -1).mean(axis=1))
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
    n_classes = classes.pop()
    if labels and max(labels) >= n_classes:
        raise EvalError("%s has labels up to %d but the models have %d class outputs: the LMDB comes from "
                        "another dataset" % (lmdb_path, max(labels), n_classes))
    model_probs = [np.concatenate(p) if p else np.zeros((0, n_classes)) for p, _ in per_model]
    model_scores = [np.concatenate(s) if s else np.zeros((0, n_classes)) for _, s in per_model]
    for name, probs, scores in zip(names or ["model %d" % (i + 1) for i in range(len(nets))], model_probs,
                                   model_scores):
        require_finite(name, probs, scores)
    weights = np.array([w for _, w in nets_and_weights], np.float64)
    weights = weights / weights.sum()
    ensemble = sum(w * p for w, p in zip(weights, model_probs))
    return Predictions(keys, np.array(labels, np.int64), ensemble, model_probs, model_scores, seconds)


def require_finite(name, probs, scores):
    """Refuse outputs that hold NaN or inf: Caffe's Accuracy rule counts a NaN score as right, so
    diverged weights would score 100 %; no number is better than that one."""
    bad = int((~np.isfinite(probs).all(axis=1) | ~np.isfinite(scores).all(axis=1)).sum())
    if bad:
        raise EvalError("%s: its outputs hold NaN or inf for %d of %d images (diverged weights): no score; use an "
                        "earlier snapshot" % (name, bad, len(probs)))


def topk_correct(scores, labels, k):
    """Per image, Caffe 1.0's Accuracy layer rule: right when fewer than k classes score at
    least as high as the true one, the true class not counted. A tie counts against the
    label; a NaN true score compares false with everything, so it counts as right, as in Caffe."""
    true_scores = scores[np.arange(len(labels)), labels]
    at_least = (scores >= true_scores[:, None]).sum(axis=1) - 1
    return at_least < k


def topk_accuracy(scores, labels, k):
    """The fraction right by Caffe's rule (topk_correct); 0 for no images, as Caffe's count == 0."""
    return float(np.mean(topk_correct(scores, labels, k))) if len(labels) else 0.0


def per_class_accuracy(scores, labels, num_classes):
    """(class, images, top-1 by Caffe's rule or None) per class."""
    right = topk_correct(scores, labels, 1)
    return [(c, int((labels == c).sum()), float(right[labels == c].mean()) if (labels == c).any() else None)
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
