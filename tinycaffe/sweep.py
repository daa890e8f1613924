"""Hyper-parameter sweeps on Optuna: the outer loop around Caffe (BVLC/caffe#1546).

A SPACE file (YAML or JSON) says which variants and which generator/solver values to search
and the budget of a trial. Each trial is an ordinary run directory, sweeps/<name>/trial_<n>/,
generated through gen.py's builders and trained through train.py's run machinery (the caffe
binary); it reports val top-1 at every test to Optuna and stops, with a snapshot, when the
pruner says so (status "pruned" in its run.json). The study lives in Optuna's JournalStorage
with a file backend in sweeps/<name>/ (safe for several processes on one machine), or in an
RDB given by --storage. Running the same command again continues the study.
"""
import argparse
import csv
import json
import math
import os
import socket
import subprocess
import sys
import tempfile

from google.protobuf import text_format

from . import caffelog, gen, nets, repo_path, runs, train
from .caffe_env import caffe_pb2
from .files import write_text

# ---------------------------------------------------------------- defaults
DEFAULT_ROOT = "sweeps"  # sweeps/<name>/: the journal, trial run dirs, the report
DEFAULT_TRIALS = 20  # finished (complete or pruned) trials the study aims at
DEFAULT_PRUNER = "median"  # Optuna's MedianPruner
DEFAULT_SAMPLER = "tpe"  # Optuna's TPESampler
JOURNAL = "journal.log"  # the file store's name inside sweeps/<name>/
GEN_PARAMS = ("batch_size", "augment", "solver", "crop")  # searched through gen.GenConfig
SOLVER_PARAMS = ("base_lr", "weight_decay", "momentum", "gamma", "stepsize")  # SolverParameter fields
KINDS = ("float", "int", "categorical")
PRUNERS = ("asha", "median", "threshold", "none")
SAMPLERS = ("tpe", "random", "grid")


class SweepError(Exception):
    """Bad space file or arguments: one line naming the file or field."""


class TrialFailed(Exception):
    """A trial's training did not finish (failed, diverged or interrupted): never a result."""


# ---------------------------------------------------------------- the space file
def load_space(path):
    """Read and check SPACE; -> dict with variants, lmdb_dir, budget, params, pruner/sampler options."""
    import yaml
    try:
        with open(path) as f:
            space = yaml.safe_load(f)  # JSON is YAML too
    except OSError as exc:
        raise SweepError("%s: %s" % (path, exc.strerror))
    except yaml.YAMLError as exc:
        raise SweepError("%s: not YAML/JSON (%s)" % (path, str(exc).splitlines()[0]))
    if not isinstance(space, dict):
        raise SweepError("%s: expected a mapping with variants, budget and params" % path)
    variants = space.get("variants", ["tiny"])
    if isinstance(variants, str):
        variants = [variants]
    unknown = [v for v in variants if v not in nets.VARIANTS]
    if not variants or unknown:
        raise SweepError("%s: variants: unknown %s (valid: %s)" % (path, ", ".join(map(str, unknown)) or "(none)",
                                                                  ", ".join(nets.VARIANTS)))
    budget = space.get("budget") or {}
    for key in ("max_iter", "test_interval"):
        if not isinstance(budget.get(key), int) or budget[key] < 1:
            raise SweepError("%s: budget.%s must be an integer >= 1, got %r" % (path, key, budget.get(key)))
    params = space.get("params") or {}
    if not isinstance(params, dict):
        raise SweepError("%s: params must be a mapping of name -> {type, ...}" % path)
    for name, spec in params.items():
        _check_param(path, name, spec)
    lmdb_dir = space.get("lmdb_dir", gen.DEFAULT_LMDB_DIR)
    base = os.path.dirname(os.path.abspath(path))
    lmdb_dir = lmdb_dir if os.path.isabs(lmdb_dir) else (
        os.path.join(base, lmdb_dir) if os.path.isdir(os.path.join(base, lmdb_dir)) else repo_path(lmdb_dir))
    if not os.path.isfile(os.path.join(lmdb_dir, "manifest.json")):
        raise SweepError("%s: lmdb_dir %s has no manifest.json (run tools/make_lmdb.py first)" % (path, lmdb_dir))
    return {"variants": list(variants), "lmdb_dir": lmdb_dir, "budget": budget, "params": params,
            "pruner": space.get("pruner") or {}, "seed": int(space.get("seed", 0)), "path": os.path.abspath(path)}


