"""Training runs: the real `caffe train` (scripts/train.sh) or a pycaffe loop (tools/train.py)
that adds plateau annealing, both into the same run directory layout (see runs.py).

The Caffe process (binary or pycaffe worker) runs as a child whose log this
process tees into run_dir/caffe.log and the terminal; it watches the loss, and at
the end writes train.csv, test.csv, curves.png and the final numbers into run.json.
"""
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

from . import REPO_ROOT, caffelog, caffe_env, devices, live, progress, repo_path, runs
from .caffe_env import caffe_pb2
from .files import write_text

# ---------------------------------------------------------------- defaults
DEFAULT_PATIENCE = 3  # test evaluations without improvement before the LR is divided by 10
DEFAULT_MIN_DELTA = 0.002  # val top-1 gain that counts as an improvement
DEFAULT_MAX_ANNEALS = 3  # after this many anneals, the next plateau ends the run
ANNEAL_FACTOR = 0.1  # the paper's manual cuts were /10
DIVERGED_LOSS = 87.3  # SoftmaxWithLoss caps at -log(FLT_MIN) = 87.34: the softmax underflowed
# CPU threads for training: one per CPU this process may use (its affinity: cgroup, taskset,
# Slurm), for OpenBLAS and for Caffe's own OpenMP layers (patch 0011), the same number for
# both. On this 2-core machine 2 threads trained 1.68x (tiny) and 1.80x (alexnet) faster than 1
# (bench/bench_train.py, README); a value set in the environment wins.
OPENBLAS_THREADS = str(devices.usable_cpus())


def launch(args, argv, observer=None, stops=None):
    """The whole run from the parent's side. Returns the process exit status. observer, if given,
    is called with every log line; when it returns True the run stops as on Ctrl-C (snapshot,
    status "interrupted"): a sweep's pruner uses it. stops: a StopSignals to use (the caller then
    sees in its `received` whether Ctrl-C or SIGTERM came during the run)."""
    variant, solver_path, base = runs.resolve_solver(args.target)
    gpu = runs.parse_gpu(args.gpu)
    if gpu and ("," in gpu or gpu == "all"):
        if args.engine == "pycaffe":
            raise runs.RunError("--gpu %s: several GPUs need Caffe's NCCL path: use scripts/train.sh" % gpu)
        if not caffe_env.import_caffe().has_nccl():
            raise runs.RunError("--gpu %s: this Caffe build has no NCCL (built with USE_NCCL=OFF), so it can "
                                "train on one GPU only; pass a single id" % gpu)
    if args.weights and args.resume:
        raise runs.RunError("--weights starts a new run from a .caffemodel; --resume continues a run from its own "
                            ".solverstate: give one of them")
    if args.weights and not os.path.isfile(args.weights):
        raise runs.RunError("--weights %s: no such file" % args.weights)
    if args.weights:
        args.weights = os.path.abspath(args.weights)  # the child runs in the repo root
    runs_root = os.path.abspath(args.runs_root) if args.runs_root else repo_path(runs.DEFAULT_RUNS)
    overrides = runs.overrides_of(args)
    state = None
    if args.resume:
        if args.run_dir:
            runs.require_run_dir(args.run_dir)
        run_dir = os.path.abspath(args.run_dir or runs.newest_run_dir(variant, runs_root))
        record = runs.load_record(run_dir)
        if (record.get("anneal") or {}).get("mode") == "plateau" and args.engine != "pycaffe":
            raise runs.RunError("%s anneals on plateaus (its LR is not the solver's schedule): resume it with "
                                "tools/train.py --resume" % run_dir)
        state = runs.newest_solverstate(run_dir)
        used = runs.read_message(os.path.join(run_dir, "solver.prototxt"), caffe_pb2().SolverParameter())
        try:
            runs.override_resumed(run_dir, used, overrides, state)
            runs.set_device(run_dir, used, gpu)  # a run may continue on another device
            record["data_segments"] = runs.add_data_segment(record, runs.snapshot_iteration(state),
                                                            runs.solver_count(gpu))
            # prechecks the run's net (LMDBs, mean, fit) as a new run's is checked
            solver_file = runs.continue_data_stream(run_dir, used, state, record["data_segments"])
        except OSError as exc:
            raise _unwritable(exc, run_dir) from exc
        record["resumes"].append({"at": runs.now(), "from": state, "command": argv})
        if overrides:
            record["resumes"][-1]["overrides"] = overrides
        record["status"] = "running"
    else:
        solver = runs.read_message(solver_path, caffe_pb2().SolverParameter())
        net_path, net = runs.precheck(solver, solver_path, base)
        runs.apply_overrides(solver, net, overrides)
        if args.weights:
            _check_weights(args.weights, net)
        run_dir = os.path.abspath(args.run_dir or runs.new_run_dir(variant, runs_root))
        if os.path.exists(run_dir) and os.listdir(run_dir):
            raise runs.RunError("--run-dir %s exists and is not empty (use --resume to continue it)" % run_dir)
        try:
            used = runs.prepare(variant, solver_path, solver, net_path, net, run_dir, gpu, overrides)
        except OSError as exc:
            raise _unwritable(exc, run_dir) from exc
        solver_file = os.path.join(run_dir, "solver.prototxt")
        record = runs.start_record(variant, argv, used, gpu, args.engine,
                                   _anneal_settings(args), net)
        if overrides:
            record["overrides"] = overrides
        if not os.path.isfile(os.path.join(run_dir, "deploy.prototxt")):
            print("[train] note: no deploy.prototxt beside %s, so this run has none: evaluate.py and make_submission.py "
                  "need one (the same layers with an Input layer for the Data layers, and a Softmax `prob` for the "
                  "loss and accuracy layers); tools/gen_prototxt.py writes one for its variants" % net_path,
                  file=sys.stderr)
        record["data_segments"] = runs.add_data_segment(record, 0, runs.solver_count(gpu))
    command = (_binary_command(solver_file, gpu, state, args.weights) if args.engine == "binary"
               else _worker_command(run_dir, gpu, state, args.weights, record))
    log_path = os.path.join(run_dir, "caffe.log")
    with stops or StopSignals() as stops:  # from here on a signal can no longer leave run.json at "running"
        try:
            runs.save_record(run_dir, record)
        except OSError as exc:
            raise runs.RunError("%s: cannot write run.json (%s)" % (run_dir, exc.strerror or exc)) from exc
        verbose = getattr(args, "verbose", False)
        start = runs.snapshot_iteration(state) if state else 0
        print("[train] run dir %s (%s, %s%s)%s" % (run_dir, args.engine, "gpu " + gpu if gpu else "cpu",
                                                   ", resuming from iteration %d" % start if state else "",
                                                   "" if verbose else "; Caffe's log: caffe.log there (--verbose shows it)"),
              file=sys.stderr)
        curves = live.LiveCurves(run_dir, runs.images_per_iteration(used, gpu),
                                 purge_step=start if state else None,
                                 warn=lambda message: print("[train] warning: " + message, file=sys.stderr),
                                 aliases=runs.accuracy_aliases(run_dir))
        label = "trial %s" % argv[2] if argv[0] == "sweep.py" and len(argv) > 2 else record["variant"]
        line = None if verbose else progress.ProgressLine(
            label, used.max_iter, start, runs.images_per_iteration(used, gpu), runs.accuracy_aliases(run_dir),
            test_interval=used.test_interval if used.test_iter else 0)
        try:
            status, returncode, losses = _tee(command, log_path, record, run_dir, stops, curves, observer, line)
            if status == "finished" and args.engine == "binary" and not stops.stopping:
                status, returncode = _final_test(run_dir, used, gpu, log_path, stops, curves, observer, line)
            if line is not None:
                line.close()
            if stops.observer_stop:
                record["stopped_by"] = "observer"  # a sweep's pruner: the sweep records the trial as pruned
            return _finish(run_dir, record, status, returncode, losses, curves, argv)
        finally:
            curves.close()
            if line is not None:
                line.close()


