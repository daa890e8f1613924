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
import re
import socket
import subprocess
import sys
import tempfile

from google.protobuf import text_format

from . import REPO_ROOT, caffelog, gen, repo_path, runs, sweep_recovery, sweep_space, train
from .caffe_env import caffe_pb2
from .files import atomic_open, write_text
from .sweep_space import GEN_PARAMS, PRUNERS, SAMPLERS, SOLVER_PARAMS, SweepError, resolve_lmdb_dir  # noqa: F401

# ---------------------------------------------------------------- defaults
DEFAULT_ROOT = "sweeps"  # sweeps/<name>/: the journal, trial run dirs, the report
DEFAULT_TRIALS = 20  # finished (complete or pruned) trials the study aims at
DEFAULT_PRUNER = "median"  # Optuna's MedianPruner
DEFAULT_SAMPLER = "tpe"  # Optuna's TPESampler
JOURNAL = "journal.log"  # the file store's name inside sweeps/<name>/
STORAGE_ENV = "TINYCAFFE_SWEEP_STORAGE"  # an RDB URL passed to workers: never in argv, which `ps` shows every user
STORAGE_FILE = "storage.url"  # sweeps/<name>/storage.url (0600): the URL Slurm workers read (--storage-file)


class TrialFailed(Exception):
    """A trial's training did not finish (failed, diverged or interrupted): never a result."""


def load_space(path):
    """Read and check SPACE (sweep_space.parse_space), and its pruner options against Optuna's own
    pruners; -> the space dict."""
    space = sweep_space.parse_space(path)
    for name in space["pruner"]:
        try:
            make_pruner(name, space["pruner"])
        except TypeError as exc:
            raise SweepError("%s: pruner.%s: %s" % (path, name, exc))
    return space


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


_PASSWORD = re.compile(r"([\w+]+://[^:/@\s]*:)[^@\s]*@")  # SQLAlchemy's own URL pattern: user:password@
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s]*")  # libpq's ?password=...


def masked(url):
    """url (or a command line holding one) with its password as ***, for anything printed, logged,
    reported or written into a job script."""
    return _QUERY_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1***@", url))


def make_storage(url, sweep_dir, heartbeat=sweep_recovery.HEARTBEAT_SECONDS, reading=False):
    """The file journal in sweep_dir (default) or Optuna's RDB storage for a URL, both with
    heartbeats (sweep_recovery); a URL that does not parse or a database that does not answer is
    a SweepError naming the URL, its password masked."""
    if url:
        sqlite = re.match(r"^sqlite:///(.+)$", url)
        if sqlite and not os.path.isfile(sqlite.group(1)) and reading:
            raise SweepError("--storage %s: no such database file (a report only reads a study)" % masked(url))
        try:
            return sweep_recovery.rdb_storage(url, heartbeat)
        except Exception as exc:  # SQLAlchemy's ArgumentError, OperationalError, ... with the URL in them
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SweepError("--storage %s: %s" % (masked(url), first.replace(url, masked(url)))) from None
    try:
        os.makedirs(sweep_dir, exist_ok=True)
        return sweep_recovery.make_heartbeat_journal(os.path.join(sweep_dir, JOURNAL), heartbeat)
    except OSError as exc:
        raise SweepError("%s: cannot hold the study's journal (%s)" % (exc.filename or sweep_dir,
                                                                        exc.strerror or exc)) from None


def open_study(name, storage, sampler=None, pruner=None):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


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
    if values.get("ema_decay"):  # a searched average is what the trial is ranked on, whatever the recipe
        solver.test_ema = True
    solver.snapshot = solver.max_iter  # one snapshot at the end (and one when pruned or stopped)
    write_text(path, "# generated by tinycaffe.sweep: %s\n" % json.dumps(values, sort_keys=True)
               + text_format.MessageToString(solver))
    return path


class Interrupted(Exception):
    """Ctrl-C or SIGTERM (Slurm's time limit, scancel) during a trial: the worker stops."""