def _check_param(path, name, spec):
    where = "%s: params.%s" % (path, name)
    if name not in GEN_PARAMS + SOLVER_PARAMS:
        raise SweepError("%s: not a searchable value (valid: %s)" % (where, ", ".join(GEN_PARAMS + SOLVER_PARAMS)))
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise SweepError("%s: needs type: %s" % (where, " | ".join(KINDS)))
    if spec["type"] == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise SweepError("%s: categorical needs a non-empty list of choices" % where)
        return
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise SweepError("%s: %s needs numbers low < high, got %r and %r" % (where, spec["type"], low, high))
    if spec.get("log") and low <= 0:
        raise SweepError("%s: log scale needs low > 0, got %r" % (where, low))


def suggest(trial, space):
    """The trial's values: {"variant": ..., <param>: ...}."""
    values = {"variant": space["variants"][0] if len(space["variants"]) == 1
              else trial.suggest_categorical("variant", space["variants"])}
    for name, spec in space["params"].items():
        if spec["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               log=bool(spec.get("log")))
    return values


def grid_space(space):
    """GridSampler's search space: every parameter must be categorical."""
    grid = {name: spec["choices"] for name, spec in space["params"].items() if spec["type"] == "categorical"}
    ranged = [name for name, spec in space["params"].items() if spec["type"] != "categorical"]
    if ranged:
        raise SweepError("--sampler grid needs categorical params only; %s are ranges" % ", ".join(ranged))
    if len(space["variants"]) > 1:
        grid["variant"] = space["variants"]
    return grid


# ---------------------------------------------------------------- Optuna objects
def make_pruner(name, options):
    import optuna
    options = dict(options.get(name) or {})
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(**options)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SweepError("unknown --pruner '%s' (valid: %s)" % (name, ", ".join(PRUNERS)))


def make_sampler(name, space):
    import optuna
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=space["seed"])
    if name == "random":
        return optuna.samplers.RandomSampler(seed=space["seed"])
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(space), seed=space["seed"])
    raise SweepError("unknown --sampler '%s' (valid: %s)" % (name, ", ".join(SAMPLERS)))


def make_storage(url, sweep_dir):
    """The file journal in sweep_dir (default) or Optuna's RDB storage for a URL."""
    import optuna
    if url:
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    os.makedirs(sweep_dir, exist_ok=True)
    return JournalStorage(JournalFileBackend(os.path.join(sweep_dir, JOURNAL)))


def open_study(name, storage, sampler=None, pruner=None):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphans(study):
    """Trials left RUNNING by a worker of this machine that is gone (killed, crashed): FAIL, so
    they never count as results. RDB storages also fail them by heartbeat (other machines)."""
    import optuna
    from optuna.trial import TrialState
    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == host and not _alive(int(worker.get("pid", 0)) or -1):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            failed.append(t.number)
    if isinstance(study._storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
    return failed


# ---------------------------------------------------------------- one trial
class Reporter:
    """Fed the trial's log lines: reports every val top-1 to Optuna; True when pruned."""

    def __init__(self, trial):
        self.trial, self.iteration, self.pruned, self.reported = trial, 0, False, {}

    def feed(self, line):
        m = caffelog.ITERATION.search(line)
        if m and not caffelog.LR.search(line):
            self.iteration = int(m.group(1))
        m = caffelog.OUTPUT.search(line)
        if m and m.group(1) == "Test" and m.group(2) == "accuracy_top1":
            value = caffelog.parse_float(m.group(3))
            if math.isfinite(value) and self.iteration not in self.reported:
                self.reported[self.iteration] = value
                self.trial.report(value, self.iteration)
                if self.trial.should_prune():
                    self.pruned = True
                    return True
        return False


def prepare_trial(space, values, work, seed, mode):
    """Generate the trial's net and solver (gen.py's builders, then the solver values); -> solver path."""
    with open(os.path.join(space["lmdb_dir"], "manifest.json")) as f:
        manifest = json.load(f)
    cfg = gen.GenConfig(out=work, lmdb_dir=space["lmdb_dir"], mode=mode, num_classes=manifest["num_classes"],
                        val_size=manifest["splits"]["val"]["count"], max_iter=space["budget"]["max_iter"],
                        test_interval=space["budget"]["test_interval"], seed=seed,
                        **{k: values[k] for k in GEN_PARAMS if k in values})
    gen.generate([values["variant"]], cfg)
    path = os.path.join(work, values["variant"], "solver.prototxt")
    solver = runs.read_message(path, caffe_pb2().SolverParameter())
    for key in SOLVER_PARAMS:
        if key in values:
            setattr(solver, key, values[key])
    solver.snapshot = solver.max_iter  # one snapshot at the end (and one when pruned or stopped)
    write_text(path, "# generated by tinycaffe.sweep: %s\n" % json.dumps(values, sort_keys=True)
               + text_format.MessageToString(solver))
    return path


def run_trial(trial, space, sweep_dir, gpu):
    """Train one trial into sweep_dir/trial_<n>; -> its best val top-1. Raises optuna.TrialPruned
    when pruned and TrialFailed when training did not finish."""
    import optuna
    values = suggest(trial, space)
    run_dir = os.path.join(sweep_dir, "trial_%d" % trial.number)
    trial.set_user_attr("run_dir", run_dir)
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "gpu": gpu or "cpu"})
    with tempfile.TemporaryDirectory(prefix="sweep-gen-") as work:
        solver_path = prepare_trial(space, values, work, space["seed"] + trial.number, "gpu" if gpu else "cpu")
        args = argparse.Namespace(target=solver_path, gpu=gpu or "cpu", resume=False, weights=None, run_dir=run_dir,
                                  runs_root=None, engine="binary", anneal="step", patience=train.DEFAULT_PATIENCE,
                                  min_delta=train.DEFAULT_MIN_DELTA, max_anneals=train.DEFAULT_MAX_ANNEALS)
        reporter = Reporter(trial)
        code = train.launch(args, ["sweep.py", "trial", str(trial.number)], observer=reporter.feed)
    record = runs.load_record(run_dir)
    final = record.get("final") or {}
    trial.set_user_attr("final", {k: final[k] for k in ("iterations", "best_accuracy_top1", "best_accuracy_top5",
                                                        "accuracy_top1", "wall_seconds") if k in final})
    if reporter.pruned:
        record["status"] = "pruned"
        runs.save_record(run_dir, record)
        raise optuna.TrialPruned("val top-1 %s at iteration %d" % (reporter.reported.get(reporter.iteration),
                                                                   reporter.iteration))
    if code != 0 or "best_accuracy_top1" not in final:
        raise TrialFailed("trial %d: training %s (exit %d), see %s" % (trial.number, record.get("status"), code,
                                                                        os.path.join(run_dir, "caffe.log")))
    return final["best_accuracy_top1"]


