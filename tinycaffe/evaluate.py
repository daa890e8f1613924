"""Run deploy nets over an LMDB: val top-1/top-5, per-class accuracy, confusions, and the
averaged softmax of several models (ensembles) for the submission file.

Preprocessing is the TEST transform the net was trained with (its train_val.prototxt,
beside the deploy file or named by --train-val): minus its mean_file or mean_value, times its
scale, then the crop (the deploy input's side); `center` is Caffe's own center crop, so
top-1 agrees with `caffe test` on the train_val net of the same model. Without a train_val,
the image minus the mean.binaryproto beside the LMDB (make_lmdb.py's, what tinycaffe's nets use).
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
TRAIN_VAL_HELP = ("the train_val net whose TEST transform (mean_file or mean_value, scale) the model was trained with "
                  "(default: train_val.prototxt beside the deploy file, as in run dirs; none: the mean beside --lmdb)")


def add_model_arguments(parser, lmdb_help, default_lmdb=DEFAULT_VAL_LMDB):
    """--deploy, --weights, --lmdb (val by default) and --mean, as every model tool takes them."""
    parser.add_argument("--deploy", required=True, help="deploy.prototxt (e.g. a run dir's)")
    parser.add_argument("--weights", required=True, help=".caffemodel")
    parser.add_argument("--train-val", default=None, help=TRAIN_VAL_HELP)
    add_data_arguments(parser, lmdb_help, default_lmdb)


def add_data_arguments(parser, lmdb_help, default_lmdb):
    """--lmdb, --mean and --labels; the last two default to the files beside the LMDB."""
    parser.add_argument("--lmdb", default=None,
                        help="%s (default: the one the model was trained with, from the train_val.prototxt beside "
                             "the deploy file, else %s)" % (lmdb_help, default_lmdb))
    parser.add_argument("--mean", default=None, help=MEAN_HELP)
    parser.add_argument("--labels", default=None, help=LABELS_HELP)
    parser.set_defaults(default_lmdb=default_lmdb)


def resolve_data_arguments(args, deploy=None):
    """Fill --lmdb, --mean, --labels in place: an LMDB brings its own mean and labels (make_lmdb.py
    writes them beside it), never another dataset's. The default LMDB is the one the model was
    trained with (the TEST LMDB of the train_val beside `deploy`, or the test_lmdb beside that
    for a submission), else the repo's data/lmdb."""
    trained = trained_lmdb(deploy, getattr(args, "train_val", None)) if deploy and not args.lmdb else None
    if trained and os.path.basename(args.default_lmdb) == "test_lmdb":
        trained = os.path.join(os.path.dirname(trained), "test_lmdb")
    args.lmdb = args.lmdb or (trained if trained and os.path.isdir(trained) else repo_path(args.default_lmdb))
    if not os.path.isdir(args.lmdb):
        raise EvalError("%s: no such LMDB; give --lmdb (make_lmdb.py's %s)" % (args.lmdb, os.path.basename(
            args.default_lmdb)))
    args.mean_given = args.mean is not None  # a mean the user named must agree with the net's own
    folder = fit.dataset_dir(args.lmdb)
    args.mean = args.mean or os.path.join(folder, "mean.binaryproto")
    args.labels = args.labels or os.path.join(folder, "labels.txt")


