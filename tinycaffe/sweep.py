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

from . import augment, caffelog, gen, nets, repo_path, runs, solver as solvers, train
from .caffe_env import caffe_pb2
from .files import atomic_open, write_text

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
    lmdb_dir = resolve_lmdb_dir(space.get("lmdb_dir", gen.DEFAULT_LMDB_DIR), path)
    if not os.path.isfile(os.path.join(lmdb_dir, "manifest.json")):
        raise SweepError("%s: lmdb_dir %s has no manifest.json (run tools/make_lmdb.py first)" % (path, lmdb_dir))
    loaded = {"variants": list(variants), "lmdb_dir": lmdb_dir, "budget": budget, "params": params,
              "pruner": space.get("pruner") or {}, "seed": int(space.get("seed", 0)), "path": os.path.abspath(path)}
    _check_combinations(path, loaded)
    if not isinstance(loaded["pruner"], dict):
        raise SweepError("%s: pruner must map a pruner name to its options" % path)
    for name in loaded["pruner"]:
        try:
            make_pruner(name, loaded["pruner"])
        except TypeError as exc:
            raise SweepError("%s: pruner.%s: %s" % (path, name, exc))
    return loaded


def resolve_lmdb_dir(lmdb_dir, space_path):
    """A space's lmdb_dir made absolute: relative to the space file's folder where it is there, else to the repo."""
    if os.path.isabs(lmdb_dir):
        return lmdb_dir
    beside = os.path.join(os.path.dirname(os.path.abspath(space_path)), lmdb_dir)
    return beside if os.path.isdir(beside) else repo_path(lmdb_dir)