def _check_weights(weights, net):
    """--weights that share no layer with the net would leave it at its random fillers: Caffe skips
    every layer it does not find by name, saying so only at INFO level. A partial match is said."""
    stored = runs.layers_with_weights(weights)
    learned = [layer.name for layer in net.layer if layer.type not in runs.DATA_LAYER_TYPES
               and layer.type in LAYERS_WITH_WEIGHTS]
    copied = [name for name in learned if name in stored]
    if not copied:
        raise runs.RunError("--weights %s shares no layer name with the net (its layers: %s; the net's: %s): training "
                            "would start from random weights" % (weights, ", ".join(sorted(stored)[:5]) or "none",
                                                                  ", ".join(learned[:5])))
    if len(copied) < len(learned):
        print("[train] note: --weights %s initialises %d of the net's %d layers with weights; the others (%s) start "
              "from their fillers" % (weights, len(copied), len(learned),
                                      ", ".join(n for n in learned if n not in stored)), file=sys.stderr)


LAYERS_WITH_WEIGHTS = ("Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale", "PReLU", "Bias",
                       "Embed", "LSTM", "RNN")


def _unwritable(exc, run_dir):
    """An OSError writing the run directory as the one-line RunError that names the path."""
    return runs.RunError("%s: cannot write the run directory (%s)" % (exc.filename or run_dir, exc.strerror or exc))


def _anneal_settings(args):
    if args.anneal != "plateau":
        return {"mode": args.anneal}
    return {"mode": "plateau", "patience": args.patience, "min_delta": args.min_delta,
            "max_anneals": args.max_anneals}


def _binary_command(solver_file, gpu, state, weights):
    # SIGINT "stop": Caffe leaves its loop and, snapshot_after_train being on, snapshots before it
    # exits ("snapshot" would snapshot and train on). SIGHUP "snapshot": a checkpoint, training goes on.
    cmd = [caffe_env.caffe_binary(), "train", "-solver", solver_file,
           "-sigint_effect", "stop", "-sighup_effect", "snapshot"]
    if gpu:
        cmd += ["-gpu", gpu]
    if state:
        cmd += ["-snapshot", state]
    elif weights:
        cmd += ["-weights", weights]
    return cmd


def _worker_command(run_dir, gpu, state, weights, record):
    # The worker reads the run's solver.prototxt and continues the data stream of a state itself.
    anneal = record.get("anneal") or {"mode": "step"}
    cmd = [sys.executable, "-m", "tinycaffe.train", "--worker", run_dir, "--anneal", anneal["mode"]]
    if anneal["mode"] == "plateau":
        cmd += ["--patience", str(anneal["patience"]), "--min-delta", str(anneal["min_delta"]),
                "--max-anneals", str(anneal["max_anneals"]), "--anneals-done", str(len(record["anneals"]))]
    if gpu:
        cmd += ["--gpu", gpu]
    if state:
        cmd += ["--state", state]
    elif weights:
        cmd += ["--weights", weights]
    return cmd