# ---------------------------------------------------------------- workers
def counted(study):
    """Trials that count towards --trials: complete, pruned, and running ones."""
    from optuna.trial import TrialState
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))


def work(space, name, sweep_dir, trials, gpu, storage_url, pruner, sampler):
    """One worker: ask, train, tell, until the study holds `trials` finished trials. -> trials run."""
    import optuna
    from optuna.trial import TrialState
    storage = make_storage(storage_url, sweep_dir)
    study = open_study(name, storage, make_sampler(sampler, space), make_pruner(pruner, space["pruner"]))
    orphans = fail_orphans(study)
    if orphans:
        print("[sweep] trials %s of a worker that is gone: marked failed" % orphans, file=sys.stderr)
    done = 0
    while len(counted(study)) < trials:
        trial = study.ask()
        mine_first = [t for t in counted(study) if t.number < trial.number]
        if len(mine_first) >= trials:  # another worker asked at the same moment: not needed
            study.tell(trial, state=TrialState.FAIL)
            break
        stop = False
        try:
            value = run_trial(trial, space, sweep_dir, gpu)
        except optuna.TrialPruned:
            grid_done = _tell(study, trial, state=TrialState.PRUNED)
        except TrialFailed as exc:
            grid_done = _tell(study, trial, state=TrialState.FAIL)
            print("[sweep] %s" % exc, file=sys.stderr)
            record = runs.load_record(trial.user_attrs["run_dir"]) if os.path.isfile(
                os.path.join(trial.user_attrs.get("run_dir", ""), "run.json")) else {}
            stop = record.get("status") == "interrupted"  # a signal (Ctrl-C, Slurm's time limit): worker ends
        else:
            grid_done = _tell(study, trial, value)
        done += 1
        if stop or grid_done:
            break
    return done