# What each searchable value may be: (kind of value, check, what the check wants).
_number = augment.finite_number
VALUE_RULES = {
    "batch_size": ("int", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "crop": ("int", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64, "an integer 1..64"),
    "stepsize": ("int", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "augment": ("choice", lambda v: v in augment.PRESETS, "one of %s" % ", ".join(augment.PRESETS)),
    "solver": ("choice", lambda v: v in solvers.SOLVER_TYPES, "one of %s" % ", ".join(solvers.SOLVER_TYPES)),
    "base_lr": ("float", lambda v: _number(v) and v >= 0, "a number >= 0"),
    "weight_decay": ("float", lambda v: _number(v) and v >= 0, "a number >= 0"),
    "momentum": ("float", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "gamma": ("float", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def _check_param(path, name, spec):
    where = "%s: params.%s" % (path, name)
    if name not in VALUE_RULES:
        raise SweepError("%s: not a searchable value (valid: %s)" % (where, ", ".join(VALUE_RULES)))
    kind, ok, wanted = VALUE_RULES[name]
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise SweepError("%s: needs type: %s" % (where, " | ".join(KINDS)))
    if spec["type"] == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise SweepError("%s: categorical needs a non-empty list of choices" % where)
        bad = [c for c in spec["choices"] if not ok(c)]
        if bad:
            raise SweepError("%s: choice %r is not %s" % (where, bad[0], wanted))
        return
    if kind == "choice":
        raise SweepError("%s: a choice, so type: categorical with choices (%s)" % (where, wanted))
    if kind == "int" and spec["type"] != "int":
        raise SweepError("%s: an integer, so type: int (or categorical)" % where)
    low, high = spec.get("low"), spec.get("high")
    if not all(_number(v) for v in (low, high)) or not low < high:
        raise SweepError("%s: %s needs numbers low < high, got %r and %r" % (where, spec["type"], low, high))
    if not (ok(low) and ok(high)) and not (kind == "int" and ok(int(low)) and ok(int(high))):
        raise SweepError("%s: low and high must be %s, got %r and %r" % (where, wanted, low, high))
    if spec.get("log") and low <= 0:
        raise SweepError("%s: log scale needs low > 0, got %r" % (where, low))


def _check_combinations(path, space):
    """Values that can never work together: Caffe refuses momentum with AdaGrad."""
    solver_choices = space["params"].get("solver", {}).get("choices", [])
    if "adagrad" in solver_choices and "momentum" in space["params"]:
        raise SweepError("%s: params.momentum with solver adagrad: Caffe refuses momentum with AdaGrad; search "
                         "them in separate sweeps" % path)


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
    """TPE and random seeded per worker process (the space's seed + the pid): workers started
    together, and a study continued later, must not draw the same values again. The grid is
    seeded by the space alone: GridSampler shuffles its points with the seed and names each by
    its place in that order (the trial's grid_id), so every worker must hold the same order,
    or one worker's point 2 is another's point 0, and points are run twice while others never."""
    import optuna
    seed = space["seed"] + os.getpid()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # running trials count as pending
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(space), seed=space["seed"])
    raise SweepError("unknown --sampler '%s' (valid: %s)" % (name, ", ".join(SAMPLERS)))


def make_storage(url, sweep_dir):
    """The file journal in sweep_dir (default) or Optuna's RDB storage for a URL."""
    import optuna
    if url:
        return optuna.storages.RDBStorage(url)
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
    """Trials left RUNNING by a worker of this machine (same host name) whose process is gone
    (killed, crashed): FAIL, so they never count as results. Trials of other machines are left
    alone; they do not hold up this worker either (only finished trials count)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        pid = int(worker.get("pid", 0) or 0)
        if worker.get("host") == host and pid > 0 and pid != os.getpid() and not _alive(pid):
            try:
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another worker starting at the same moment failed it first
            failed.append(t.number)
    return failed


# ---------------------------------------------------------------- one trial
class Reporter:
    """Fed the trial's log lines: reports every val top-1 to Optuna when its test block ends;
    True when pruned. A block whose val loss is not finite (diverged weights: Caffe's Accuracy
    then says 1.0) is not a result and is not reported."""

    def __init__(self, trial):
        self.trial, self.iteration, self.pruned, self.reported, self.block = trial, 0, False, {}, {}

    def feed(self, line):
        m = caffelog.OUTPUT.search(line)
        if m and m.group(1) == "Test":
            self.block[m.group(2)] = caffelog.parse_float(m.group(3))
            return False
        stop = self._flush() if self.block else False
        m = caffelog.ITERATION.search(line)
        if m and not caffelog.LR.search(line):
            self.iteration = int(m.group(1))
        return stop

    def finish(self):
        """The last block, if the log ended right after it."""
        if self.block:
            self._flush()

    def _flush(self):
        block, self.block = self.block, {}
        value = block.get("accuracy_top1", math.nan)
        if not (math.isfinite(value) and math.isfinite(block.get("loss", 0.0))) or self.iteration in self.reported:
            return False
        from optuna.exceptions import UpdateFinishedTrialError
        self.reported[self.iteration] = value
        try:
            self.trial.report(value, self.iteration)
            self.pruned = self.trial.should_prune()
        except UpdateFinishedTrialError:  # failed by another worker that thought this one gone
            return True
        return self.pruned


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


class Interrupted(Exception):
    """Ctrl-C or SIGTERM (Slurm's time limit, scancel) during a trial: the worker stops."""


def run_trial(trial, space, sweep_dir, gpu):
    """Train one trial into sweep_dir/trial_<n>; -> its best val top-1. Raises optuna.TrialPruned
    when pruned, Interrupted on Ctrl-C/SIGTERM and TrialFailed when training did not finish."""
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
        reporter, stops = Reporter(trial), train.StopSignals()
        code = train.launch(args, ["sweep.py", "trial", str(trial.number)], observer=reporter.feed, stops=stops)
        reporter.finish()
    record = runs.load_record(run_dir)
    final = record.get("final") or {}
    trial.set_user_attr("final", {k: final[k] for k in ("iterations", "best_accuracy_top1", "best_accuracy_top5",
                                                        "accuracy_top1", "wall_seconds") if k in final})
    if stops.received:
        raise Interrupted("trial %d stopped by a signal at iteration %s (snapshot in %s)"
                          % (trial.number, final.get("iterations"), run_dir))
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
MAX_FAILURES_IN_A_ROW = 3  # a failure that repeats (a bad value, a broken LMDB) ends the worker


def finished(study):
    """Trials that count towards --trials: complete and pruned ones."""
    from optuna.trial import TrialState
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _stop_between_trials(signum, frame):
    raise KeyboardInterrupt  # SIGTERM outside a trial's training stops the worker as Ctrl-C does


def work(space, name, sweep_dir, trials, gpu, storage_url, pruner, sampler):
    """One worker: ask, train, tell, until the study holds `trials` finished trials (several
    workers may together overshoot by the trials still running when it is reached).
    -> (trials this worker told, exit status: 0, 1 after repeated failures, 130 on a signal
    during a trial). A signal between trials (Slurm's time limit may come at any moment) raises
    KeyboardInterrupt, like Ctrl-C: without this SIGTERM would kill the worker silently there."""
    import signal
    previous = signal.signal(signal.SIGTERM, _stop_between_trials)
    try:
        return _work(space, name, sweep_dir, trials, gpu, storage_url, pruner, sampler)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _work(space, name, sweep_dir, trials, gpu, storage_url, pruner, sampler):
    import optuna
    from optuna.trial import TrialState
    storage = make_storage(storage_url, sweep_dir)
    study = open_study(name, storage, make_sampler(sampler, space), make_pruner(pruner, space["pruner"]))
    orphans = fail_orphans(study)
    if orphans:
        print("[sweep] trials %s of a worker that is gone: marked failed" % orphans, file=sys.stderr)
    done = failures = 0
    while len(finished(study)) < trials:
        trial = _ask(study, sweep_dir)
        try:
            value = run_trial(trial, space, sweep_dir, gpu)
        except KeyboardInterrupt:  # before or after its training: the asked trial is no result
            _tell(study, trial, state=TrialState.FAIL)
            raise
        except optuna.TrialPruned:
            grid_done, failures = _tell(study, trial, state=TrialState.PRUNED), 0
        except Interrupted as exc:
            _tell(study, trial, state=TrialState.FAIL)
            print("[sweep] %s; run the same command to continue the study" % exc, file=sys.stderr)
            return done + 1, 130
        except (TrialFailed, runs.RunError, ValueError) as exc:
            grid_done, failures = _tell(study, trial, state=TrialState.FAIL), failures + 1
            print("[sweep] %s" % exc, file=sys.stderr)
            if failures >= MAX_FAILURES_IN_A_ROW:
                print("[sweep] %d trials failed in a row: this worker stops (see their caffe.log)" % failures,
                      file=sys.stderr)
                return done + 1, 1
        else:
            grid_done, failures = _tell(study, trial, value), 0
        done += 1
        if grid_done:
            break
    return done, 0


def _ask(study, sweep_dir):
    """study.ask, one worker of this machine at a time (a lock file in sweeps/<name>/): Optuna's
    GridSampler gives a new trial a point that no trial holds yet, and two workers asking at
    the same moment could both get the same one. Workers on other machines (an RDB study)
    may still collide; their duplicates are extra trials, never lost ones."""
    import fcntl
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "ask.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        return study.ask()


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
    sweep_dir = _sweep_dir(name, root)
    make_pruner(pruner, space["pruner"])  # bad choices fail before any work
    make_sampler(sampler, space)
    if trials < 1:
        raise SweepError("--trials must be >= 1, got %d" % trials)
    gpus = [] if gpu in (None, "cpu") else gpu.split(",")
    if len(gpus) <= 1:
        return work(space, name, sweep_dir, trials, gpus[0] if gpus else None, storage, pruner, sampler)
    return _run_workers(space_path, name, sweep_dir, trials, gpus, storage, pruner, sampler)


def _run_workers(space_path, name, sweep_dir, trials, gpus, storage, pruner, sampler):
    """One worker process per GPU; Ctrl-C and SIGTERM are passed on to all of them (each then
    snapshots its trial). -> (0, worst exit status)."""
    import signal
    procs = []
    for one in gpus:
        command = [sys.executable, "-m", "tinycaffe.sweep", space_path, "--name", name, "--trials", str(trials),
                   "--gpu", one, "--pruner", pruner, "--sampler", sampler, "--root", os.path.dirname(sweep_dir)]
        if storage:
            command += ["--storage", storage]
        procs.append(subprocess.Popen(command))

    def pass_on(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0, max(codes, key=lambda c: (c != 0, abs(c)))


# ---------------------------------------------------------------- the report
def _sweep_dir(name, root=None):
    return os.path.join(os.path.abspath(root) if root else repo_path(DEFAULT_ROOT), name)


def _existing_study(name, root, storage):
    """(sweeps/<name>/, the study) of a sweep that was run: never an empty new one for a typo."""
    sweep_dir = _sweep_dir(name, root)
    if not storage and not os.path.isfile(os.path.join(sweep_dir, JOURNAL)):
        raise SweepError("no sweep '%s': %s has no %s" % (name, sweep_dir, JOURNAL))
    return sweep_dir, open_study(name, make_storage(storage, sweep_dir))


def report(name, root=None, storage=None, out=print):
    """Ranked Markdown table, CSV and PNGs of a study into sweeps/<name>/; -> the rows."""
    sweep_dir, study = _existing_study(name, root, storage)
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
        if r["status"] not in ("complete", "pruned"):
            r["best_top1"] = r["best_top5"] = None  # a failed run's numbers are no result (NaN weights say 100%)
        lines.append("| %s | %d | %s | %s | %s | %s | %s | %s |" % (
            rank if r["status"] in ("complete", "pruned") else "–", r["trial"], ", ".join("%s=%s" % (k, _short(v)) for k, v in sorted(r["params"].items())),
            _pct(r["best_top1"]), _pct(r["best_top5"]), r["iterations"] if r["iterations"] is not None else "",
            r["status"], "%.0f" % r["wall_seconds"] if r["wall_seconds"] is not None else ""))
    table = "\n".join(lines) + "\n"
    write_text(os.path.join(sweep_dir, "report.md"), "# Sweep %s\n\n%s" % (name, table))
    with atomic_open(os.path.join(sweep_dir, "report.csv"), newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "params", "best_top1", "best_top5", "iterations", "status", "wall_seconds",
                    "run_dir"])
        for rank, r in enumerate(rows, 1):
            w.writerow([rank, r["trial"], json.dumps(r["params"], sort_keys=True), r["best_top1"], r["best_top5"],
                        r["iterations"], r["status"], r["wall_seconds"], r["run_dir"]])
    out(table)
    for png in _plots(study, sweep_dir):
        out("wrote " + png)
    return rows


def best_models(name, top, root=None, storage=None):
    """(deploy.prototxt, final .caffemodel) of the `top` complete trials with the best val top-1,
    best first: what make_submission.py --from-sweep averages."""
    import glob

    from optuna.trial import TrialState
    if top < 1:
        raise SweepError("--top must be >= 1, got %d" % top)
    _, study = _existing_study(name, root, storage)
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: (-t.value, t.number))
    if len(complete) < top:
        raise SweepError("sweep '%s' has %d complete trial(s), fewer than --top %d" % (name, len(complete), top))
    models = []
    for t in complete[:top]:
        run_dir = t.user_attrs["run_dir"]
        weights = glob.glob(os.path.join(run_dir, "snapshots", "*_iter_*.caffemodel"))
        deploy = os.path.join(run_dir, "deploy.prototxt")
        if not weights or not os.path.isfile(deploy):
            raise SweepError("trial %d: %s lacks deploy.prototxt or a final .caffemodel" % (t.number, run_dir))
        models.append((deploy, max(weights, key=runs.snapshot_iteration)))
    return models


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
    try:
        space = load_space(a.space)
        _, status = work(space, a.name, os.path.join(a.root, a.name), a.trials, a.gpu, a.storage, a.pruner,
                         a.sampler)
    except (SweepError, runs.RunError, ValueError) as exc:
        print("sweep worker (gpu %s): error: %s" % (a.gpu, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sweep worker (gpu %s): stopped by a signal between trials" % a.gpu, file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