def _final_test(run_dir, used, gpu, log_path, stops, curves=None, observer=None, line=None):
    """Caffe's binary tests only at multiples of test_interval: when max_iter is not one, test
    the final snapshot once more (the pycaffe worker, --test-only), so that every finished run
    ends with a val number at its last iteration. -> (status, returncode)."""
    last = runs.newest_snapshot_iteration(run_dir)
    _, tests = caffelog.parse(log_path, runs.accuracy_aliases(run_dir))
    if not used.test_iter or not last or (tests and tests[-1]["NumIters"] >= last):
        return "finished", 0
    state = runs.newest_solverstate(run_dir)
    command = [sys.executable, "-m", "tinycaffe.train", "--worker", run_dir, "--test-only", "--state", state]
    if gpu:  # one GPU is enough to test
        command += ["--gpu", "0" if gpu == "all" else gpu.split(",")[0]]
    status, returncode, _ = _tee(command, log_path, None, run_dir, stops, curves, observer, line)
    return status, returncode


def _child_env():
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0", PYTHONUNBUFFERED="1")
    env.setdefault("OPENBLAS_NUM_THREADS", OPENBLAS_THREADS)
    env.setdefault("OMP_NUM_THREADS", OPENBLAS_THREADS)
    return env


def _child_setup(parent=None):
    """preexec_fn for the child: stop signals ignored until it installs its own, and death with
    its parent (checked once more after the prctl: a parent that died before it is seen)."""
    parent = parent or os.getpid()

    def setup():
        _ignore_stop_signals()
        if os.getppid() != parent:  # the parent died between the fork and the prctl
            os._exit(1)
    return setup


def _ignore_stop_signals():
    """In the child, before exec: SIGINT and SIGTERM ignored until the child installs its own
    handlers (an ignored signal stays ignored across exec, and Python then installs no
    KeyboardInterrupt handler): the caffe binary's SignalHandler (SIGTERM through patch 0009)
    and the pycaffe worker's stop flag. A signal that came earlier is sent again by the
    parent with every log line until the child stops (StopSignals.forward)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """Linux: SIGKILL this (child) process when the process that started it dies, however it dies
    (kill -9, OOM, a Slurm time limit's final SIGKILL): no Caffe trains on without its run's owner,
    unseen, holding a GPU. Elsewhere a no-op."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class StopSignals:
    """Ctrl-C and SIGTERM while a run is in flight (Slurm's time limit and scancel, docker stop,
    systemd, preemption): recorded, and forwarded to the child as SIGINT, which makes it snapshot
    and stop (Caffe's -sigint_effect stop; the pycaffe worker's flag). The child may get the
    signal itself as well (Ctrl-C reaches the whole foreground group): it acts once. This parent
    is never killed by them before run.json and the outputs are written."""

    def __init__(self):
        self.received, self.child, self.previous, self.observer_stop = [], None, {}, False

    @property
    def stopping(self):
        return bool(self.received) or self.observer_stop

    def stop_child(self):
        """Stop the child as a signal would, without one having come (the run's observer asked)."""
        self.observer_stop = True
        self.forward()

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _on_signal(self, signum, frame):
        self.received.append(signum)
        self.forward()

    def attach(self, proc):
        """The child now running; a signal that came while it started is forwarded now."""
        self.child = proc
        self.forward()

    def forward(self):
        """Once a signal came: SIGINT to the child while it runs (it may still ignore it)."""
        if self.stopping and self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGINT)


class Losses:
    """What the logged loss lines said: the first bad iteration and the last good one."""

    def __init__(self):
        self.first_bad = self.last_good = None
        self.bad_value = None  # the logged loss at first_bad
        self.write_error = None  # an OSError writing caffe.log (a full or read-only disk) stopped the run


def _tee(command, log_path, record, run_dir, stops, curves=None, observer=None, line_out=None):
    """Run the child, copy its log to log_path and to the terminal, or to the one progress line
    line_out when given (and its numbers to the live curves), watch for divergence and anneals.
    -> (status, returncode, Losses)."""
    losses = Losses()
    # Line-buffered: a run killed hard (SIGKILL, OOM) keeps every line Caffe wrote.
    log = _Log(log_path, losses)
    with log:
        log.write(caffelog.glog_line("tinycaffe: %s" % " ".join(command)))
        # In the repo root: paths of runs made before tinycaffe wrote absolute ones (a solverstate's
        # learned_net among them) are relative to it; everything this side passes is absolute.
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1, env=_child_env(),
                                preexec_fn=_child_setup(), cwd=REPO_ROOT)
        stops.attach(proc)
        for line in proc.stderr:
            if not log.write(line) and proc.poll() is None:
                proc.kill()  # nothing it logs or snapshots can be kept now
            if line_out is None:
                sys.stderr.write(line)
            else:
                line_out.feed(line)
            stops.forward()
            if curves is not None:
                curves.feed(line)
            if observer is not None and not stops.stopping and observer(line):
                log.write(caffelog.glog_line("tinycaffe: stopped by its observer (a sweep's pruner)"))
                stops.stop_child()  # as Ctrl-C: snapshot, then stop
            logged = _logged_loss(line)
            if logged is not None and losses.first_bad is None:
                iteration, good = logged
                if good:
                    losses.last_good = iteration
                else:
                    losses.first_bad, losses.bad_value = iteration, line.strip().rsplit(" ", 1)[-1]
                    log.write(caffelog.glog_line("tinycaffe: loss diverged at iteration %d (%s); training stopped"
                                                 % (iteration, line.strip()[-40:]), "E"))
                    proc.kill()  # SIGKILL: no snapshot of NaN weights
            if record is not None and "tinycaffe: plateau anneal" in line:
                record["anneals"].append(line.split("] ", 1)[-1].strip())
                try:
                    runs.save_record(run_dir, record)
                except OSError as exc:
                    log.failed(exc)
        returncode = proc.wait()
    if losses.write_error is not None:
        return "failed", returncode, losses
    if losses.first_bad is not None or returncode == 3:
        return "diverged", returncode, losses
    if stops.received or returncode in (130, -signal.SIGINT):
        return "interrupted", returncode, losses
    return ("finished" if returncode == 0 else "failed"), returncode, losses