def run_trial(trial, space, sweep_dir, gpu):
    """Train one trial into sweep_dir/trial_<n>; -> the val top-1 of its final snapshot (the model
    make_submission.py --from-sweep submits, so the ranking and the submission are the same
    model). Raises optuna.TrialPruned when pruned, Interrupted on Ctrl-C/SIGTERM and TrialFailed
    when training did not finish (failed, diverged: non-finite weights or outputs included)."""
    import optuna
    values = suggest(trial, space)
    run_dir = os.path.join(sweep_dir, "trial_%d" % trial.number)
    trial.set_user_attr("run_dir", run_dir)
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
    trial.set_user_attr("final", {k: final[k] for k in FINAL_KEYS if k in final})
    if stops.received:
        raise Interrupted("trial %d stopped by a signal at iteration %s (snapshot in %s)"
                          % (trial.number, final.get("iterations"), run_dir))
    if reporter.pruned:
        record["status"] = "pruned"
        runs.save_record(run_dir, record)
        raise optuna.TrialPruned("pruned: val top-1 %s at iteration %d" % (reporter.reported.get(reporter.iteration),
                                                                           reporter.iteration))
    if code != 0 or "accuracy_top1" not in final or final.get("tested_at") != final.get("iterations"):
        raise TrialFailed("trial %d: training %s (exit %d), see %s" % (trial.number, record.get("status"), code,
                                                                        os.path.join(run_dir, "caffe.log")))
    return final["accuracy_top1"]


# What a trial keeps of its run's final numbers (run.json), for the report.
FINAL_KEYS = ("iterations", "tested_at", "accuracy_top1", "accuracy_top5", "best_accuracy_top1", "best_accuracy_top5",
              "wall_seconds")


# ---------------------------------------------------------------- workers
MAX_FAILURES_IN_A_ROW = 3  # a failure that repeats (a bad value, a broken LMDB) ends the worker


def finished(study):
    """Trials that count towards --trials: complete and pruned ones."""
    from optuna.trial import TrialState
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _stop_between_trials(signum, frame):
    raise KeyboardInterrupt  # SIGTERM outside a trial's training stops the worker as Ctrl-C does


def work(space, name, sweep_dir, trials, gpu, storage_url, pruner, sampler, heartbeat=None):
    """One worker: ask, train, tell, until the study holds `trials` finished trials (several
    workers may together overshoot by the trials still running when it is reached).
    -> (trials this worker told, exit status: 0, 1 after repeated failures, 130 on a signal
    during a trial). A signal between trials (Slurm's time limit may come at any moment) raises
    KeyboardInterrupt, like Ctrl-C: without this SIGTERM would kill the worker silently there."""
    import signal
    previous = signal.signal(signal.SIGTERM, _stop_between_trials)
    try:
        return _work(space, name, sweep_dir, trials, gpu, storage_url, pruner, sampler,
                     heartbeat or sweep_recovery.HEARTBEAT_SECONDS)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _work(space, name, sweep_dir, trials, gpu, storage_url, pruner, sampler, heartbeat):
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    study, heartbeat = _open_for_work(name, sweep_dir, storage_url, heartbeat, space, pruner, sampler)
    grid = sweep_recovery.grid_size(grid_space(space)) if sampler == "grid" else None
    done = failures = 0
    while True:
        lost = sweep_recovery.collect_lost(study, heartbeat)  # before every ask: a worker may have died meanwhile
        if lost:
            print("[sweep] trials %s lost their worker: marked failed, their points queued again" % lost,
                  file=sys.stderr)
        if len(finished(study)) >= trials:
            return done, 0
        trial = _ask(study, sweep_dir, grid, gpu)
        if trial is None:  # every point taken
            return done, 0
        try:
            with sweep_recovery.heartbeat(study, trial):
                value = run_trial(trial, space, sweep_dir, gpu)
            _tell(study, trial, value)
            failures = 0
        except UpdateFinishedTrialError:  # a heartbeat too late: another worker took the trial as lost
            print("[sweep] trial %d was taken as lost by another worker (its heartbeat came late): its result is "
                  "not kept, its point runs again" % trial.number, file=sys.stderr)
        except (KeyboardInterrupt, Interrupted) as exc:  # the asked trial is no result; its point is queued again
            _lose(study, trial, "stopped by a signal: %s" % (exc or "Ctrl-C or SIGTERM between trials"))
            if isinstance(exc, KeyboardInterrupt):
                raise
            print("[sweep] %s; run the same command to continue the study" % exc, file=sys.stderr)
            return done + 1, 130
        except optuna.TrialPruned as exc:
            _tell(study, trial, state=TrialState.PRUNED, reason=str(exc))
            failures = 0
        except Exception as exc:  # TrialFailed, a RunError, or anything the trial raised: a result of FAIL, never RUNNING
            reason = str(exc) if isinstance(exc, (TrialFailed, runs.RunError, ValueError)) else \
                "%s: %s" % (type(exc).__name__, exc)
            _tell(study, trial, state=TrialState.FAIL, reason=reason)
            failures += 1
            print("[sweep] %s" % reason, file=sys.stderr)
            if failures >= MAX_FAILURES_IN_A_ROW:
                print("[sweep] %d trials failed in a row: this worker stops (see their caffe.log)" % failures,
                      file=sys.stderr)
                return done + 1, 1
        done += 1


