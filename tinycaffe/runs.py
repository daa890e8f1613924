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

from . import __version__, caffe_env, nets
from .caffe_env import caffe_pb2
from .files import PrototxtError, read_prototxt, write_text

DEFAULT_RUNS = "runs"  # where run directories go, relative to the repo root
DATA_LAYER_TYPES = ("Data",)


class RunError(Exception):
    """Bad input found before Caffe starts: one line naming what and where."""


# ---------------------------------------------------------------- what to train
def resolve_solver(target, prototxt_dir="prototxt"):
    """VARIANT or a solver file -> (variant name, solver path)."""
    if os.path.isfile(target):
        return _variant_of(target), target
    if target.endswith(".prototxt") or os.sep in target:
        raise RunError("%s: no such solver file" % target)
    path = os.path.join(prototxt_dir, target, "solver.prototxt")
    if target not in nets.VARIANTS or not os.path.isfile(path):
        raise RunError("unknown variant '%s' (valid: %s, or a path to a solver.prototxt)"
                       % (target, ", ".join(nets.VARIANTS)))
    return target, path


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
NVIDIA_PROC = "/proc/driver/nvidia/gpus"  # one entry per GPU the driver sees


def add_gpu_argument(parser, several=False):
    """The same --gpu flag for every tool; several: train.sh's lists and `all` (NCCL)."""
    parser.add_argument("--gpu", default="auto", help=GPU_HELP % (SEVERAL_GPUS if several else ""))


def visible_gpus():
    """How many GPUs the NVIDIA driver sees here (0 without a driver)."""
    try:
        return len(os.listdir(NVIDIA_PROC))
    except OSError:
        return 0


def parse_gpu(value, flavour=None, several=True, gpus=None):
    """--gpu 0|0,1|all|cpu|auto -> None for CPU or the -gpu string for Caffe.
    flavour and gpus default to this machine's (the active build, the driver's GPUs)."""
    flavour = caffe_flavour() if flavour is None else flavour
    gpus = visible_gpus() if gpus is None else gpus
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
        raise RunError("--gpu %s: no NVIDIA GPU on this machine (%s is missing: no driver); use --gpu cpu"
                       % (value, NVIDIA_PROC))
    wanted = [int(i) for i in value.split(",")] if value != "all" else []
    if any(i >= gpus for i in wanted):
        raise RunError("--gpu %s: this machine has %d GPU%s (ids 0-%d)" % (value, gpus, "s"[:gpus != 1], gpus - 1))
    return value


def caffe_flavour():
    return caffe_env.read_location().get("CAFFE_FLAVOUR", "cpu")


# ---------------------------------------------------------------- checks before launching
def precheck(solver, solver_path):
    """What would fail late inside Caffe: net file, LMDB sources, mean files. Returns the net."""
    net_path = solver.net or solver.train_net
    if not net_path:
        raise RunError("%s: no `net:` (expected the train_val.prototxt path)" % solver_path)
    if not os.path.isfile(net_path):
        raise RunError("%s: net %s does not exist (paths are relative to the repo root)" % (solver_path, net_path))
    net = read_message(net_path, caffe_pb2().NetParameter())
    for layer in net.layer:
        if layer.type not in DATA_LAYER_TYPES:
            continue
        source = layer.data_param.source
        if not os.path.isfile(os.path.join(source, "data.mdb")):
            raise RunError("%s: layer '%s' reads %s, which is not an LMDB (run tools/make_lmdb.py first)"
                           % (net_path, layer.name, source))
        mean = layer.transform_param.mean_file
        if mean and not os.path.isfile(mean):
            raise RunError("%s: layer '%s' needs mean file %s, which does not exist" % (net_path, layer.name, mean))
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
    candidates = sorted(d for d in glob.glob(os.path.join(runs_root, variant, "*"))
                        if os.path.isfile(os.path.join(d, "run.json")))
    if not candidates:
        raise RunError("--resume: no run of '%s' under %s/%s" % (variant, runs_root, variant))
    return candidates[-1]


def newest_solverstate(run_dir):
    states = glob.glob(os.path.join(run_dir, "snapshots", "*.solverstate"))
    if not states:
        raise RunError("--resume: %s has no .solverstate yet (nothing was snapshotted)" % run_dir)
    return max(states, key=lambda p: int(re.search(r"_iter_(\d+)\.solverstate$", p).group(1)))


def prepare(variant, solver_path, solver, net_path, run_dir, gpu):
    """Create run_dir with copies of the net(s) and the solver as it will be used."""
    os.makedirs(os.path.join(run_dir, "snapshots"))
    run_net = os.path.join(run_dir, "train_val.prototxt")
    shutil.copyfile(net_path, run_net)
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
               + text_format.MessageToString(used))
    return used


def set_device(run_dir, used, gpu):
    """Point the run's solver at the device of this invocation (only solver_mode changes)."""
    mode = used.GPU if gpu else used.CPU
    if used.solver_mode != mode:
        used.solver_mode = mode
        path = os.path.join(run_dir, "solver.prototxt")
        with open(path) as f:
            header = "".join(line for line in f if line.startswith("#"))
        write_text(path, header + "# solver_mode changed on resume\n" + text_format.MessageToString(used))


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5).stdout.strip()
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