class _Log:
    """caffe.log, appended to line by line. A write that fails (disk full, read-only) is kept in
    losses.write_error and ends the run, never the process with a traceback."""

    def __init__(self, path, losses):
        self.path, self.losses, self.file = path, losses, None

    def __enter__(self):
        try:
            self.file = open(self.path, "a", buffering=1)
        except OSError as exc:
            self.failed(exc)
        return self

    def write(self, text):
        """-> False once the log can no longer be written."""
        if self.file is None:
            return False
        try:
            self.file.write(text)
            return True
        except OSError as exc:
            self.failed(exc)
            return False

    def failed(self, exc):
        if self.losses.write_error is None:
            self.losses.write_error = "%s: %s" % (exc.filename or self.path, exc.strerror or exc)
        self.__exit__()

    def __exit__(self, *exc):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # its buffer could not be written: already recorded, or the run ends anyway
            self.file = None
        return False


LOSS_LINE = re.compile(r"Iteration (\d+).*, loss = (\S+)")


def _logged_loss(line):
    """(iteration, good?) for a loss line Caffe logs every `display` iterations; good is False
    for a NaN or infinite loss, or one at the softmax's underflow cap. None for other lines."""
    m = LOSS_LINE.search(line)
    if not m:
        return None
    value = caffelog.parse_float(m.group(2))
    return int(m.group(1)), math.isfinite(value) and value < DIVERGED_LOSS


def _finish(run_dir, record, status, returncode, losses, curves=None, argv=None):
    """The run's outputs (CSVs, curves.png, run.json) and its last words on the terminal. A run
    whose final weights or val outputs are not finite ends "diverged", whatever Caffe said."""
    log_path = os.path.join(run_dir, "caffe.log")
    aliases = runs.accuracy_aliases(run_dir)
    train, test = caffelog.parse(log_path, aliases)
    if status in ("finished", "interrupted"):
        late = _late_divergence(run_dir, test)
        if late is not None:
            status, losses.first_bad, losses.last_good = "diverged", late, None
    kept = None
    if status == "failed":  # a snapshot being written when Caffe died (a full disk) would break --resume
        _drop_partial_snapshots(run_dir, log_path)
    if status == "diverged":
        kept = _drop_bad_snapshots(run_dir, losses, log_path)
        if curves is not None and losses.first_bad is not None:
            curves.event("diverged", losses.first_bad, "diverged at iteration %d%s" % (
                losses.first_bad, " (loss %s)" % losses.bad_value if losses.bad_value else ""))
    final = _final_numbers(run_dir, train, test, status, losses, kept)
    recovered = [r["NumIters"] for r in test if _non_finite(r)
                 and r["NumIters"] < (losses.first_bad if losses.first_bad is not None else math.inf)]
    if recovered:  # a BatchNorm net tested before its first step: Caffe's 1.0 there is no accuracy
        final["warnings"] = ["val tests at iteration(s) %s gave NaN or inf outputs (Caffe counts a NaN score as "
                             "right: their accuracy is no number to read); the run came back from them"
                             % ", ".join(map(str, recovered))]
    if losses.write_error:
        final["error"] = losses.write_error
    events = ([{"NumIters": losses.first_bad, "loss": caffelog.parse_float(losses.bad_value or "nan"),
                "event": "diverged"}] if status == "diverged" and losses.first_bad is not None else [])
    try:
        caffelog.write_rows(train, test, run_dir, title="%s (%s)" % (record["variant"], run_dir), events=events)
    except OSError as exc:  # a full disk: run.json below matters more than the CSVs and the plot
        final.setdefault("error", "%s: %s" % (exc.filename or run_dir, exc.strerror or exc))
        status = "failed"
    exit_code = {"finished": 0, "interrupted": 130, "diverged": 3}.get(status, 1)  # Caffe's own: caffe_exit_code
    record.update(status=status, ended=runs.now(), final=final, exit_code=exit_code, caffe_exit_code=returncode)
    if curves is not None:
        curves.close()  # before the last words: a writer that failed says so now, not after them
    saved = _save_record_last(run_dir, record)
    _report(run_dir, record, status, final, losses, kept, argv, saved)
    return exit_code