def _open_for_work(name, sweep_dir, storage_url, heartbeat, space, pruner, sampler):
    """The study, with the heartbeat interval it keeps (the first worker's): every worker judges
    staleness alike, whatever its own --heartbeat. -> (study, interval)."""
    storage = make_storage(storage_url, sweep_dir, heartbeat)
    study = _open(name, storage, space, pruner, sampler)
    kept = study.user_attrs.get("heartbeat_seconds")
    if kept is None:
        study.set_user_attr("heartbeat_seconds", heartbeat)
    elif kept != heartbeat:
        print("[sweep] study '%s' keeps a heartbeat of %d s (--heartbeat %d ignored)" % (name, kept, heartbeat),
              file=sys.stderr)
        heartbeat = kept
        study = _open(name, make_storage(storage_url, sweep_dir, heartbeat), space, pruner, sampler)
    check_same_experiment(study, space, name, sampler, pruner)
    return study, heartbeat


def _open(name, storage, space, pruner, sampler):
    try:
        return open_study(name, storage, make_sampler(sampler, space), make_pruner(pruner, space["pruner"]))
    except OSError as exc:  # a study folder this user cannot write (the journal's lock)
        raise SweepError("%s: cannot work on study '%s' (%s)" % (exc.filename or name, name,
                                                                 exc.strerror or exc)) from None


def _lose(study, trial, reason):
    """A trial this worker stops before it ends: FAIL with the reason, its point queued again."""
    from optuna.trial import TrialState
    trial.set_user_attr("reason", "lost: " + reason)
    _tell(study, trial, state=TrialState.FAIL)
    sweep_recovery.lost(study, study._storage.get_trial(trial._trial_id))


def check_same_experiment(study, space, name, sampler=None, pruner=None):
    """A study is one experiment: the first worker stores the space and the data's fingerprint
    with it; a worker with another space or data is refused, naming what differs."""
    current = sweep_space.identity(space, sampler, pruner)
    stored = study.user_attrs.get("space")
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise SweepError("study '%s' was made by an earlier tinycaffe, which kept neither its space nor its data "
                             "with it (and ranked trials by another number): start a new study with --name %s-2"
                             % (name, name))
        study.set_user_attr("space", current)
        return
    changed = sweep_space.differences(stored, current)
    if changed:
        raise SweepError("study '%s' was started with another space or data (%s differ): its trials would not "
                         "compare; run it with the space it began with, or start a new study with --name %s-2"
                         % (name, ", ".join(changed), name))


def _ask(study, sweep_dir, grid=None, gpu=None):
    """study.ask, one worker of this machine at a time (a lock file in sweeps/<name>/), after
    asking whether a point is left (sweep_recovery.work_left) under the same lock: Optuna's
    GridSampler hands a taken point out again once none is free. The new trial names its worker
    at once (a worker that dies later is found by its pid). None: nothing left to do. Workers on
    other machines (an RDB study) may still collide: an extra trial, never a lost one."""
    import fcntl
    import warnings
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "ask.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not sweep_recovery.work_left(study, grid):
            return None
        with warnings.catch_warnings():  # "heartbeat ... used with Study.optimize": we run its thread ourselves
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            trial = study.ask()
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "gpu": gpu or "cpu"})
        return trial