def trained_lmdb(deploy, train_val=None):
    """The LMDB the train_val beside a deploy file (or train_val) tests on, absolute, or None."""
    path = train_val or os.path.join(os.path.dirname(os.path.abspath(deploy)), "train_val.prototxt")
    try:
        net = read_prototxt(path, caffe_pb2().NetParameter())
    except (PrototxtError, OSError):
        return None
    for layer in net.layer:
        if layer.type == "Data" and any(rule.phase == caffe_pb2().TEST for rule in layer.include):
            return fit.absolute(layer.data_param.source, fit.base_for(path))
    return None


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
        net = read_prototxt(deploy, caffe_pb2().NetParameter())
    except PrototxtError as exc:
        raise EvalError(str(exc)) from exc
    readers = [layer.name for layer in net.layer if layer.type in ("Data", "ImageData", "HDF5Data", "WindowData")]
    if readers:
        raise EvalError("%s: a train_val net (layer '%s' reads data): give its deploy net, whose Input layer takes "
                        "the images (a run dir has deploy.prototxt; tools/gen_prototxt.py writes one for its variants)"
                        % (deploy, readers[0]))
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
    shape = net.blobs[output_blob(net)].data.shape
    if len(shape) < 2:
        raise EvalError("the deploy net's output '%s' has shape %s, expected images x classes (a Softmax `prob`)"
                        % (output_blob(net), list(shape)))
    return shape[1]


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


# ---------------------------------------------------------------- preprocessing: the net's own
class Preprocess:
    """Caffe's TEST transform on a raw Datum: (pixels - mean) x scale; mean a C x H x W array (a
    mean file), a C x 1 x 1 one (mean_value) or None."""

    def __init__(self, mean, scale, said):
        self.mean, self.scale, self.said = mean, scale, said

    def apply(self, chw):
        x = chw.astype(np.float32)
        if self.mean is not None:
            x -= self.mean
        if self.scale != 1:
            x *= np.float32(self.scale)
        return x

    def same_as(self, other):
        return self.scale == other.scale and ((self.mean is None and other.mean is None) or (
            self.mean is not None and other.mean is not None and self.mean.shape == other.mean.shape
            and np.array_equal(self.mean, other.mean)))


def test_transform(deploy, train_val=None):
    """(the TEST-phase transform_param of the net's train_val, its path), or (None, None) when there
    is no train_val (given, or train_val.prototxt beside the deploy file)."""
    path = train_val or os.path.join(os.path.dirname(os.path.abspath(deploy)), "train_val.prototxt")
    if not os.path.isfile(path):
        if train_val:
            raise EvalError("--train-val %s: no such file" % train_val)
        return None, None
    try:
        net = read_prototxt(path, caffe_pb2().NetParameter())
    except PrototxtError as exc:
        raise EvalError(str(exc)) from exc
    data_layers = [layer for layer in net.layer if layer.type in ("Data", "ImageData", "Input", "MemoryData")
                   and layer.HasField("transform_param")]
    test = [layer for layer in data_layers if any(rule.phase == 1 for rule in layer.include)] or \
        [layer for layer in data_layers if not layer.include]
    if not test:
        raise EvalError("%s: no TEST-phase data layer with a transform_param: its preprocessing is unknown "
                        "(give --train-val FILE, the net the model was trained with)" % path)
    return test[0].transform_param, path