def _late_divergence(run_dir, test):
    """The iteration where a run that logged no bad loss went non-finite, or None: its final val
    test with a NaN/inf output (Caffe's Accuracy counts a NaN score as right: 100 %), or final
    weights that are not finite (they went bad after the last logged loss line). An earlier
    NaN test the run recovered from (a BatchNorm net's test before its first step, with
    statistics still zero) is no divergence."""
    bad = _non_finite
    trailing = []  # the tests from the last finite one on: the run never came back from the first of them
    for row in reversed(test):
        if not bad(row):
            break
        trailing.append(row["NumIters"])
    if trailing:
        return trailing[-1]
    newest = runs.newest_snapshot_iteration(run_dir)
    models = glob.glob(os.path.join(glob.escape(run_dir), "snapshots", "*_iter_%d.caffemodel" % newest))
    if models and not runs.finite_weights(models[0]):
        return newest
    return None


def _non_finite(row):
    """A log row (caffelog.parse) with a NaN or infinite output."""
    return any(isinstance(v, float) and not math.isfinite(v) for k, v in row.items()
               if k not in ("NumIters", "Seconds", "LearningRate"))


def _drop_bad_snapshots(run_dir, losses, log_path):
    """Delete the snapshots that may hold diverged weights; -> the newest one kept, or None.
    Kept: up to the last good loss line of this invocation; a run that diverged at its first
    line after a resume (or at a test) keeps what came before that iteration."""
    first_bad = losses.first_bad
    bound = losses.last_good if losses.last_good is not None else (first_bad - 1 if first_bad is not None else None)
    removed, kept = runs.drop_diverged_snapshots(run_dir, bound)
    _log_removed(log_path, removed, "with diverged weights")
    return kept


def _drop_partial_snapshots(run_dir, log_path):
    """Delete the newest snapshot pairs that were not written whole; say so in the log."""
    _log_removed(log_path, runs.drop_partial_snapshots(run_dir), "written incompletely")


def _log_removed(log_path, removed, why):
    """A warning line in caffe.log naming the snapshot files removed, if any."""
    if not removed:
        return
    try:
        with open(log_path, "a") as log:
            log.write(caffelog.glog_line("tinycaffe: removed %d snapshot file(s) %s: %s"
                                         % (len(removed), why, ", ".join(os.path.basename(p) for p in removed)), "W"))
    except OSError:
        pass  # a full disk: the removal itself is what matters


def _final_numbers(run_dir, train, test, status, losses, kept):
    """run.json's `final`: the true last iteration (the final snapshot's, else the log's), the last
    val test and the best of each accuracy; a diverged run's numbers stop before it diverged."""
    final = {"iterations": max([r["NumIters"] for r in train + test] + [runs.newest_snapshot_iteration(run_dir)])}
    if status == "diverged":
        first_bad = losses.first_bad
        final["iterations"] = max([r["NumIters"] for r in train + test] + [first_bad or 0])
        final["first_bad_iteration"] = first_bad
        final["last_good_snapshot"] = kept
        if first_bad is not None:
            test = [r for r in test if r["NumIters"] < first_bad]
    if test:
        last = test[-1]
        final.update({k: v for k, v in last.items() if k not in ("NumIters", "Seconds", "LearningRate")})
        final["tested_at"] = last["NumIters"]
        for key in ("accuracy_top1", "accuracy_top5"):
            values = [r[key] for r in test if key in r and math.isfinite(r[key])]
            if values:
                final["best_" + key] = max(values)
    if train:
        final["wall_seconds"] = train[-1]["Seconds"]
    newest = glob.glob(os.path.join(glob.escape(run_dir), "snapshots", "*_iter_%d.caffemodel"
                                    % runs.newest_snapshot_iteration(run_dir)))
    if newest:
        final["parameters"] = runs.parameter_count(newest[0])  # of the net this run trained
    return final


def _save_record_last(run_dir, record):
    """run.json at the end of a run, in place when the atomic write finds no room for its copy (a
    full disk: the file's own blocks still hold it). -> False when it could not be written at all."""
    try:
        runs.save_record(run_dir, record)
        return True
    except OSError:
        pass
    try:
        with open(os.path.join(run_dir, "run.json"), "r+") as f:
            f.write(json.dumps(record) + "\n")
            f.truncate()
        return True
    except OSError:
        return False


def _report(run_dir, record, status, final, losses, kept, argv, saved):
    """The run's last lines on the terminal: what it reached, and what to do next."""
    verb = "diverged at iteration %d" % losses.first_bad if status == "diverged" and losses.first_bad is not None \
        else "stopped by the sweep's pruner after %d iterations" % final["iterations"] \
        if record.get("stopped_by") == "observer" and status in ("finished", "interrupted") \
        else "%s after %d iterations" % (status, final["iterations"])
    print("[train] %s%s; run dir %s (curves.png, train.csv, test.csv, run.json)"
          % (verb, ", val top-1 %.4f at iteration %d (best %.4f)"
             % (final["accuracy_top1"], final["tested_at"], final.get("best_accuracy_top1", math.nan))
             if "accuracy_top1" in final else "", run_dir), file=sys.stderr)
    if status == "diverged":
        print("[train] error: the run diverged at iteration %s (a NaN or infinite loss, output or weight, or a loss "
              ">= %.1f); check the data, lower base_lr. %s"
              % (losses.first_bad if losses.first_bad is not None else "?", DIVERGED_LOSS,
                 "Last good snapshot: %s (lower base_lr in %s, then --resume continues from it)"
                 % (kept, os.path.join(run_dir, "solver.prototxt")) if kept
                 else "No good snapshot remains: start again with a lower base_lr"), file=sys.stderr)
    if status == "interrupted" and argv and resume_command(argv, run_dir):
        print("[train] interrupted at iteration %d; continue it with: %s"
              % (final["iterations"], resume_command(argv, run_dir)), file=sys.stderr)
    for warning in final.get("warnings", []):
        print("[train] warning: " + warning, file=sys.stderr)
    if final.get("error"):
        print("[train] error: %s; run %s%s" % (final["error"], status,
                                               "" if saved else " (run.json could not be written either)"),
              file=sys.stderr)
    elif status == "failed":
        _report_failure(run_dir, record)
    elif status == "finished" and argv and argv[0] in ("train.sh", "train.py") and evaluate_command(run_dir):
        print("[train] next: %s" % evaluate_command(run_dir), file=sys.stderr)


