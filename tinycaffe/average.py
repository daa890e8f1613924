"""Checkpoint averaging (issue 26): one .caffemodel whose every weight is the mean of several
snapshots' of the same net, e.g. a run's last K (Izmailov et al. 2018's SWA over a cosine tail;
Vaswani et al. 2017 averaged their last 5 checkpoints). Works on the .caffemodel messages, so
it needs no prototxt; BatchNorm's statistics are averaged as statistics, not as Caffe's sums."""
import glob
import json
import os

import numpy as np

from . import runs
from .caffe_env import caffe_pb2
from .files import atomic_open

DEFAULT_LAST = 5  # snapshots averaged from a run dir: Vaswani et al.'s 5


class AverageError(Exception):
    """Models that cannot be averaged; one line naming the file and what was expected."""


def run_snapshots(run_dir, last, ema=False):
    """The `last` newest snapshots of a run (their *_ema.caffemodel with ema), oldest first."""
    snapshots = os.path.join(glob.escape(run_dir), "snapshots")
    models = sorted((p for p in glob.glob(os.path.join(snapshots, "*_iter_*.caffemodel")) if runs.is_model(p)),
                    key=runs.snapshot_iteration)
    if ema:
        models = [runs.ema_of(p) for p in models if runs.ema_of(p)]
    what = "moving averages (*_ema.caffemodel, from a solver with ema_decay)" if ema else "snapshot .caffemodel files"
    if len(models) < 2:
        hdf5 = glob.glob(os.path.join(snapshots, "*.caffemodel.h5"))
        raise AverageError("%s: %d %s in snapshots/, expected at least 2 to average%s"
                           % (run_dir, len(models), what, " (its HDF5 snapshots are not read: snapshot_format "
                                                           "BINARYPROTO makes .caffemodel files)" if hdf5 else ""))
    return models[-last:]


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def read_model(path):
    """A .caffemodel's NetParameter; refused in one line when it is not one, or holds no weights."""
    model = caffe_pb2().NetParameter()
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as exc:
        raise AverageError("%s: cannot read (%s)" % (path, exc.strerror)) from exc
    if content.startswith(HDF5_SIGNATURE):
        raise AverageError("%s: an HDF5 snapshot; this tool reads .caffemodel files (snapshot_format BINARYPROTO)"
                           % path)
    try:
        model.ParseFromString(content)
    except Exception as exc:  # protobuf's DecodeError
        raise AverageError("%s: not a .caffemodel (%s)" % (path, exc)) from exc
    if model.layers and not model.layer:
        raise AverageError("%s: a V1 .caffemodel (`layers`); upgrade it with Caffe's upgrade_net_proto_binary"
                           % path)
    if not any(layer.blobs for layer in model.layer):
        raise AverageError("%s: no layer with weights (expected a .caffemodel that Caffe saved)" % path)
    return model


def blob_values(blob):
    return np.asarray(blob.double_data if len(blob.double_data) else blob.data, np.float64)


def layer_arrays(layer):
    """The layer's blobs as float64 arrays; BatchNorm's mean and variance divided by its scale factor
    (Caffe stores running sums and their weight), and the factor 1."""
    arrays = [blob_values(b) for b in layer.blobs]
    if layer.type == "BatchNorm" and len(arrays) == 3:
        factor = arrays[2][0] if arrays[2].size else 0.0
        scale = 0.0 if factor == 0 else 1.0 / factor  # Caffe's own rule for an untrained factor
        arrays = [arrays[0] * scale, arrays[1] * scale, np.ones_like(arrays[2])]
    return arrays


def blob_shape(blob):
    return tuple(blob.shape.dim) if blob.HasField("shape") else (blob.num, blob.channels, blob.height, blob.width)


def signature(model):
    return [(layer.name, layer.type, [blob_shape(b) for b in layer.blobs]) for layer in model.layer if layer.blobs]


def average(paths):
    """A NetParameter holding the mean of the models at paths (same layers, same shapes)."""
    if len(paths) < 2:
        raise AverageError("%d model(s) given, expected at least 2 to average" % len(paths))
    twice = sorted({p for p in paths if [os.path.realpath(q) for q in paths].count(os.path.realpath(p)) > 1})
    if twice:
        raise AverageError("%s: given more than once (each model counts once in the average)" % twice[0])
    first = read_model(paths[0])
    expected = signature(first)
    sums = [[a.copy() for a in layer_arrays(layer)] for layer in first.layer if layer.blobs]
    for path in paths[1:]:
        model = read_model(path)
        if signature(model) != expected:
            raise AverageError("%s: its layers or blob shapes differ from %s's (expected snapshots of one net)"
                               % (path, paths[0]))
        for total, layer in zip(sums, (layer for layer in model.layer if layer.blobs)):
            for acc, values in zip(total, layer_arrays(layer)):
                acc += values
    out = caffe_pb2().NetParameter()
    out.CopyFrom(first)
    for total, layer in zip(sums, (layer for layer in out.layer if layer.blobs)):
        for blob, acc in zip(layer.blobs, total):
            del blob.double_data[:]
            blob.data[:] = (acc / len(paths)).astype(np.float32).tolist()
    return out


def write_average(paths, out_path):
    """Average paths into out_path (atomically), with out_path + '.json' saying what it averages;
    neither file is left when the other cannot be written."""
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise AverageError("--out %s: folder %s does not exist" % (out_path, folder))
    model = average(paths)
    if any(not np.isfinite(blob_values(b)).all() for layer in model.layer for b in layer.blobs):
        raise AverageError("%s: the average holds NaN or inf (a diverged snapshot among %s)"
                           % (out_path, ", ".join(os.path.basename(p) for p in paths)))
    with atomic_open(out_path + ".json", "w") as f:
        json.dump({"averaged": [os.path.abspath(p) for p in paths],
                   "iterations": [runs.snapshot_iteration(p.replace(runs.EMA_SUFFIX, ".caffemodel")) for p in paths],
                   "batchnorm": "running mean and variance averaged as statistics (scale factor 1), not "
                                "recomputed on the train data as SWA does"}, f, indent=1)
    try:
        with atomic_open(out_path, "wb") as f:
            f.write(model.SerializeToString())
    except BaseException:
        os.unlink(out_path + ".json")
        raise
    return model