def _tell(study, trial, value=None, state=None, reason=None):
    """study.tell. The grid sampler calls Study.stop when it has handed out every point, which
    Optuna allows only inside optimize(): the state is stored all the same, and whether work is
    left is sweep_recovery.work_left's to say (a lost point queued again is). reason: the
    trial's, said in the report."""
    if reason is not None:
        trial.set_user_attr("reason", reason)
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def run(space_path, name=None, trials=DEFAULT_TRIALS, gpu="cpu", storage=None, pruner=DEFAULT_PRUNER,
        sampler=DEFAULT_SAMPLER, root=None, heartbeat=None):
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
        return work(space, name, sweep_dir, trials, gpus[0] if gpus else None, storage, pruner, sampler, heartbeat)
    return _run_workers(space_path, name, sweep_dir, trials, gpus, storage, pruner, sampler, heartbeat)


def _run_workers(space_path, name, sweep_dir, trials, gpus, storage, pruner, sampler, heartbeat=None):
    """One worker process per GPU; Ctrl-C and SIGTERM are passed on to all of them (each then
    snapshots its trial). The storage URL goes through the environment (argv is public).
    -> (0, worst exit status)."""
    import signal
    procs = []
    env = dict(os.environ, **({STORAGE_ENV: storage} if storage else {}))
    for one in gpus:
        command = [sys.executable, "-m", "tinycaffe.sweep", space_path, "--name", name, "--trials", str(trials),
                   "--gpu", one, "--pruner", pruner, "--sampler", sampler, "--root", os.path.dirname(sweep_dir),
                   "--heartbeat", str(heartbeat or sweep_recovery.HEARTBEAT_SECONDS)]
        procs.append(subprocess.Popen(command, env=env))

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


def storage_url(url=None, url_file=None):
    """The study's RDB URL from --storage, --storage-file (a file holding it, e.g. the 0600
    sweeps/<name>/storage.url sweep_slurm.py writes) or $TINYCAFFE_SWEEP_STORAGE; None: the journal."""
    if url and url_file:
        raise SweepError("--storage and --storage-file: give one")
    if url_file:
        try:
            with open(url_file) as f:
                url = f.read().strip()
        except OSError as exc:
            raise SweepError("--storage-file %s: %s" % (url_file, exc.strerror))
        if not url:
            raise SweepError("--storage-file %s: empty (expected one database URL)" % url_file)
    return url or os.environ.get(STORAGE_ENV) or None


def again_command(flag, name, root=None, storage_file=None, storage=None):
    """`.venv/bin/python tools/sweep.py FLAG NAME` where the study lives (--root, the storage), for
    hints to copy: a URL with a password is never printed (its file is named, or the hint reads it
    from $TINYCAFFE_SWEEP_STORAGE, which must then hold it)."""
    import shlex
    tool = [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p
            for p in (os.path.join(REPO_ROOT, ".venv", "bin", "python"), os.path.join(REPO_ROOT, "tools", "sweep.py"))]
    parts = tool + [flag, name]
    if root:
        parts += ["--root", os.path.abspath(root)]
    if storage_file:
        parts += ["--storage-file", os.path.abspath(storage_file)]
    elif storage and masked(storage) == storage:
        parts += ["--storage", storage]
    line = " ".join(shlex.quote(p) for p in parts)
    if storage and not storage_file and masked(storage) != storage:
        line += " (with $%s set to the study's URL)" % STORAGE_ENV
    return line


# ---------------------------------------------------------------- the report
def _sweep_dir(name, root=None):
    return os.path.join(os.path.abspath(root) if root else repo_path(DEFAULT_ROOT), name)


def _existing_study(name, root, storage):
    """(sweeps/<name>/, the study) of a sweep that was run, loaded without a write to its storage
    (a report reads; a read-only copy of a journal works): never an empty new one for a typo."""
    import optuna
    sweep_dir = _sweep_dir(name, root)
    if not storage and not os.path.isfile(os.path.join(sweep_dir, JOURNAL)):
        raise SweepError("no sweep '%s': %s has no %s" % (name, sweep_dir, JOURNAL))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    where = masked(storage) if storage else os.path.join(sweep_dir, JOURNAL)
    backend = make_storage(storage, sweep_dir, reading=True)
    try:
        return sweep_dir, optuna.load_study(study_name=name, storage=backend)
    except KeyError:  # Optuna: no study of that name in the storage
        raise SweepError("no sweep '%s' in %s" % (name, where)) from None


RANKED_BY = ("ranked by the val top-1 of each complete trial's final snapshot, the model make_submission.py "
             "--from-sweep submits; pruned and failed trials follow, unranked, with their reason")