def _report_failure(run_dir, record):
    """A failed run's last lines: where the full log is, what to check, and last, the cause in
    Caffe's own words (its failed CHECK with file and line) rather than only an exit status."""
    log_path = os.path.join(run_dir, "caffe.log")
    cause = caffelog.failure_cause(log_path)
    code = record.get("caffe_exit_code")
    # the net too: a solver's check reads its net's data but builds no layer (a bad kernel size is the net's)
    files = [_from_cwd(os.path.join(run_dir, name)) for name in ("train_val.prototxt", "deploy.prototxt", "solver.prototxt")
             if os.path.isfile(os.path.join(run_dir, name))]
    print("[train] full log: %s; check the net, solver and data with: %s" % (
        _from_cwd(log_path), _tool_command("gen_prototxt.py", "--check", *files)), file=sys.stderr)
    status = ("killed by signal %d" % -code) if isinstance(code, int) and code < 0 else "exit status %s" % code
    print("[train] error: Caffe stopped (%s): %s%s" % (status, cause or "it logged no reason; see the full log",
                                                       _write_hint(cause, run_dir)), file=sys.stderr)


# Caffe's words when writing a snapshot failed (io.cpp's WriteProtoToBinaryFile, the HDF5 writer).
SNAPSHOT_WRITE_FAILED = ("SerializeToOstream", "Check failed: output", "H5Fcreate", "Couldn't open")


def _write_hint(cause, run_dir):
    """What a failed snapshot write means, with the run dir's free space: a full disk reads as a
    failed CHECK in io.cpp, which says nothing of disks."""
    if not cause or not any(words in cause for words in SNAPSHOT_WRITE_FAILED):
        return ""
    try:
        free = shutil.disk_usage(run_dir).free / 2 ** 20
    except OSError:
        return "; writing a snapshot into %s failed" % run_dir
    return ("; writing a snapshot into %s failed (%.0f MiB free there: disk full or read-only?)"
            % (os.path.join(run_dir, "snapshots"), free))


def _tool_command(tool, *args):
    """A copyable command line for one of the repo's tools/ with the venv's python."""
    front = [_from_cwd(sys.executable), _from_cwd(os.path.join(REPO_ROOT, "tools", tool))]
    return " ".join(shlex.quote(part) for part in front + list(args))


def evaluate_command(run_dir):
    """The evaluate.py line for a run's newest weights on the val LMDB its net tests on, or None
    (no deploy net, no snapshot, or no TEST-phase LMDB in its net)."""
    deploy = os.path.join(run_dir, "deploy.prototxt")
    model = runs.final_model(run_dir)  # the moving average where the run tested that
    val = runs.test_lmdb(run_dir)
    if not (os.path.isfile(deploy) and model and val):
        return None
    return _tool_command("evaluate.py", "--deploy", _from_cwd(deploy), "--weights", _from_cwd(model),
                         "--lmdb", _from_cwd(val))


# Flags of a run that a resume does not take again (it continues the run dir's own).
# The overrides are in the run's own solver and net by then.
_NOT_RESUMED = {"--run-dir": 1, "--runs-root": 1, "--weights": 1, "--resume": 0,
                "--max-iter": 1, "--test-interval": 1, "--batch-size": 1}


def resume_command(argv, run_dir):
    """The command line that continues this run: the same tool, target and flags, with
    --resume --run-dir RUN_DIR instead of the flags that started it; None for a run that another
    tool started (a sweep resumes its own trials)."""
    tool, args = argv[0], list(argv[1:])
    if tool not in ("train.sh", "train.py"):
        return None
    kept, skip = [], 0
    for arg in args:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _NOT_RESUMED:
            skip = _NOT_RESUMED[name] if "=" not in arg else 0
            continue
        kept.append(arg)
    front = {"train.sh": [_from_cwd(os.path.join(REPO_ROOT, "scripts", "train.sh"))],
             "train.py": [_from_cwd(sys.executable), _from_cwd(os.path.join(REPO_ROOT, "tools", "train.py"))]}
    command = front[tool] + kept + ["--resume", "--run-dir", run_dir]
    return " ".join(shlex.quote(part) for part in command)


def _from_cwd(path):
    """path as the user would type it here: relative when it lies below the current directory
    (with ./ where it has no folder, or the shell would look it up in $PATH)."""
    rel = os.path.relpath(path)
    if rel.startswith(".."):
        return path
    return rel if os.sep in rel else "./" + rel


# ---------------------------------------------------------------- the pycaffe worker (child process)
def _log(message, level="I"):
    sys.stderr.write(caffelog.glog_line(message, level))
    sys.stderr.flush()


