"""Run directories: what a training run used, produced and measured.

runs/<variant>/<YYYYmmdd-HHMMSS>/
  solver.prototxt      the solver actually used (net, snapshot_prefix, solver_mode rewritten)
  train_val.prototxt   copy of the net; deploy.prototxt too when it sits beside it
  caffe.log            the full Caffe log (appended to on resume)
  snapshots/           <variant>_iter_N.caffemodel / .solverstate
  run.json             how the run was made and what it reached
  train.csv, test.csv, curves.png   written at the end (and when interrupted)
"""
import datetime
import glob
import json
import os
import re
import shutil
import subprocess

from google.protobuf import json_format, text_format

from . import REPO_ROOT, __version__, caffe_env, data, devices, fit, nets, prechecks, repo_path
from .caffe_env import caffe_pb2
from .files import PrototxtError, read_prototxt, write_text

DEFAULT_RUNS = "runs"  # where run directories go, relative to the repo root
DATA_LAYER_TYPES = prechecks.DATA_LAYER_TYPES
RESUME_SOLVER = "resume_solver.prototxt"  # the run's solver, pointing at RESUME_NET
RESUME_NET = "resume_train_val.prototxt"  # the run's net, TRAIN Data layers at start_offset


class RunError(Exception):
    """Bad input found before Caffe starts: one line naming what and where."""


# ---------------------------------------------------------------- what to train
def resolve_solver(target, prototxt_dir=None):
    """VARIANT or a solver file -> (variant name, absolute solver path, base folder).

    A variant name works from any directory (prototxt/ of the repo); a path is relative
    to the user's directory. Paths inside a solver or net are Caffe's: relative to where
    Caffe runs, which for the generated files under prototxt/ is the repo root (their
    header says so), and for any other file the user's directory."""
    prototxt_dir = prototxt_dir or repo_path(fit.GENERATED_DIR)
    if os.path.isfile(target):
        path = os.path.abspath(target)
        return _variant_of(path), path, fit.base_for(path)
    if target.endswith(".prototxt") or os.sep in target:
        raise RunError("%s: no such solver file (relative to %s)" % (target, os.getcwd()))
    path = os.path.join(prototxt_dir, target, "solver.prototxt")
    if target not in nets.VARIANTS or not os.path.isfile(path):
        raise RunError("unknown variant '%s' (valid: %s, or a path to a solver.prototxt)"
                       % (target, ", ".join(nets.VARIANTS)))
    return target, path, REPO_ROOT


def _variant_of(solver_path):
    """The folder name for a solver file (prototxt/<variant>/solver.prototxt -> variant)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(solver_path)))
    return folder if folder else os.path.splitext(os.path.basename(solver_path))[0]


def read_message(path, message):
    try:
        return read_prototxt(path, message)
    except PrototxtError as exc:
        raise RunError(str(exc)) from exc


# ---------------------------------------------------------------- devices
GPU_HELP = "GPU id%s or cpu (default auto: GPU 0 on a CUDA build with a GPU, else cpu)"
SEVERAL_GPUS = ", a list (0,1), all,"  # what train.sh/train.py accept beyond one id (NCCL)


def add_gpu_argument(parser, several=False):
    """The same --gpu flag for every tool; several: train.sh's lists and `all` (NCCL)."""
    parser.add_argument("--gpu", default="auto", help=GPU_HELP % (SEVERAL_GPUS if several else ""))


