"""Training runs: the real `caffe train` (scripts/train.sh) or a pycaffe loop (tools/train.py)
that adds plateau annealing, both into the same run directory layout (see runs.py).

The Caffe process (binary or pycaffe worker) runs as a child whose log this
process tees into run_dir/caffe.log and the terminal; it watches the loss, and at
the end writes train.csv, test.csv, curves.png and the final numbers into run.json.
"""
import math
import os
import signal
import subprocess
import sys
import time

from . import caffelog, caffe_env, runs
from .caffe_env import caffe_pb2
from .files import write_text

# ---------------------------------------------------------------- defaults
DEFAULT_PATIENCE = 3  # test evaluations without improvement before the LR is divided by 10
DEFAULT_MIN_DELTA = 0.002  # val top-1 gain that counts as an improvement
DEFAULT_MAX_ANNEALS = 3  # after this many anneals, the next plateau ends the run
ANNEAL_FACTOR = 0.1  # the paper's manual cuts were /10
DIVERGED_LOSS = 87.3  # SoftmaxWithLoss caps at -log(FLT_MIN) = 87.34: the softmax underflowed
# OpenBLAS threads for CPU training: one per core. On this 2-core machine 2 threads trained
# 1.25-1.4x faster than 1 (bench/bench_train.py); a value set in the environment wins.
OPENBLAS_THREADS = str(os.cpu_count() or 1)


def launch(args, argv):
    """The whole run from the parent's side. Returns the process exit status."""
    variant, solver_path = runs.resolve_solver(args.target)
    gpu = runs.parse_gpu(args.gpu)
    if gpu and ("," in gpu or gpu == "all"):
        if args.engine == "pycaffe":
            raise runs.RunError("--gpu %s: several GPUs need Caffe's NCCL path: use scripts/train.sh" % gpu)
        if not caffe_env.import_caffe().has_nccl():
            raise runs.RunError("--gpu %s: this Caffe build has no NCCL (built with USE_NCCL=OFF), so it can "
                                "train on one GPU only; pass a single id" % gpu)
    if args.weights and not os.path.isfile(args.weights):
        raise runs.RunError("--weights %s: no such file" % args.weights)
    state = None
    if args.resume:
        run_dir = args.run_dir or runs.newest_run_dir(variant, args.runs_root)
        record = runs.load_record(run_dir)
        if (record.get("anneal") or {}).get("mode") == "plateau" and args.engine != "pycaffe":
            raise runs.RunError("%s anneals on plateaus (its LR is not the solver's schedule): resume it with "
                                "tools/train.py --resume" % run_dir)
        state = runs.newest_solverstate(run_dir)
        used = runs.read_message(os.path.join(run_dir, "solver.prototxt"), caffe_pb2().SolverParameter())
        runs.precheck(used, os.path.join(run_dir, "solver.prototxt"))
        runs.set_device(run_dir, used, gpu)  # a run may continue on another device
        record["resumes"].append({"at": runs.now(), "from": state, "command": argv})
        record["status"] = "running"
    else:
        solver = runs.read_message(solver_path, caffe_pb2().SolverParameter())
        net_path, net = runs.precheck(solver, solver_path)
        run_dir = args.run_dir or runs.new_run_dir(variant, args.runs_root)
        if os.path.exists(run_dir) and os.listdir(run_dir):
            raise runs.RunError("--run-dir %s exists and is not empty (use --resume to continue it)" % run_dir)
        used = runs.prepare(variant, solver_path, solver, net_path, run_dir, gpu)
        record = runs.start_record(variant, argv, used, gpu, args.engine,
                                   _anneal_settings(args), net)
    runs.save_record(run_dir, record)
    print("[train] run dir %s (%s, %s)" % (run_dir, args.engine, "gpu " + gpu if gpu else "cpu"), file=sys.stderr)

    command = (_binary_command(run_dir, gpu, state, args.weights) if args.engine == "binary"
               else _worker_command(run_dir, gpu, state, args.weights, record))
    status, returncode = _tee(command, os.path.join(run_dir, "caffe.log"), record, run_dir)
    return _finish(run_dir, record, status, returncode)