def preprocessing(deploy, train_val, mean_path, mean_given, lmdb_path, crop):
    """The net's own TEST transform (test_transform), checked against the LMDB; without a train_val,
    mean_path (the mean beside the LMDB, or --mean). A --mean the net was not trained with is refused."""
    shape = fit.image_shape(lmdb_path)
    if shape and (shape[1] < crop or shape[2] < crop):
        raise EvalError("the deploy net crops %dx%d but the images of %s are %dx%d: make the LMDB with --size >= %d "
                        "or generate the net with --crop <= %d" % (crop, crop, lmdb_path, shape[1], shape[2], crop,
                                                                    min(shape[1:])))
    tp, where = test_transform(deploy, train_val)
    if tp is None:
        return Preprocess(read_mean_for(mean_path, lmdb_path, crop), 1.0, "minus %s (no train_val.prototxt beside "
                          "%s: the mean beside the LMDB; give --train-val for the net's own)" % (mean_path, deploy))
    scale = tp.scale if tp.HasField("scale") else 1.0
    if tp.mean_value:
        if mean_given:
            raise EvalError("--mean %s, but %s subtracts mean_value %s: drop --mean" % (
                mean_path, where, ", ".join("%g" % v for v in tp.mean_value)))
        channels = shape[0] if shape else len(tp.mean_value)
        if len(tp.mean_value) not in (1, channels):
            raise EvalError("%s: %d mean_value entries for %d-channel images (Caffe takes 1 or one a channel)"
                            % (where, len(tp.mean_value), channels))
        values = np.array(list(tp.mean_value) * (channels if len(tp.mean_value) == 1 else 1), np.float32)
        mean, said = values.reshape(-1, 1, 1), "minus mean_value %s" % ", ".join("%g" % v for v in tp.mean_value)
    elif tp.mean_file:
        net_mean = fit.absolute(tp.mean_file, fit.base_for(where))
        if mean_given and os.path.abspath(mean_path) != net_mean:
            raise EvalError("--mean %s, but %s was trained with mean file %s: drop --mean (or pass that one)"
                            % (mean_path, where, net_mean))
        mean, said = read_mean_for(net_mean, lmdb_path, crop), "minus %s" % net_mean
    else:
        if mean_given:
            raise EvalError("--mean %s, but %s subtracts no mean: drop --mean" % (mean_path, where))
        mean, said = None, "no mean"
    return Preprocess(mean, scale, "%s%s (the TEST transform of %s)" % (said, ", times %g" % scale
                                                                       if scale != 1 else "", where))


def ensemble_preprocessing(deploys, train_val, mean_path, mean_given, lmdb_path, crop):
    """One preprocessing for every model of an ensemble (each from its own train_val), or EvalError."""
    found = [preprocessing(d, train_val, mean_path, mean_given, lmdb_path, crop) for d in deploys]
    for deploy, other in zip(deploys[1:], found[1:]):
        if not found[0].same_as(other):
            raise EvalError("%s and %s were trained with different preprocessing (%s; %s): an ensemble runs one"
                            % (deploys[0], deploy, found[0].said, other.said))
    return found[0]


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
    mean: a Preprocess (or a mean array: minus it, scale 1). names: what to call each model in an
    error (its .caffemodel), default "model N"."""
    side = fit.image_shape(lmdb_path)

    def records():
        for key, datum in data.iter_lmdb(lmdb_path):
            yield key, datum.label, np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height,
                                                                                datum.width)
    return predict_images(nets_and_weights, records(), side[-1] if side else None, mean, tta, batch, progress,
                          names, lmdb_path)


def predict_images(nets_and_weights, records, side, mean, tta="center", batch=DEFAULT_BATCH, progress=None,
                   names=None, where="the images"):
    """predict() over (key, label, uint8 C x H x W array) records of side x side images (None: the
    crop's side), e.g. image files decoded as make_lmdb.py decodes them (classify.py)."""
    check_batch(batch)
    nets = [n for n, _ in nets_and_weights]
    crop = net_crop(nets[0])
    crops = {net_crop(n) for n in nets}
    if len(crops) != 1:
        raise EvalError("the models' deploy nets take different crops %s: an ensemble needs one" % sorted(crops))
    classes = {net_classes(n) for n in nets}
    if len(classes) != 1:
        raise EvalError("the models disagree on the class count: %s" % sorted(classes))
    pre = mean if isinstance(mean, Preprocess) else Preprocess(mean, 1.0, "")
    offsets = crop_offsets(side or crop, crop, tta)
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
    for key, label, chw in records:
        if pre.mean is not None and pre.mean.shape[1:] != (1, 1) and chw.shape != pre.mean.shape:
            raise EvalError("%s: record %s is %s but the mean is %s" % (where, key, chw.shape, pre.mean.shape))
        pending.append(pre.apply(chw))
        keys.append(key)
        labels.append(label)
        if len(pending) == batch:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    seconds = time.time() - t0
    n_classes = classes.pop()
    if labels and max(labels) >= n_classes:
        raise EvalError("%s has labels up to %d but the models have %d class outputs: the LMDB comes from "
                        "another dataset" % (where, max(labels), n_classes))
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