def report(name, root=None, storage=None, out=print):
    """Ranked Markdown table, CSV and PNGs of a study into sweeps/<name>/; -> the rows."""
    sweep_dir, study = _existing_study(name, root, storage)
    trials = study.get_trials(deepcopy=False)
    rows = [_report_row(t, trials) for t in trials]
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r["status"], 2), -(r["top1"] if r["top1"] is not None else -1), r["trial"]))
    for rank, r in enumerate((r for r in rows if r["status"] == "complete"), 1):
        r["rank"] = rank
    lines = ["| rank | trial | params | val top-1 (final snapshot) | val top-5 | best val top-1 (any test) | "
             "iterations | status | wall s | reason |",
             "|---:|---:|---|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["rank"] or "–", r["trial"], ", ".join("%s=%s" % (k, _short(v)) for k, v in sorted(r["params"].items())),
            _pct(r["top1"]), _pct(r["top5"]), _pct(r["best_top1"]), r["iterations"] if r["iterations"] is not None
            else "", r["status"], "%.0f" % r["wall_seconds"] if r["wall_seconds"] is not None else "",
            r["reason"].replace("|", "/")))
    table = "\n".join(lines) + "\n"
    out("%s\n%s" % (RANKED_BY, table))
    try:
        _write_report_files(name, study, sweep_dir, table, rows, out)
    except OSError as exc:  # a read-only copy of the study: the table above is the report
        print("[sweep] report files not written: %s: %s" % (exc.filename or sweep_dir, exc.strerror or exc),
              file=sys.stderr)
    return rows


def _write_report_files(name, study, sweep_dir, table, rows, out):
    """report.md, report.csv and Optuna's plots in the sweep's folder."""
    write_text(os.path.join(sweep_dir, "report.md"), "# Sweep %s\n\n%s: %s.\n\n%s" % (name, name, RANKED_BY, table))
    with atomic_open(os.path.join(sweep_dir, "report.csv"), newline="") as f:
        w = csv.writer(f)
        columns = ["rank", "trial", "params", "top1", "top5", "best_top1", "iterations", "status", "wall_seconds",
                   "reason", "run_dir"]
        w.writerow(columns)
        for r in rows:
            w.writerow([json.dumps(r[c], sort_keys=True) if c == "params" else r[c] for c in columns])
    for png in _plots(study, sweep_dir):
        out("wrote " + png)


def _report_row(t, trials):
    """A trial as the report shows it: a failed or pruned run's numbers are no result (NaN weights
    test at 100 %, a pruned trial stopped early), so only complete trials carry them."""
    final = t.user_attrs.get("final") or {}
    complete = t.state.name == "COMPLETE"
    wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
        t.datetime_start else None
    return {"rank": None, "trial": t.number, "status": t.state.name.lower(), "params": t.params,
            "top1": t.value if complete else None, "top5": final.get("accuracy_top5") if complete else None,
            "best_top1": final.get("best_accuracy_top1") if complete else None,
            "iterations": final.get("iterations"), "wall_seconds": wall,
            "reason": sweep_recovery.lost_reason(t, trials) if t.state.name == "FAIL" else t.user_attrs.get("reason", ""),
            "run_dir": t.user_attrs.get("run_dir")}


def best_models(name, top, root=None, storage=None):
    """(deploy.prototxt, final .caffemodel) of the `top` complete trials whose final snapshot has
    the best val top-1 (their value: the report's ranking), best first: what make_submission.py
    --from-sweep averages."""
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
        weights = runs.final_model(run_dir)
        deploy = os.path.join(run_dir, "deploy.prototxt")
        if not weights or not os.path.isfile(deploy):
            raise SweepError("trial %d: %s lacks deploy.prototxt or a final .caffemodel" % (t.number, run_dir))
        models.append((deploy, weights))
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
    p.add_argument("--heartbeat", type=int, default=None)
    a = p.parse_args(argv)
    a.storage = os.environ.get(STORAGE_ENV) or None
    try:
        space = load_space(a.space)
        _, status = work(space, a.name, os.path.join(a.root, a.name), a.trials, a.gpu, a.storage, a.pruner,
                         a.sampler, a.heartbeat)
    except (SweepError, runs.RunError, ValueError) as exc:
        print("sweep worker (gpu %s): error: %s" % (a.gpu, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sweep worker (gpu %s): stopped by a signal between trials" % a.gpu, file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