def _anneal_settings(args):
    if args.anneal != "plateau":
        return {"mode": args.anneal}
    return {"mode": "plateau", "patience": args.patience, "min_delta": args.min_delta,
            "max_anneals": args.max_anneals}


def _binary_command(run_dir, gpu, state, weights):
    # SIGINT "stop": Caffe leaves its loop and, snapshot_after_train being on, snapshots before it
    # exits ("snapshot" would snapshot and train on). SIGHUP "snapshot": a checkpoint, training goes on.
    cmd = [caffe_env.caffe_binary(), "train", "-solver", os.path.join(run_dir, "solver.prototxt"),
           "-sigint_effect", "stop", "-sighup_effect", "snapshot"]
    if gpu:
        cmd += ["-gpu", gpu]
    if state:
        cmd += ["-snapshot", state]
    elif weights:
        cmd += ["-weights", weights]
    return cmd


def _worker_command(run_dir, gpu, state, weights, record):
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


def _child_env():
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0", PYTHONUNBUFFERED="1")
    env.setdefault("OPENBLAS_NUM_THREADS", OPENBLAS_THREADS)
    return env


def _tee(command, log_path, record, run_dir):
    """Run the child, copy its log to log_path and the terminal, watch for divergence and anneals."""
    interrupted = []

    def on_sigint(signum, frame):
        # Ctrl-C reaches the whole foreground group: the child snapshots and exits by itself.
        # Here it only marks the run, so that no KeyboardInterrupt can cut the tee short.
        interrupted.append(True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    diverged = False
    try:
        # Line-buffered: a run killed hard (SIGKILL, OOM) keeps every line Caffe wrote.
        with open(log_path, "a", buffering=1) as log:
            log.write(caffelog.glog_line("tinycaffe: %s" % " ".join(command)))
            proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1, env=_child_env())
            for line in proc.stderr:
                log.write(line)
                sys.stderr.write(line)
                if not diverged and _diverged(line):
                    diverged = True
                    log.write(caffelog.glog_line("tinycaffe: loss diverged (%s); stopped without a snapshot of the "
                                                 "bad weights; the last good snapshot is kept"
                                                 % line.strip()[-40:], "E"))
                    proc.kill()  # SIGKILL: no snapshot of NaN weights
                if "tinycaffe: plateau anneal" in line:
                    record["anneals"].append(line.split("] ", 1)[-1].strip())
                    runs.save_record(run_dir, record)
            returncode = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if diverged or returncode == 3:
        return "diverged", returncode
    if interrupted or returncode in (130, -signal.SIGINT):
        return "interrupted", returncode
    return ("finished" if returncode == 0 else "failed"), returncode


def _diverged(line):
    if ", loss = " not in line or "Iteration" not in line:
        return False
    value = caffelog.parse_float(line.rsplit("loss = ", 1)[1].split()[0])
    return not math.isfinite(value) or value >= DIVERGED_LOSS


