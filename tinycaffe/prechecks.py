"""The one list of checks a solver and its net go through before Caffe starts.

`gen_prototxt.py --check` (check.py) and the pre-check of every run (train.sh, train.py,
sweep trials: runs.precheck) call these same functions, so a file that --check passes is a
file a run accepts, and the reverse. Each check returns problems, one line each, naming the
file or layer and what was expected; none raises.

need_data: a run needs its LMDBs and mean files now; --check may look at a net before
make_lmdb.py has run, so there a missing LMDB is no problem (check.py notes it instead).
"""
import math
import os

from . import augment, data, fit
from .caffe_env import caffe_pb2

DATA_LAYER_TYPES = ("Data",)  # the layers whose source is an LMDB tinycaffe can read
TRANSFORMING_LAYER_TYPES = ("Data", "ImageData", "WindowData", "MemoryData")  # layers with a transform_param
TRAIN_VAL = "train_val.prototxt"  # the net file a variant folder holds beside its solver


# ---------------------------------------------------------------- the solver
def net_path_of(solver, base):
    """The solver's net (or train_net) as an absolute path, or "" when it names none."""
    return fit.absolute(solver.net or solver.train_net, base)


def solver_problems(solver, solver_path, base):
    """The solver's own fields and the net it names."""
    problems = []
    net = net_path_of(solver, base)
    if not net:
        problems.append("%s: no `net:` (expected the train_val.prototxt path)" % solver_path)
    elif not os.path.isfile(net):
        problems.append("%s: net %s does not exist (paths in it are relative to %s)" % (solver_path, net, base))
    else:
        problems.extend(_copied_variant(solver_path, net, base, "net" if solver.net else "train_net",
                                        solver.net or solver.train_net))
    if solver_type(solver) == "AdaGrad" and solver.momentum:
        problems.append("%s: AdaGrad takes no momentum (Caffe aborts); remove `momentum`" % solver_path)
    if solver.lr_policy == "step" and solver.stepsize <= 0:
        problems.append("%s: lr_policy \"step\" needs stepsize > 0" % solver_path)
    if solver.lr_policy == "multistep" and list(solver.stepvalue) != sorted(set(solver.stepvalue)):
        problems.append("%s: lr_policy \"multistep\" needs increasing stepvalue entries" % solver_path)
    for field in ("base_lr", "momentum", "weight_decay", "gamma"):
        if not math.isfinite(getattr(solver, field)):
            problems.append("%s: %s is %g, expected a finite number" % (solver_path, field, getattr(solver, field)))
    return problems


# Caffe's UpgradeSolverType: the legacy enum solver_type stands for `type` when `type` is not set.
LEGACY_SOLVER_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def solver_type(solver):
    """The solver type Caffe will run: `type`, else the legacy `solver_type` enum, else SGD."""
    if solver.HasField("type"):
        return solver.type
    if solver.HasField("solver_type"):
        return LEGACY_SOLVER_TYPES.get(solver.solver_type, "SGD")
    return "SGD"