def parse_gpu(value, flavour=None, several=True, gpus=None):
    """--gpu 0|0,1|all|cpu|auto -> None for CPU or the -gpu string for Caffe.
    flavour and gpus default to this machine's (the active build, the driver's GPUs)."""
    flavour = caffe_flavour() if flavour is None else flavour
    gpus = devices.visible_gpus() if gpus is None else gpus
    if value in ("auto", None):
        return "0" if flavour == "cuda" and gpus else None
    if value == "cpu":
        return None
    if value != "all" and not re.match(r"^\d+(,\d+)*$", value):
        raise RunError("--gpu '%s': expected an id (0)%s or cpu" % (value, SEVERAL_GPUS if several else ""))
    if not several and not value.isdigit():
        raise RunError("--gpu %s: this tool runs on one GPU; pass a single id (0) or cpu" % value)
    if flavour != "cuda":
        raise RunError("--gpu %s asked for a GPU, but this Caffe is a CPU-only build (%s); use --gpu cpu, or build "
                       "the CUDA flavour: scripts/setup.sh --cuda"
                       % (value, caffe_env.read_location().get("CAFFE_ROOT", "caffe-1.0-cpu")))
    if not gpus:
        raise RunError("--gpu %s: CUDA sees no GPU here (no nvidia-smi, no GPU in `nvidia-smi -L`, or "
                       "CUDA_VISIBLE_DEVICES=%s hides them); use --gpu cpu"
                       % (value, os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")))
    wanted = [int(i) for i in value.split(",")] if value != "all" else []
    if any(i >= gpus for i in wanted):
        raise RunError("--gpu %s: this machine has %d GPU%s (ids 0-%d)" % (value, gpus, "s"[:gpus != 1], gpus - 1))
    return value


def caffe_flavour():
    return caffe_env.read_location().get("CAFFE_FLAVOUR", "cpu")


def solver_count(gpu):
    """How many solvers (one per GPU) share a run: NCCL's count for a list or `all`."""
    if not gpu:
        return 1
    return devices.visible_gpus() if gpu == "all" else len(gpu.split(","))


# ---------------------------------------------------------------- checks before launching
def precheck(solver, solver_path, base=REPO_ROOT):
    """What would fail late inside Caffe, or train something other than what the user meant:
    prechecks' one list (the same as gen_prototxt.py --check runs). Paths in the solver and net
    are resolved against base. Returns (absolute net path, the net with absolute data paths);
    RunError with the first problem (and how many more) otherwise."""
    problems, net_path, net = prechecks.all_problems(solver, solver_path, base)
    if problems:
        more = len(problems) - 1
        raise RunError(problems[0] + (" (and %d more problem%s: tools/gen_prototxt.py --check %s)"
                                      % (more, "s"[:more != 1], solver_path) if more else ""))
    for layer in net.layer:
        if layer.type in DATA_LAYER_TYPES:
            layer.data_param.source = fit.absolute(layer.data_param.source, base)
            mean = fit.absolute(layer.transform_param.mean_file, base)
            if mean:  # assigning "" would set the field, and Caffe would try to open a mean file ""
                layer.transform_param.mean_file = mean
    return net_path, net


def dataset_manifest(net):
    """manifest.json beside the first LMDB the net reads, or None."""
    for layer in net.layer:
        if layer.type in DATA_LAYER_TYPES:
            path = os.path.join(os.path.dirname(os.path.normpath(layer.data_param.source)), "manifest.json")
            if os.path.isfile(path):
                with open(path) as f:
                    return path, json.load(f)
    return None, None


# ---------------------------------------------------------------- run directories
def new_run_dir(variant, runs_root=DEFAULT_RUNS):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(runs_root, variant, stamp)
    n = 1
    while os.path.exists(path):  # two runs started in the same second
        n += 1
        path = os.path.join(runs_root, variant, "%s-%d" % (stamp, n))
    return path


def newest_run_dir(variant, runs_root=DEFAULT_RUNS):
    candidates = sorted(d for d in glob.glob(os.path.join(glob.escape(runs_root), glob.escape(variant), "*"))
                        if os.path.isfile(os.path.join(d, "run.json")))
    if not candidates:
        raise RunError("--resume: no run of '%s' under %s" % (variant, os.path.join(runs_root, variant)))
    return candidates[-1]


def require_run_dir(run_dir):
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        what = "no such directory" if not os.path.isdir(run_dir) else "no run.json there"
        raise RunError("--run-dir %s: %s (expected a run directory made by train.sh or train.py)"
                       % (run_dir, what))


def snapshot_iteration(path):
    """<prefix>_iter_N.caffemodel / .solverstate -> N."""
    m = re.search(r"_iter_(\d+)\.(caffemodel|solverstate)$", path)
    return int(m.group(1)) if m else -1


def newest_solverstate(run_dir):
    states = glob.glob(os.path.join(glob.escape(run_dir), "snapshots", "*.solverstate"))
    if not states:
        raise RunError("--resume: %s has no .solverstate yet (nothing was snapshotted)" % run_dir)
    return max(states, key=snapshot_iteration)


def newest_snapshot_iteration(run_dir):
    files = glob.glob(os.path.join(glob.escape(run_dir), "snapshots", "*_iter_*"))
    return max((snapshot_iteration(p) for p in files), default=0)


def prepare(variant, solver_path, solver, net_path, net, run_dir, gpu, overrides=None):
    """Create run_dir with the net (data paths made absolute, so the run works from any
    directory), the deploy net beside it, and the solver as it will be used: with this run's
    overrides (train.sh --max-iter ...) applied and named in both files' headers."""
    overrides = overrides or {}
    said = "# %s set on the command line for this run\n" % describe_overrides(overrides) if overrides else ""
    os.makedirs(os.path.join(run_dir, "snapshots"))
    run_net = os.path.join(run_dir, "train_val.prototxt")
    write_text(run_net, "# %s as used by this run (LMDB and mean paths made absolute)\n" % net_path
               + (said if "batch_size" in overrides else "") + text_format.MessageToString(net))
    deploy = os.path.join(os.path.dirname(net_path), "deploy.prototxt")
    if os.path.isfile(deploy):
        shutil.copyfile(deploy, os.path.join(run_dir, "deploy.prototxt"))
    used = caffe_pb2().SolverParameter()
    used.CopyFrom(solver)
    used.ClearField("train_net")
    used.net = run_net
    used.snapshot_prefix = os.path.join(run_dir, "snapshots", variant)
    used.solver_mode = used.GPU if gpu else used.CPU
    used.snapshot_after_train = True  # what makes Ctrl-C (Caffe's SIGINT "stop") leave a snapshot
    write_text(os.path.join(run_dir, "solver.prototxt"),
               "# %s as used by this run (net, snapshot_prefix, solver_mode rewritten)\n" % solver_path
               + said + text_format.MessageToString(used))
    return used


# ---------------------------------------------------------------- one run's overrides (train.sh --max-iter ...)
OVERRIDE_FLAGS = {"max_iter": "--max-iter", "test_interval": "--test-interval", "batch_size": "--batch-size"}
RESUMABLE_OVERRIDES = ("max_iter", "test_interval")  # a batch size changed mid-run would break the data stream


def overrides_of(args):
    """{field: value} of the override flags given (train.sh VARIANT --max-iter 100 ...)."""
    return {field: getattr(args, field) for field in OVERRIDE_FLAGS if getattr(args, field, None) is not None}


def apply_overrides(solver, net, overrides):
    """The solver's max_iter/test_interval and the TRAIN Data layers' batch_size set in place."""
    for field in ("max_iter", "test_interval"):
        if field in overrides:
            setattr(solver, field, overrides[field])
    if "batch_size" in overrides:
        data_layers = [layer for layer in net.layer if layer.type in DATA_LAYER_TYPES]
        shared = [layer.name for layer in data_layers if _in_train_phase(layer) and not _train_only(layer)]
        if shared:  # its TEST batch would change too, and test_iter x batch no longer cover val
            raise RunError("--batch-size: Data layer '%s' serves both phases (no `include { phase: TRAIN }`), so its "
                           "val batch would change too; give it a TRAIN-only copy, or edit batch_size in the net"
                           % shared[0])
        layers = [layer for layer in data_layers if _train_only(layer)]
        if not layers:
            raise RunError("--batch-size: the net has no TRAIN-phase Data layer whose batch_size it could set")
        for layer in layers:
            layer.data_param.batch_size = overrides["batch_size"]


def describe_overrides(overrides):
    """'max_iter 100, batch_size 16' for a file header."""
    return ", ".join("%s %s" % item for item in overrides.items())


def override_resumed(run_dir, used, overrides, state):
    """--max-iter/--test-interval on --resume: the run's solver.prototxt changed (and said so in its
    header) before the run continues; --batch-size is refused, as is a max_iter already passed."""
    if "batch_size" in overrides:
        net = read_message(fit.absolute(used.net, REPO_ROOT), caffe_pb2().NetParameter())
        own = {layer.data_param.batch_size for layer in net.layer if layer.type in DATA_LAYER_TYPES
               and _train_only(layer)}
        if own != {overrides["batch_size"]}:
            raise RunError("--batch-size cannot change on --resume (the TRAIN data stream continues exactly at the "
                           "snapshot's batch size, %s); start a new run to train with another batch size"
                           % ", ".join(map(str, sorted(own))))
        overrides = {k: v for k, v in overrides.items() if k != "batch_size"}  # the run's own: nothing to change
    if not overrides:
        return
    at = snapshot_iteration(state)
    if "max_iter" in overrides and overrides["max_iter"] <= at:
        raise RunError("--max-iter %d: the run is already at iteration %d (its newest snapshot); give a larger one"
                       % (overrides["max_iter"], at))
    apply_overrides(used, None, overrides)
    _rewrite_solver(run_dir, used, "# %s set by --resume at iteration %d\n" % (describe_overrides(overrides), at))


def _rewrite_solver(run_dir, used, note):
    """The run's solver.prototxt rewritten from `used`, its header kept and `note` added to it."""
    path = os.path.join(run_dir, "solver.prototxt")
    with open(path) as f:
        header = "".join(line for line in f if line.startswith("#"))
    write_text(path, header + note + text_format.MessageToString(used))


def set_device(run_dir, used, gpu):
    """Point the run's solver at the device of this invocation (only solver_mode changes)."""
    mode = used.GPU if gpu else used.CPU
    if used.solver_mode != mode:
        used.solver_mode = mode
        _rewrite_solver(run_dir, used, "# solver_mode changed on resume\n")


def images_per_iteration(used, gpu, base=REPO_ROOT):
    """Images one solver iteration consumes: the TRAIN Data layer's batch x iter_size x solvers."""
    net = read_message(fit.absolute(used.net, base), caffe_pb2().NetParameter())
    batches = [layer.data_param.batch_size for layer in net.layer
               if layer.type in DATA_LAYER_TYPES and _in_train_phase(layer) and layer.data_param.batch_size]
    return (batches[0] if batches else 0) * max(used.iter_size, 1) * solver_count(gpu)


def _phases(layer):
    """The phases Caffe builds a layer in, by its include or exclude phase rules (stages aside)."""
    pb2 = caffe_pb2()
    included = {rule.phase for rule in layer.include if rule.HasField("phase")}
    if included:
        return included
    return {pb2.TRAIN, pb2.TEST} - {rule.phase for rule in layer.exclude if rule.HasField("phase")}


def _train_only(layer):
    return _phases(layer) == {caffe_pb2().TRAIN}


def _in_train_phase(layer):
    return caffe_pb2().TRAIN in _phases(layer)


def with_absolute_paths(used, base=REPO_ROOT):
    """A copy of a run's solver with net and snapshot_prefix absolute. Runs made before tinycaffe
    wrote absolute paths hold repo-relative ones (Caffe then ran from the repo root)."""
    copy = caffe_pb2().SolverParameter()
    copy.CopyFrom(used)
    copy.net = fit.absolute(copy.net, base)
    copy.snapshot_prefix = fit.absolute(copy.snapshot_prefix, base)
    return copy


def add_data_segment(record, iteration, solvers):
    """The run's data segments after (re)starting at `iteration` with `solvers` GPUs: each
    {"from": iteration, "solvers": n} says how many solvers read the TRAIN data from there on
    (a run may resume on another number of GPUs). Segments from a later iteration than this
    restart (a resume from an older snapshot) no longer happened."""
    kept = [seg for seg in record.get("data_segments") or [{"from": 0, "solvers": _solvers_of(record)}]
            if seg["from"] < iteration]
    return kept + [{"from": iteration, "solvers": solvers}]


def _solvers_of(record):
    """The GPU count a run without data_segments started with, from its device ("gpu 0,1")."""
    device = record.get("device") or "cpu"
    return solver_count(device[4:]) if device.startswith("gpu ") else 1


def batches_consumed(segments, iteration):
    """TRAIN batches (per Data layer, iter_size 1) read by all solvers up to `iteration`."""
    total = 0
    for seg, nxt in zip(segments, segments[1:] + [{"from": None}]):
        end = iteration if nxt["from"] is None else min(iteration, nxt["from"])
        total += max(end - seg["from"], 0) * seg["solvers"]
    return total


def continue_data_stream(run_dir, used, state, segments):
    """The solver to restore `state` with, such that the TRAIN Data layers continue where the
    interrupted run stopped: a copy of the run's net whose layers skip the records already
    consumed ((batches consumed x batch x iter_size) mod the LMDB's count; Caffe patch 0008's
    start_offset) and a copy of the solver pointing at it. Returns the solver copy's path."""
    if "start_offset" not in caffe_pb2().DataParameter.DESCRIPTOR.fields_by_name:
        raise RunError("this Caffe build lacks DataParameter.start_offset (scripts/patches/0008); rebuild it "
                       "with scripts/setup.sh --force to resume exactly")
    batches = batches_consumed(segments, snapshot_iteration(state))
    _, net = precheck(used, os.path.join(run_dir, "solver.prototxt"))  # data paths made absolute
    for layer in net.layer:
        if layer.type in DATA_LAYER_TYPES and _in_train_phase(layer):
            consumed = batches * layer.data_param.batch_size * max(used.iter_size, 1)
            layer.data_param.start_offset = consumed % max(data.lmdb_count(layer.data_param.source), 1)
    net_path = os.path.join(run_dir, RESUME_NET)
    write_text(net_path, "# %s for resuming from %s: TRAIN data continues at start_offset\n"
               % (used.net, os.path.basename(state)) + text_format.MessageToString(net))
    resumed = with_absolute_paths(used)
    resumed.net = net_path
    solver_path = os.path.join(run_dir, RESUME_SOLVER)
    write_text(solver_path, "# solver.prototxt for resuming from %s (net: %s)\n"
               % (os.path.basename(state), RESUME_NET) + text_format.MessageToString(resumed))
    return solver_path


EMA_SUFFIX = "_ema.caffemodel"  # Caffe patch 0015: the weights' moving average beside a snapshot


def is_model(path):
    """A snapshot's own .caffemodel (not the moving average written beside it)."""
    return path.endswith(".caffemodel") and not path.endswith(EMA_SUFFIX)


def ema_of(caffemodel):
    """The moving average written beside a snapshot's .caffemodel, or None."""
    path = caffemodel[:-len(".caffemodel")] + EMA_SUFFIX
    return path if is_model(caffemodel) and os.path.isfile(path) else None


def final_model(run_dir):
    """The model a run's val numbers are of: its newest snapshot's .caffemodel, or the moving
    average beside it when its solver tests that (test_ema, patch 0015). None without snapshots."""
    newest = newest_snapshot_iteration(run_dir)
    models = [p for p in glob.glob(os.path.join(glob.escape(run_dir), "snapshots", "*_iter_%d.caffemodel" % newest))
              if is_model(p)]
    if not models:
        return None
    try:
        used = read_message(os.path.join(run_dir, "solver.prototxt"), caffe_pb2().SolverParameter())
    except (RunError, OSError):
        used = None
    ema = ema_of(models[0])
    return ema if ema and used is not None and getattr(used, "test_ema", False) else models[0]


def drop_diverged_snapshots(run_dir, keep_up_to):
    """After a divergence, delete the snapshots (caffemodel and solverstate) that may hold bad
    weights: every one after iteration keep_up_to (the last whose logged loss was good: snapshot N
    holds the weights iteration N's forward used, and between two loss lines nothing is known;
    None: no bound), then, newest first, any whose caffemodel holds a non-finite value, down to
    the first finite one. Returns (removed paths, the newest remaining .caffemodel or None)."""
    pairs = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), "snapshots", "*_iter_*")):
        if snapshot_iteration(path) >= 0:
            pairs.setdefault(snapshot_iteration(path), []).append(path)
    removed = []
    for n in sorted(pairs, reverse=True):
        model = [p for p in pairs[n] if is_model(p)]
        after = keep_up_to is not None and n > keep_up_to
        if not after and all(finite_weights(p) for p in model):
            return sorted(removed), (model[0] if model else None)
        for path in pairs[n]:
            os.unlink(path)
            removed.append(path)
    return sorted(removed), None