def _finish(run_dir, record, status, returncode):
    log_path = os.path.join(run_dir, "caffe.log")
    train, test = caffelog.write_outputs(log_path, run_dir, title="%s (%s)" % (record["variant"], run_dir))
    final = {"iterations": max([r["NumIters"] for r in train + test], default=0)}
    if test:
        last = test[-1]
        final.update({k: v for k, v in last.items() if k not in ("NumIters", "Seconds", "LearningRate")})
        for key in ("accuracy_top1", "accuracy_top5"):
            values = [r[key] for r in test if key in r and math.isfinite(r[key])]
            if values:
                final["best_" + key] = max(values)
    if train:
        final["wall_seconds"] = train[-1]["Seconds"]
    record.update(status=status, ended=runs.now(), final=final, exit_code=returncode)
    runs.save_record(run_dir, record)
    print("[train] %s after %d iterations%s; run dir %s (curves.png, train.csv, test.csv, run.json)"
          % (status, final["iterations"],
             ", val top-1 %.4f (best %.4f)" % (final["accuracy_top1"], final.get("best_accuracy_top1", math.nan))
             if "accuracy_top1" in final else "", run_dir), file=sys.stderr)
    if status == "diverged":
        print("[train] error: the loss diverged (NaN or >= %.1f); lower base_lr or check the data; "
              "resume from the last good snapshot with --resume" % DIVERGED_LOSS, file=sys.stderr)
    return {"finished": 0, "interrupted": 130, "diverged": 3}.get(status, returncode or 1)


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
        self.param = runs.read_message(os.path.join(run_dir, "solver.prototxt"), caffe_pb2().SolverParameter())
        self.anneal, self.patience, self.min_delta = anneal, patience, min_delta
        self.max_anneals, self.anneals = max_anneals, anneals_done
        self.lr = self.param.base_lr * ANNEAL_FACTOR ** anneals_done
        self.best, self.waits, self.last_test = -1.0, 0, {}
        self.solver = None

    def _build(self, state=None, weights=None):
        """A solver from the run's parameters, testing off (we test), the LR ours in plateau mode."""
        p = caffe_pb2().SolverParameter()
        p.CopyFrom(self.param)
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
        p = self.param
        if self.anneal == "plateau":
            return self.lr
        if p.lr_policy == "step":
            return p.base_lr * p.gamma ** (self.solver.iter // p.stepsize)
        return p.base_lr

    def test(self):
        net = self.solver.test_nets[0]
        net.share_with(self.solver.net)  # what Caffe's Solver::Test does first
        sums = {}
        for _ in range(self.param.test_iter[0]):
            out = net.forward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        results = {k: v / self.param.test_iter[0] for k, v in sums.items()}
        _log("Iteration %d, Testing net (#0)" % self.solver.iter)
        for i, (k, v) in enumerate(results.items()):
            _log("    Test net output #%d: %s = %g" % (i, k, v))
        self.last_test = results
        return results

    def plateau(self, top1):
        """True when the run should stop; anneals the LR when val top-1 stalls."""
        if top1 > self.best + self.min_delta:
            self.best, self.waits = top1, 0
            return False
        self.waits += 1
        if self.waits < self.patience:
            return False
        if self.anneals >= self.max_anneals:
            _log("tinycaffe: plateau after %d anneals: stopping at iteration %d" % (self.anneals, self.solver.iter))
            return True
        old = self.lr
        self.lr *= ANNEAL_FACTOR
        self.anneals += 1
        self.waits = 0
        self.solver.snapshot()
        state = runs.newest_solverstate(self.run_dir)
        self._build(state=state)
        _log("tinycaffe: plateau anneal %d at iteration %d: lr %g -> %g (val top-1 %.4f, best %.4f, patience %d)"
             % (self.anneals, self.solver.iter, old, self.lr, top1, self.best, self.patience))
        return False

    def run(self, state=None, weights=None):
        self._build(state, weights)
        p, s = self.param, self.solver
        chunk = p.display or 20
        batch = s.net.blobs["data"].data.shape[0]
        t0, it0 = time.time(), s.iter
        _log("tinycaffe: pycaffe loop from iteration %d to %d, anneal %s" % (s.iter, p.max_iter, self.anneal))
        try:
            while self.solver.iter < p.max_iter:
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
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the snapshot short
            self.solver.snapshot()
            _log("tinycaffe: interrupted at iteration %d; snapshot written" % self.solver.iter, "W")
            return 130
        if not p.snapshot or self.solver.iter % p.snapshot:
            self.solver.snapshot()
        _log("Optimization Done.")
        return 0


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
    a = p.parse_args(argv)
    worker = Worker(a.worker, a.anneal, a.patience, a.min_delta, a.max_anneals, a.anneals_done, a.gpu)
    return worker.run(a.state, a.weights)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