class Worker:
    """A pycaffe training loop: Caffe's solver does the steps; testing and the LR are ours."""

    def __init__(self, run_dir, anneal, patience, min_delta, max_anneals, anneals_done, gpu):
        import caffe
        self.caffe = caffe
        if gpu:
            caffe.set_device(int(gpu))
            caffe.set_mode_gpu()
        else:
            caffe.set_mode_cpu()
        self.run_dir = run_dir
        self.aliases = runs.accuracy_aliases(run_dir)  # its Accuracy outputs as accuracy_top1/top5
        self.param = runs.with_absolute_paths(
            runs.read_message(os.path.join(run_dir, "solver.prototxt"), caffe_pb2().SolverParameter()))
        self.anneal, self.patience, self.min_delta = anneal, patience, min_delta
        self.max_anneals, self.anneals = max_anneals, anneals_done
        self.lr = self.param.base_lr * ANNEAL_FACTOR ** anneals_done
        self.best, self.waits, self.last_test, self.tested_at = -1.0, 0, {}, None
        self.solver = None
        self.stop_signal = None  # SIGINT (Ctrl-C) or SIGTERM, acted on after the current step
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)

    def _request_stop(self, signum, frame):
        # A flag, not an exception: Ctrl-C reaches this process and the parent forwards SIGINT
        # too, and a second signal must not cut the snapshot of the first short.
        self.stop_signal = signum

    def _build(self, state=None, weights=None):
        """A solver from the run's parameters, testing off (we test), the LR ours in plateau mode;
        restored from state with the TRAIN data continuing where that state left it."""
        p = caffe_pb2().SolverParameter()
        p.CopyFrom(self.param)
        if state:
            segments = runs.load_record(self.run_dir)["data_segments"]  # written by the parent first
            p.net = runs.read_message(runs.continue_data_stream(self.run_dir, self.param, state, segments),
                                      caffe_pb2().SolverParameter()).net
        # Caffe insists on test_interval > 0 when there is a test net: one it never reaches.
        p.test_interval = p.max_iter + 1
        p.test_initialization = False
        if self.anneal == "plateau":
            p.lr_policy = "fixed"
            p.base_lr = self.lr
        path = os.path.join(self.run_dir, ".pycaffe_solver.prototxt")
        write_text(path, "# derived by tools/train.py for its pycaffe loop; see solver.prototxt\n"
                        + str(p))
        self.solver = self.caffe.get_solver(path)
        if state:
            self.solver.restore(state)
        elif weights:
            self.solver.net.copy_from(weights)

    def current_lr(self):
        """The rate Caffe's solver uses at this iteration (for the progress line; Caffe logs its own)."""
        return scheduled_lr(self.param, self.solver.iter, self.lr if self.anneal == "plateau" else None)

    def test(self):
        # test_ema (patch 0015): the weights' moving average is tested, as Caffe's TestAll does
        ema = getattr(self.param, "test_ema", False) and getattr(self.solver, "has_ema", False)
        if ema:
            self.solver.swap_ema()
        try:
            sums = self._forward_test_net()
        finally:
            if ema:
                self.solver.swap_ema()
        logged = {k: v / self.param.test_iter[0] for k, v in sums.items()}
        return self._log_test(logged)

    def _forward_test_net(self):
        """{output: sum over test_iter batches} of the test net on the train net's weights."""
        net = self.solver.test_nets[0]
        net.share_with(self.solver.net)  # what Caffe's Solver::Test does first
        sums = {}
        for _ in range(self.param.test_iter[0]):
            out = net.forward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return sums

    def _log_test(self, logged):
        _log("Iteration %d, Testing net (#0)" % self.solver.iter)
        for i, (k, v) in enumerate(logged.items()):  # the net's own names, as Caffe's Solver logs them
            _log("    Test net output #%d: %s = %g" % (i, k, v))
        results = {self.aliases.get(k, k): v for k, v in logged.items()}
        self.last_test, self.tested_at = results, self.solver.iter
        return results

    def plateau(self, top1):
        """True when the run should stop; anneals the LR when val top-1 stalls."""
        action, self.best, self.waits = plateau_step(top1, self.best, self.waits, self.min_delta, self.patience,
                                                     self.anneals, self.max_anneals)
        if action == "stop":
            _log("tinycaffe: plateau after %d anneals: stopping at iteration %d" % (self.anneals, self.solver.iter))
            return True
        if action == "anneal":
            old = self.lr
            self.lr *= ANNEAL_FACTOR
            self.anneals += 1
            self.solver.snapshot()
            state = runs.newest_solverstate(self.run_dir)
            self._build(state=state)
            _log("tinycaffe: plateau anneal %d at iteration %d: lr %g -> %g (val top-1 %.4f, best %.4f, patience %d)"
                 % (self.anneals, self.solver.iter, old, self.lr, top1, self.best, self.patience))
        return False

    def replay_plateau(self, iteration):
        """A resumed plateau run's best, waits and anneals as they stood at `iteration`: the val
        top-1 of every test up to it (caffe.log) through the same rule, so that it anneals where
        the uninterrupted run would."""
        _, tests = caffelog.parse(os.path.join(self.run_dir, "caffe.log"), self.aliases)
        self.best, self.waits, self.anneals = -1.0, 0, 0
        for row in tests:
            if row["NumIters"] <= iteration and "accuracy_top1" in row:
                action, self.best, self.waits = plateau_step(row["accuracy_top1"], self.best, self.waits,
                                                             self.min_delta, self.patience, self.anneals,
                                                             self.max_anneals)
                self.anneals += action == "anneal"
        self.lr = self.param.base_lr * ANNEAL_FACTOR ** self.anneals

    def run(self, state=None, weights=None):
        if state and self.anneal == "plateau":
            self.replay_plateau(runs.snapshot_iteration(state))
        self._build(state, weights)
        p, s = self.param, self.solver
        chunk = p.display or 20
        batch = s.net.blobs["data"].data.shape[0]
        t0, it0 = time.time(), s.iter
        _log("tinycaffe: pycaffe loop from iteration %d to %d, anneal %s" % (s.iter, p.max_iter, self.anneal))
        if state and p.test_interval and s.iter and s.iter % p.test_interval == 0 and s.iter < p.max_iter:
            self.test()  # as Caffe's Step does on resuming at a test iteration: the log's numbers from here on are this run's
        while self.solver.iter < p.max_iter and not self.stop_signal:
            s = self.solver
            nxt = min(p.max_iter, (s.iter // chunk + 1) * chunk)
            if p.test_interval:
                nxt = min(nxt, (s.iter // p.test_interval + 1) * p.test_interval)
            s.step(nxt - s.iter)
            loss = float(s.net.blobs["loss"].data)
            if not math.isfinite(loss) or loss >= DIVERGED_LOSS:
                _log("Iteration %d, loss = %g" % (s.iter, loss))
                _log("tinycaffe: loss diverged at iteration %d; no snapshot of these weights" % s.iter, "E")
                return 3
            if self.stop_signal:
                break
            rate = (s.iter - it0) * batch / max(time.time() - t0, 1e-9)
            eta = (p.max_iter - s.iter) * batch / max(rate, 1e-9)
            if p.test_interval and s.iter % p.test_interval == 0:
                results = self.test()
                if self.anneal == "plateau" and self.plateau(results.get("accuracy_top1", 0.0)):
                    break
            top = self.last_test
            _log("tinycaffe: iter %d/%d | %.0f img/s | ETA %s | loss %.4f | lr %g%s"
                 % (s.iter, p.max_iter, rate, time.strftime("%H:%M:%S", time.gmtime(eta)), loss,
                    self.current_lr(), " | val top-1 %.4f top-5 %.4f" % (top.get("accuracy_top1", math.nan),
                                                                       top.get("accuracy_top5", math.nan))
                    if top else ""))
        if self.stop_signal:  # Ctrl-C, SIGTERM, or SIGTERM that the parent turned into SIGINT
            self.solver.snapshot()
            _log("tinycaffe: interrupted (%s) at iteration %d; snapshot written"
                 % (signal.Signals(self.stop_signal).name, self.solver.iter), "W")
            return 130
        if self.param.test_iter and self.tested_at != self.solver.iter:
            self.test()  # every run ends with a val number at its last iteration
        if not p.snapshot or self.solver.iter % p.snapshot:
            self.solver.snapshot()
        _log("Optimization Done.")
        return 0

    def test_only(self, state):
        """Restore state and test once (the binary engine's final test)."""
        self._build(state)
        self.test()
        return 0


def scheduled_lr(p, it, plateau_lr=None):
    """SGDSolver::GetLearningRate for the policies tinycaffe generates (patch 0013's warmup and
    cosine included); plateau_lr: the pycaffe loop's own (its solver runs "fixed")."""
    rate = p.base_lr if plateau_lr is None else plateau_lr
    warmup = getattr(p, "warmup_iter", 0)
    if plateau_lr is None and p.lr_policy == "step":
        rate = p.base_lr * p.gamma ** (it // p.stepsize)
    elif plateau_lr is None and p.lr_policy == "multistep":  # one more gamma for every stepvalue reached
        rate = p.base_lr * p.gamma ** sum(1 for v in p.stepvalue if it >= v)
    elif plateau_lr is None and p.lr_policy == "cosine":
        t = min(max(it - warmup, 0) / float(p.max_iter - warmup), 1.0)
        rate = p.min_lr + (p.base_lr - p.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    if it < warmup:
        rate *= p.warmup_start_factor + (1 - p.warmup_start_factor) * it / float(warmup)
    return rate


def plateau_step(top1, best, waits, min_delta, patience, anneals, max_anneals):
    """One test result through the plateau rule -> (action, best, waits); action is "improved",
    "wait", "anneal" (divide the LR) or "stop" (a plateau after max_anneals anneals)."""
    if top1 > best + min_delta:
        return "improved", top1, 0
    waits += 1
    if waits < patience:
        return "wait", best, waits
    return ("stop", best, waits) if anneals >= max_anneals else ("anneal", best, 0)


def worker_main(argv):
    import argparse
    p = argparse.ArgumentParser(prog="python -m tinycaffe.train --worker")
    p.add_argument("--worker", required=True)
    p.add_argument("--anneal", default="step")
    p.add_argument("--patience", type=int, default=DEFAULT_PATIENCE)
    p.add_argument("--min-delta", type=float, default=DEFAULT_MIN_DELTA)
    p.add_argument("--max-anneals", type=int, default=DEFAULT_MAX_ANNEALS)
    p.add_argument("--anneals-done", type=int, default=0)
    p.add_argument("--gpu", default=None)
    p.add_argument("--state", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--test-only", action="store_true")
    a = p.parse_args(argv)
    worker = Worker(a.worker, a.anneal, a.patience, a.min_delta, a.max_anneals, a.anneals_done, a.gpu)
    if a.test_only:
        return worker.test_only(a.state)
    return worker.run(a.state, a.weights)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