def accuracy_aliases(run_dir):
    """The run's Accuracy outputs as accuracy_top1/top5 (caffelog.accuracy_aliases of its net)."""
    from . import caffelog
    try:
        net = read_prototxt(os.path.join(run_dir, "train_val.prototxt"), caffe_pb2().NetParameter())
    except PrototxtError:
        return {}
    return caffelog.accuracy_aliases(net)


def test_lmdb(run_dir):
    """The LMDB the run's net tests on (its first TEST-phase Data layer's source, absolute), or None."""
    try:
        net = read_prototxt(os.path.join(run_dir, "train_val.prototxt"), caffe_pb2().NetParameter())
    except (PrototxtError, OSError):
        return None
    for layer in net.layer:
        phases = [rule.phase for rule in layer.include if rule.HasField("phase")]
        if layer.type in DATA_LAYER_TYPES and caffe_pb2().TEST in phases and layer.data_param.source:
            return fit.absolute(layer.data_param.source, REPO_ROOT)
    return None


def drop_partial_snapshots(run_dir):
    """Delete, newest first, snapshot pairs that were not written whole (Caffe writes them in place,
    so a full disk or a kill mid-write leaves a truncated file that --resume would load and abort
    on): a file that does not parse, a caffemodel whose size differs from the older snapshot's (the
    same net serialises to the same size), a solverstate whose history blobs differ from the older
    one's. Stops at the first whole pair. -> the removed paths."""
    pairs = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), "snapshots", "*_iter_*")):
        if snapshot_iteration(path) >= 0:
            pairs.setdefault(snapshot_iteration(path), []).append(path)
    removed, order = [], sorted(pairs, reverse=True)
    for n, older in zip(order, order[1:] + [None]):
        if _whole(pairs[n], pairs.get(older, [])):
            break
        for path in pairs[n]:
            os.unlink(path)
            removed.append(path)
    return sorted(removed)