def _tell(study, trial, value=None, state=None):
    """study.tell; True when the grid sampler has run out of combinations (it then calls
    Study.stop, which Optuna allows only inside optimize(): the state is stored all the same)."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise
        return True
    return False


def run(space_path, name=None, trials=DEFAULT_TRIALS, gpu="cpu", storage=None, pruner=DEFAULT_PRUNER,
        sampler=DEFAULT_SAMPLER, root=None):
    """The command: one worker on the CPU or one GPU, one worker process per GPU for a list."""
    space = load_space(space_path)
    name = name or os.path.splitext(os.path.basename(space_path))[0]
    sweep_dir = os.path.join(os.path.abspath(root) if root else repo_path(DEFAULT_ROOT), name)
    make_pruner(pruner, space["pruner"]), make_sampler(sampler, space)  # bad choices fail before any work
    if trials < 1:
        raise SweepError("--trials must be >= 1, got %d" % trials)
    gpus = [] if gpu in (None, "cpu") else gpu.split(",")
    if len(gpus) <= 1:
        return work(space, name, sweep_dir, trials, gpus[0] if gpus else None, storage, pruner, sampler)
    procs = []
    for one in gpus:
        command = [sys.executable, "-m", "tinycaffe.sweep", space_path, "--name", name, "--trials", str(trials),
                   "--gpu", one, "--pruner", pruner, "--sampler", sampler, "--root", os.path.dirname(sweep_dir)]
        if storage:
            command += ["--storage", storage]
        procs.append(subprocess.Popen(command))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        codes = [p.wait() for p in procs]
    return 0 if all(c == 0 for c in codes) else 1


# ---------------------------------------------------------------- the report
def report(name, root=None, storage=None, out=print):
    """Ranked Markdown table, CSV and PNGs of a study into sweeps/<name>/; -> the rows."""
    sweep_dir = os.path.join(os.path.abspath(root) if root else repo_path(DEFAULT_ROOT), name)
    if not storage and not os.path.isfile(os.path.join(sweep_dir, JOURNAL)):
        raise SweepError("no sweep '%s': %s has no %s" % (name, sweep_dir, JOURNAL))
    study = open_study(name, make_storage(storage, sweep_dir))
    rows = []
    for t in study.get_trials(deepcopy=False):
        final = t.user_attrs.get("final") or {}
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        rows.append({"trial": t.number, "status": t.state.name.lower(), "params": t.params,
                     "best_top1": final.get("best_accuracy_top1"), "best_top5": final.get("best_accuracy_top5"),
                     "iterations": final.get("iterations"), "wall_seconds": wall,
                     "run_dir": t.user_attrs.get("run_dir")})
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r["status"], 2), -(r["best_top1"] if r["best_top1"] is not None else -1),
                             r["trial"]))
    lines = ["| rank | trial | params | best val top-1 | best val top-5 | iterations | status | wall s |",
             "|---:|---:|---|---:|---:|---:|---|---:|"]
    for rank, r in enumerate(rows, 1):
        lines.append("| %d | %d | %s | %s | %s | %s | %s | %s |" % (
            rank, r["trial"], ", ".join("%s=%s" % (k, _short(v)) for k, v in sorted(r["params"].items())),
            _pct(r["best_top1"]), _pct(r["best_top5"]), r["iterations"] if r["iterations"] is not None else "",
            r["status"], "%.0f" % r["wall_seconds"] if r["wall_seconds"] is not None else ""))
    table = "\n".join(lines) + "\n"
    write_text(os.path.join(sweep_dir, "report.md"), "# Sweep %s\n\n%s" % (name, table))
    with open(os.path.join(sweep_dir, "report.csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "params", "best_top1", "best_top5", "iterations", "status", "wall_seconds",
                    "run_dir"])
        for rank, r in enumerate(rows, 1):
            w.writerow([rank, r["trial"], json.dumps(r["params"], sort_keys=True), r["best_top1"], r["best_top5"],
                        r["iterations"], r["status"], r["wall_seconds"], r["run_dir"]])
    os.replace(os.path.join(sweep_dir, "report.csv.tmp"), os.path.join(sweep_dir, "report.csv"))
    out(table)
    for png in _plots(study, sweep_dir):
        out("wrote " + png)
    return rows


def _plots(study, sweep_dir):
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm
    written = []
    for name, draw in (("history", ovm.plot_optimization_history), ("intermediate", ovm.plot_intermediate_values),
                       ("importances", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():  # Optuna's "experimental" notes and empty legends
                warnings.simplefilter("ignore")
                ax = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. importances need two complete trials with different values
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        path = os.path.join(sweep_dir, "%s.png" % name)
        fig.savefig(path + ".tmp.png", dpi=90, bbox_inches="tight")
        os.replace(path + ".tmp.png", path)
        plt.close(fig)
        written.append(path)
    return written


def _pct(value):
    return "" if value is None else "%.1f%%" % (100 * value)


def _short(value):
    return "%.3g" % value if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- worker processes (--gpu 0,1,...)
def _worker_main(argv):
    p = argparse.ArgumentParser(prog="tinycaffe.sweep")
    p.add_argument("space")
    p.add_argument("--name")
    p.add_argument("--trials", type=int)
    p.add_argument("--gpu")
    p.add_argument("--pruner")
    p.add_argument("--sampler")
    p.add_argument("--root")
    p.add_argument("--storage", default=None)
    a = p.parse_args(argv)
    space = load_space(a.space)
    work(space, a.name, os.path.join(a.root, a.name), a.trials, a.gpu, a.storage, a.pruner, a.sampler)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