def _copied_variant(solver_path, net, base, field="net", written=""):
    """A solver whose net lies in another folder while a train_val.prototxt sits beside it: what
    `cp -r prototxt/tiny prototxt/mine` leaves (the copy's solver still trains tiny's net). A
    folder that is a link to the net's own is no copy."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(solver_path)))
    beside = os.path.join(os.path.dirname(os.path.abspath(solver_path)), TRAIN_VAL)
    if not os.path.isfile(beside) or os.path.dirname(os.path.realpath(net)) == folder:
        return []
    where = beside if os.path.isabs(written or net) else os.path.relpath(beside, base)  # as the solver writes paths
    return ["%s trains %s, not the %s beside it (a copied variant?): set %s: \"%s\" in %s (tools/gen_prototxt.py "
            "--from DIR --to NEW copies a variant with its paths rewritten)"
            % (solver_path, net, beside, field, where, solver_path)]


# ---------------------------------------------------------------- the net and its data
def net_problems(net, net_path, base, need_data=True, lmdb_dir=None):
    """The Data layers' sources and mean files, a test split used where labels are needed, the
    net against its data (class count, crop) and the augmentation fields. lmdb_dir: check the
    class count and crop against that make_lmdb.py folder too (gen_prototxt --check --lmdb-dir)."""
    if not net.layer and not net.layers:
        return ["%s: no layers (an empty or truncated file?)" % net_path]
    problems = build_problems(net, net_path)
    for layer in net.layer:
        if layer.type in DATA_LAYER_TYPES:
            problems.extend(_data_source_problems(layer, net_path, base, need_data))
    if not problems:  # the fit checks read the same LMDBs
        problems.extend(fit_problems(net, net_path, lmdb_dir))
    problems.extend(augmentation_problems(net, net_path, base))
    return problems


def build_problems(net, net_path):
    """Layers and backends this Caffe build lacks (--check swaps data layers for dummies, so Caffe
    would not say it there): one line each, naming the layer and what to use instead."""
    from . import caffe_env
    known, problems = caffe_env.registered_layer_types(), []
    for layer in net.layer:
        if layer.type not in known:
            hint = (" (it needs OpenCV, which this build leaves out): make an LMDB with tools/make_lmdb.py and use a "
                    "Data layer" if layer.type in ("ImageData", "WindowData") else "")
            problems.append("%s: layer '%s' has type %s, which this Caffe build does not have%s"
                            % (net_path, layer.name, layer.type, hint))
        elif layer.type == "Data" and layer.data_param.backend == layer.data_param.LEVELDB and \
                not caffe_env.has_leveldb():
            problems.append("%s: layer '%s' reads a LevelDB, which this Caffe build cannot (built without LevelDB): "
                            "convert it to LMDB, backend: LMDB" % (net_path, layer.name))
    return problems


def _data_source_problems(layer, net_path, base, need_data):
    where = "%s: layer '%s'" % (net_path, layer.name)
    source = fit.absolute(layer.data_param.source, base)
    mean = fit.absolute(layer.transform_param.mean_file, base)
    problems = []
    if not os.path.isfile(os.path.join(source, "data.mdb")):
        if need_data:
            problems.append("%s reads %s, which is not an LMDB (run tools/make_lmdb.py first)" % (where, source))
    elif _unlabelled(source):
        problems.append("%s reads %s, the unlabelled test split (every label %d): accuracies on it mean nothing; "
                        "read make_lmdb.py's val_lmdb (or train_lmdb) there" % (where, source, data.TEST_LABEL))
    if mean and need_data and not os.path.isfile(mean):
        problems.append("%s needs mean file %s, which does not exist" % (where, mean))
    return problems


def _unlabelled(source):
    """True for an LMDB whose first record has the test split's label (make_lmdb.py's test_lmdb)."""
    try:
        for _, datum in data.iter_lmdb(source, limit=1):
            return datum.label == data.TEST_LABEL
    except data.DataError:
        return False
    return False


def fit_problems(net, net_path, lmdb_dir=None):
    """The net against its Data layers' own LMDBs, and against lmdb_dir's labels and images."""
    problems = fit.data_layer_problems(net, net_path)
    if problems:
        return problems
    try:
        if lmdb_dir:
            lmdb = os.path.join(lmdb_dir, "train_lmdb")
            found = fit.net_classes(net)
            if found:
                labels = os.path.join(lmdb_dir, "labels.txt")
                fit.check_classes(found[0], "%s (layer '%s')" % (net_path, found[1]), lmdb,
                                  labels if os.path.isfile(labels) else None)
            crops = [layer.transform_param.crop_size for layer in net.layer if layer.type in DATA_LAYER_TYPES]
            if os.path.isfile(os.path.join(lmdb, "data.mdb")):
                for crop in crops or [input_side(net)]:
                    fit.check_crop(crop, net_path, lmdb)
    except (fit.FitError, data.DataError) as exc:
        return [str(exc)]
    return []


def input_side(net):
    """The crop a deploy net expects (its Input layer's last dim), or 0."""
    for layer in net.layer:
        if layer.type == "Input" and layer.input_param.shape:
            return layer.input_param.shape[0].dim[-1]
    return 0


def augmentation_problems(net, net_path, base):
    """The Data layers' augmentation fields (Caffe patch 0010), against their images' size."""
    problems = []
    for layer in net.layer:
        if layer.type in TRANSFORMING_LAYER_TYPES and layer.HasField("transform_param"):
            source = fit.absolute(layer.data_param.source, base)
            shape = readable_image_shape(source)
            problems.extend(augment.check_transform(layer.transform_param, "%s (layer '%s')" % (net_path, layer.name),
                                                    image_side=min(shape[1:]) if shape else None))
    return problems


def readable_image_shape(source):
    """(C, H, W) of an LMDB's first record, or None when there is no readable LMDB there (yet)."""
    try:
        return fit.image_shape(source) if source and os.path.isfile(os.path.join(source, "data.mdb")) else None
    except Exception:  # data.DataError, lmdb's own errors, a record that is no Datum
        return None


def all_problems(solver, solver_path, base, need_data=True):
    """Everything a run's pre-check looks at: the solver, then (when it exists) its net.
    -> (problems, absolute net path or None, the parsed net or None)."""
    problems = solver_problems(solver, solver_path, base)
    net_path = net_path_of(solver, base)
    if not net_path or not os.path.isfile(net_path):
        return problems, None, None
    from .files import PrototxtError, read_prototxt
    try:
        net = read_prototxt(net_path, caffe_pb2().NetParameter())
    except PrototxtError as exc:
        return problems + [str(exc)], net_path, None
    return problems + net_problems(net, net_path, base, need_data) + test_coverage_problems(
        solver, solver_path, net, net_path), net_path, net


def test_coverage_problems(solver, solver_path, net, net_path):
    """test_iter x the TEST batch must be the val LMDB's record count: fewer tests a part of val,
    more reads images twice (Caffe's Data layer wraps around) and, unless an exact multiple,
    weighs some of them double; either way the val numbers are not val's."""
    tests = [layer for layer in net.layer if layer.type in DATA_LAYER_TYPES and layer.data_param.batch_size
             and any(rule.phase == caffe_pb2().TEST for rule in layer.include)]
    if not solver.test_iter or not tests:
        return []
    layer = tests[0]
    source = fit.resolved_source(layer, fit.base_for(net_path))
    if readable_image_shape(source) is None:
        return []
    from .solver import test_batch_for
    count, batch = data.lmdb_count(source), layer.data_param.batch_size
    covered = solver.test_iter[0] * batch
    if covered == count:
        return []
    fix = ("set test_iter: %d" % (count // batch) if count % batch == 0 else
           "set the TEST batch_size of layer '%s' to %d and test_iter: %d"
           % (layer.name, test_batch_for(count), count // test_batch_for(count)))
    return ["%s: test_iter %d x TEST batch %d = %d images, but %s holds %d: each val test would %s; %s"
            % (solver_path, solver.test_iter[0], batch, covered, source, count,
               "leave images out" if covered < count else "read images more than once", fix)]