def _whole(paths, reference):
    """Whether a snapshot's files (caffemodel, solverstate) are complete, judged against an older
    snapshot's (reference) where there is one."""
    def by_kind(files, kind):
        return next((p for p in files if p.endswith(kind) and not p.endswith(EMA_SUFFIX)), None)
    model, state = by_kind(paths, ".caffemodel"), by_kind(paths, ".solverstate")
    ref_model, ref_state = by_kind(reference, ".caffemodel"), by_kind(reference, ".solverstate")
    try:
        if model and ref_model and os.path.getsize(model) != os.path.getsize(ref_model):
            return False
        if model:
            _read_caffemodel(model)
        if state:
            history = _history_sizes(state)
            if not history or (ref_state and history != _history_sizes(ref_state)):
                return False
    except Exception:  # protobuf's DecodeError on a truncated file, an OSError
        return False
    return True


def _history_sizes(solverstate):
    state = caffe_pb2().SolverState()
    with open(solverstate, "rb") as f:
        state.ParseFromString(f.read())
    return [len(b.data) for b in state.history]


def _read_caffemodel(caffemodel):
    net = caffe_pb2().NetParameter()
    with open(caffemodel, "rb") as f:
        net.ParseFromString(f.read())
    return net


def finite_weights(caffemodel):
    """True when every value of every blob (weights, biases, BatchNorm statistics) is finite."""
    import numpy as np
    net = _read_caffemodel(caffemodel)
    return all(np.isfinite(np.asarray(b.data, np.float32)).all() for layer in net.layer for b in layer.blobs)


