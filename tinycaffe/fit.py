"""Does a net fit the data it is about to meet? Checked before Caffe starts, because Caffe
answers a mismatch late and badly: a label >= the net's class outputs writes out of bounds
(training logs meaningless accuracies, then `double free or corruption`), and an image
smaller than the crop aborts (`datum_height >= crop_size`) or, in numpy, crops at a
negative offset.

What a dataset is comes from the files make_lmdb.py writes beside every LMDB:
labels.txt (one line a class), manifest.json (num_classes, settings.size) and the
Datums themselves (the first record's shape).
"""
import json
import os

from . import REPO_ROOT, data, repo_path

GENERATED_DIR = "prototxt"  # gen_prototxt.py's default output, relative to the repo root

LOSS_TYPES = ("SoftmaxWithLoss", "Accuracy", "Softmax", "SigmoidCrossEntropyLoss")
# Layers that keep the channel count of their input: the classifier's width shows through them
# (a Convolution head closed by global pooling, an in-place Dropout on the scores, ...).
PASS_THROUGH_TYPES = ("Pooling", "Flatten", "Dropout", "ReLU", "PReLU", "ELU", "TanH", "Sigmoid", "BatchNorm",
                      "Scale", "Power", "Bias", "AbsVal", "Split")


class FitError(Exception):
    """A net and a dataset that do not go together: one line naming both numbers."""


def base_for(prototxt_path):
    """Where the relative paths inside a prototxt file point from: the repo root for the files
    gen_prototxt.py writes under prototxt/ (their header says so), else the user's directory
    (where Caffe would run)."""
    return REPO_ROOT if in_generated_dir(prototxt_path) else os.getcwd()


def in_generated_dir(path):
    """Whether path lies under the repo's prototxt/ (whose files' paths are relative to the repo root)."""
    return os.path.abspath(path).startswith(os.path.join(repo_path(GENERATED_DIR), ""))


def absolute(path, base):
    """path made absolute against base (a prototxt's relative paths are Caffe's); "" stays ""."""
    return path if not path or os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def resolved_source(layer, base):
    return absolute(layer.data_param.source, base)


def dataset_dir(lmdb_path):
    """The folder make_lmdb.py wrote (the LMDB's parent)."""
    return os.path.dirname(os.path.normpath(os.path.abspath(lmdb_path)))


def beside(lmdb_path, name):
    """name (labels.txt, mean.binaryproto, manifest.json) in the LMDB's folder, or None."""
    path = os.path.join(dataset_dir(lmdb_path), name)
    return path if os.path.isfile(path) else None


def read_manifest(lmdb_path):
    """manifest.json beside the LMDB as a dict, or None when there is none."""
    path = beside(lmdb_path, "manifest.json")
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise FitError("%s: not a make_lmdb.py manifest (%s)" % (path, exc)) from exc


def dataset_classes(lmdb_path):
    """(class count, the file that says so) from labels.txt or the manifest beside the LMDB;
    (None, None) when neither is there (an LMDB of unknown origin is not second-guessed)."""
    labels = beside(lmdb_path, "labels.txt")
    if labels:
        return len(data.read_labels(labels)), labels
    manifest = read_manifest(lmdb_path)
    if manifest and "num_classes" in manifest:
        return int(manifest["num_classes"]), beside(lmdb_path, "manifest.json")
    return None, None


def image_shape(lmdb_path):
    """(channels, height, width) of the LMDB's first record, or None for an empty LMDB."""
    for _, datum in data.iter_lmdb(lmdb_path, limit=1):
        return datum.channels, datum.height, datum.width
    return None


def net_classes(net_param):
    """(class outputs, layer name) of a NetParameter: the num_output of the InnerProduct or
    Convolution whose scores reach its loss, accuracy or softmax, through in-place layers and
    layers that keep the channel count; None when no such layer is found."""
    creators = {}  # blob -> the layer that created it (in-place layers only modify it)
    for layer in net_param.layer:
        for top in layer.top:
            if top not in layer.bottom:
                creators[top] = layer
    for layer in net_param.layer:
        if layer.type not in LOSS_TYPES or not layer.bottom:
            continue
        source, seen = creators.get(layer.bottom[0]), set()
        while source is not None and source.type in PASS_THROUGH_TYPES and source.bottom and source.name not in seen:
            seen.add(source.name)
            source = creators.get(source.bottom[0])
        if source is not None and source.type == "InnerProduct":
            return source.inner_product_param.num_output, source.name
        if source is not None and source.type == "Convolution":
            return source.convolution_param.num_output, source.name
    return None


def check_classes(outputs, where, lmdb_path, labels_path=None, layer=None, generated=None):
    """Refuse a net whose class outputs differ from the dataset's class count. layer: the
    classifier's name in a net of the user's own (the advice is then to set its num_output;
    for tinycaffe's generated nets, to regenerate them)."""
    if labels_path:
        count, said_by = len(data.read_labels(labels_path)), labels_path
    else:
        count, said_by = dataset_classes(lmdb_path)
    if count is not None and outputs != count:
        fix = ("set num_output: %d in layer '%s'" % (count, layer) if layer
               else "regenerate the net with --num-classes %d or --labels %s" % (count, said_by))
        if generated and not layer:  # a generated net or a copy of one: an edit keeps the user's changes
            fix = ("set num_output: %d in layer '%s' (train_val and deploy), or %s"
                   % (count, generated, fix))
        raise FitError("%s has %d class outputs but %s lists %d classes: the net and the data (%s) come from "
                       "different datasets (%s)" % (where, outputs, said_by, count, lmdb_path, fix))


def check_crop(crop, where, lmdb_path):
    """Refuse a crop larger than the LMDB's images (Caffe aborts on it)."""
    shape = image_shape(lmdb_path)
    if shape and crop and (shape[1] < crop or shape[2] < crop):
        raise FitError("%s crops %dx%d but the images of %s are %dx%d: make the LMDB with --size >= %d "
                       "or generate the net with --crop <= %d"
                       % (where, crop, crop, lmdb_path, shape[1], shape[2], crop, min(shape[1:])))


def check_data_layers(net_param, net_path, labels_path=None):
    """Every Data layer of a train_val net against its own LMDB: records, class count and crop;
    FitError with the first problem (data_layer_problems lists them all)."""
    problems = data_layer_problems(net_param, net_path, labels_path)
    if problems:
        raise FitError(problems[0])


def data_layer_problems(net_param, net_path, labels_path=None):
    """Every problem of every Data layer against its own LMDB, one line each; the class count once
    (against the first LMDB: it is the net's, not a layer's)."""
    found, base = net_classes(net_param), base_for(net_path)
    own = None if in_generated_dir(net_path) else (found[1] if found else None)
    problems, classes_checked = [], not found
    for layer in net_param.layer:
        source = resolved_source(layer, base)
        if layer.type != "Data" or not os.path.isfile(os.path.join(source, "data.mdb")):
            continue
        if image_shape(source) is None:
            problems.append("%s: layer '%s' reads %s, which is empty (no records)" % (net_path, layer.name, source))
            continue
        checks = [lambda: check_crop(layer.transform_param.crop_size, "%s (layer '%s')" % (net_path, layer.name),
                                     source)]
        if not classes_checked:
            classes_checked = True
            checks.insert(0, lambda: check_classes(found[0], "%s (layer '%s')" % (net_path, found[1]), source,
                                                   labels_path, own, found[1]))
        for check in checks:
            try:
                check()
            except (FitError, data.DataError) as exc:
                problems.append(str(exc))
    return problems