def layers_with_weights(caffemodel):
    """Names of the layers a .caffemodel holds weights for (V1 files' `layers` too)."""
    try:
        model = _read_caffemodel(caffemodel)
        return {layer.name for layer in list(model.layer) + list(model.layers) if layer.blobs}
    except Exception as exc:  # protobuf's DecodeError: not a caffemodel
        raise RunError("--weights %s: not a .caffemodel (%s)" % (caffemodel, exc)) from exc


def parameter_count(caffemodel):
    """Values stored in a .caffemodel: every blob of every layer, as --check's table counts them."""
    return sum(len(b.data) for layer in _read_caffemodel(caffemodel).layer for b in layer.blobs)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=REPO_ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=REPO_ROOT).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def caffe_version():
    try:
        out = subprocess.run([caffe_env.caffe_binary(), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().replace("caffe version ", "")
    except (OSError, subprocess.SubprocessError, caffe_env.CaffeNotFound):
        return None


def start_record(variant, argv, solver, gpu, engine, anneal, net):
    manifest_path, manifest = dataset_manifest(net)
    return {
        "variant": variant, "command": argv, "engine": engine, "anneal": anneal,
        "device": "gpu %s" % gpu if gpu else "cpu",
        "caffe_version": caffe_version(), "caffe_flavour": caffe_flavour(), "tinycaffe_version": __version__,
        "git_commit": git_commit(),
        "dataset_manifest": manifest_path,
        "dataset_fingerprint": manifest.get("source_fingerprint") if manifest else None,
        "solver": json_format.MessageToDict(solver, preserving_proto_field_name=True),
        "started": now(), "ended": None, "status": "running",
        "resumes": [], "anneals": [], "final": {},
    }


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def load_record(run_dir):
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


def save_record(run_dir, record):
    write_text(os.path.join(run_dir, "run.json"), json.dumps(record, indent=2) + "\n")
