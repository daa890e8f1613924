"""tools/sweep.py: Optuna studies whose trials are real run dirs trained by real Caffe."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_trust import mount_tmpfs  # noqa: F401 (a fixture)
from tinycaffe import sweep

TOOL = "tools/sweep.py"


def write_space(folder, lmdb, **extra):
    """tiny, 100 iterations, a test every 50; base_lr 0.02 learns, 0.0 stays at chance, and the
    threshold pruner stops any trial below 15% val top-1 at a test."""
    space = {"variants": ["tiny"], "lmdb_dir": lmdb, "budget": {"max_iter": 100, "test_interval": 50},
             "seed": 0, "params": {"base_lr": {"type": "categorical", "choices": [0.02, 0.0]},
                                   "weight_decay": {"type": "categorical", "choices": [0.0005, 0.0001]}},
             "pruner": {"threshold": {"lower": 0.15}}}
    space.update(extra)
    path = folder / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


def sweep_command(space, root, trials, *more):
    return [sys.executable, TOOL, space, "--trials", str(trials), "--pruner", "threshold", "--sampler", "grid",
            "--root", str(root), *more]


def trials_of(root, name="space"):
    study = sweep.open_study(name, sweep.make_storage(None, os.path.join(str(root), name)))
    return study.get_trials()


def logged_final_top1(run_dir):
    """The val top-1 of the run's last test: its final snapshot's, as Caffe logged it."""
    with open(os.path.join(run_dir, "test.csv")) as f:
        return float(list(csv.DictReader(f))[-1]["accuracy_top1"])


def test_two_workers_share_a_file_study(repo, lmdb_dir, tmp_path):
    space, root = write_space(tmp_path, lmdb_dir), tmp_path / "sweeps"
    first = subprocess.Popen(sweep_command(space, root, 4), cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    time.sleep(3)  # the second joins a running study
    second = subprocess.run(sweep_command(space, root, 4), cwd=repo, capture_output=True, text=True, timeout=600)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, (err[-2000:], second.stderr[-2000:])
    trials = trials_of(root)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 4 <= len(finished) <= 5 and len(finished) == len(trials)  # one more if both were mid-trial at the end
    assert len({t.user_attrs["worker"]["pid"] for t in finished}) == 2  # both workers trained trials
    # Both workers name the grid's points alike: one grid_id, one set of values (and every point run).
    points = {(t.system_attrs["grid_id"], tuple(sorted(t.params.items()))) for t in trials}
    assert len(points) == len({grid_id for grid_id, _ in points}) == 4, sorted(points)
    states = {t.state.name for t in finished}
    assert states == {"COMPLETE", "PRUNED"}, [(t.params, t.state.name, t.intermediate_values) for t in trials]
    # The terminal says which trial a progress line is of, and that the pruner stopped one.
    said = err + second.stderr
    assert "[train] trial " in said and "stopped by the sweep's pruner after" in said, said[-3000:]
    for t in finished:
        run_dir = t.user_attrs["run_dir"]
        assert run_dir == os.path.join(str(root), "space", "trial_%d" % t.number)
        for name in ("solver.prototxt", "train_val.prototxt", "caffe.log", "run.json", "train.csv", "test.csv"):
            assert os.path.isfile(os.path.join(run_dir, name)), (run_dir, name)
        record = json.load(open(os.path.join(run_dir, "run.json")))
        assert record["status"] == {"COMPLETE": "finished", "PRUNED": "pruned"}[t.state.name]
        assert os.listdir(os.path.join(run_dir, "snapshots"))  # a pruned trial stops with a snapshot too
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir))  # live curves
        # What Optuna got is what the log says: every val top-1 at its iteration (for a pruned trial,
        # up to the test that pruned it: the child may log one more before the stop reaches it).
        with open(os.path.join(run_dir, "test.csv")) as f:
            logged = {int(r["NumIters"]): float(r["accuracy_top1"]) for r in csv.DictReader(f)}
        if t.state.name == "PRUNED":
            logged = {k: v for k, v in logged.items() if k <= max(t.intermediate_values)}
        assert t.intermediate_values == pytest.approx(logged, abs=1e-6)
        if t.state.name == "COMPLETE":  # its value: the final snapshot's val top-1, the model --from-sweep submits
            assert t.value == pytest.approx(logged[100]) and record["final"]["iterations"] == 100
            assert t.params["base_lr"] == 0.02
        else:
            assert min(t.intermediate_values.values()) < 0.15 and t.params["base_lr"] == 0.0
    # The report: complete trials ranked by their final snapshot's val top-1, then the pruned ones, unranked,
    # with their reason.
    report = subprocess.run([sys.executable, TOOL, "--report", "space", "--root", str(root)], cwd=repo,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "ranked by the val top-1 of each complete trial's final snapshot" in report.stdout
    with open(root / "space" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    complete = sorted((t for t in finished if t.state.name == "COMPLETE"),
                      key=lambda t: (-logged_final_top1(t.user_attrs["run_dir"]), t.number))
    pruned = sorted((t for t in finished if t.state.name == "PRUNED"), key=lambda t: t.number)
    assert [int(r["trial"]) for r in rows] == [t.number for t in complete + pruned]
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(complete) + 1)] + [""] * len(pruned)
    assert [float(r["top1"]) for r in rows[:len(complete)]] == pytest.approx(
        [logged_final_top1(t.user_attrs["run_dir"]) for t in complete])
    assert all(r["top1"] == "" and r["status"] == "pruned" and r["reason"].startswith("pruned: val top-1")
               for r in rows[len(complete):])
    assert "| 1 | %d |" % complete[0].number in report.stdout
    for png in ("history.png", "intermediate.png"):
        assert (root / "space" / png).stat().st_size > 1000
    # The ensemble of the 2 best complete trials, their final snapshots, as the submission.
    best = sorted((t for t in finished if t.state.name == "COMPLETE"), key=lambda t: (-t.value, t.number))[:2]
    out = subprocess.run([sys.executable, "tools/make_submission.py", "--from-sweep", "space", "--top", "2",
                          "--sweeps-root", str(root), "--lmdb", os.path.join(lmdb_dir, "test_lmdb"),
                          "--val-lmdb", os.path.join(lmdb_dir, "val_lmdb"), "--gpu", "cpu",
                          "--out", str(tmp_path / "submission.txt")], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    used = [line.split()[-1] for line in out.stdout.splitlines() if line.startswith("val top-1") and "ensemble" not in line]
    assert used == [os.path.join(t.user_attrs["run_dir"], "snapshots", "tiny_iter_100.caffemodel") for t in best]
    models = [float(line.split()[2]) for line in out.stdout.splitlines() if line.startswith("val top-1") and
              "ensemble" not in line]
    finals = [json.load(open(os.path.join(t.user_attrs["run_dir"], "run.json")))["final"]["accuracy_top1"]
              for t in best]
    assert models == pytest.approx(finals, abs=1e-6)  # each final snapshot's val top-1, as Caffe tested it
    assert models == pytest.approx([float(r["top1"]) for r in rows[:2]], abs=1e-6)  # = the report's ranking numbers
    assert len((tmp_path / "submission.txt").read_text().splitlines()) == 20
    too_many = subprocess.run([sys.executable, "tools/make_submission.py", "--from-sweep", "space", "--top", "9",
                               "--sweeps-root", str(root), "--lmdb", os.path.join(lmdb_dir, "test_lmdb"),
                               "--out", str(tmp_path / "s2.txt")], cwd=repo, capture_output=True, text=True)
    assert too_many.returncode == 1 and "fewer than --top 9" in too_many.stderr


def worker_mid_trial(repo, space, root, command=None, **popen):
    """A one-worker sweep (of 2 trials, or `command`), training its first trial: as soon as Caffe
    logs an iteration (a fixed wait raced the trial's end once the CPU build got faster)."""
    worker = subprocess.Popen(command or sweep_command(space, root, 2), cwd=repo, stdout=subprocess.DEVNULL, text=True,
                              **popen)
    log, deadline = root / "space" / "trial_0" / "caffe.log", time.time() + 120
    while time.time() < deadline and not (log.is_file() and "Iteration" in log.read_text(errors="replace")):
        time.sleep(0.1)
    return worker


def children(pid):
    return [int(p) for p in subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True,
                                           text=True).stdout.split()]


def grid_points(trials):
    """{grid_id: [state, ...]} of a study's trials."""
    points = {}
    for t in trials:
        points.setdefault(t.system_attrs.get("grid_id"), []).append(t.state.name)
    return points


def test_a_killed_worker_loses_nothing_each_grid_point_runs_once(repo, lmdb_dir, tmp_path):
    """kill -9 of a worker mid-trial: its Caffe dies with it; the same command again fails the lost
    trial (run.json closed), runs its point again and the missing ones, each exactly once."""
    space = write_space(tmp_path, lmdb_dir, params={"base_lr": {"type": "categorical", "choices": [0.02, 0.01, 0.005]}},
                        pruner={})
    root = tmp_path / "sweeps"
    command = sweep_command(space, root, 3, "--pruner", "none")
    worker = worker_mid_trial(repo, space, root, stderr=subprocess.DEVNULL, command=command)
    caffe = children(worker.pid)
    assert caffe
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone: its child must not train on
    worker.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists("/proc/%d" % pid) for pid in caffe):
        time.sleep(0.1)
    assert not any(os.path.exists("/proc/%d" % pid) for pid in caffe), "Caffe outlived its worker"
    [lost] = trials_of(root)
    assert lost.state.name == "RUNNING"
    again = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "trials [0] lost their worker: marked failed, their points queued again" in again.stderr
    trials = trials_of(root)
    assert trials[0].state.name == "FAIL" and "lost: its worker (pid %d" % worker.pid in trials[0].user_attrs["reason"]
    record = json.load(open(root / "space" / "trial_0" / "run.json"))
    assert record["status"] == "failed" and "lost: its worker" in record["final"]["error"]
    points = grid_points(trials)
    assert sorted(points) == [0, 1, 2] and sorted(points.values()) == [["COMPLETE"]] * 2 + [["FAIL", "COMPLETE"]]
    retry = next(t for t in trials if t.system_attrs.get("retry_history") == [0])
    assert retry.params == trials[0].params and retry.state.name == "COMPLETE"
    report = subprocess.run([sys.executable, TOOL, "--report", "space", "--root", str(root)], cwd=repo,
                            capture_output=True, text=True)
    assert "retried as trial %d" % retry.number in report.stdout and "| fail |" in report.stdout
    # A finished study: the same command trains nothing more, never a point twice.
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and len(trials_of(root)) == len(trials), done.stderr[-2000:]


def test_a_trial_silent_past_its_heartbeats_is_lost_on_any_machine(tmp_path):
    """The file journal speaks Optuna's heartbeat protocol: a RUNNING trial of another machine (no
    pid to look at) whose last heartbeat is older than 3 beats is failed by Optuna's
    fail_stale_trials and its point queued again; a beating one is left alone."""
    from tinycaffe import sweep_recovery
    study = sweep.open_study("hb", sweep.make_storage(None, str(tmp_path / "hb"), heartbeat=1))
    silent, beating = sweep._ask(study, str(tmp_path / "hb")), sweep._ask(study, str(tmp_path / "hb"))
    for trial in (silent, beating):
        trial.suggest_categorical("base_lr", [0.02, 0.01])
        trial.set_user_attr("worker", {"host": "another-node", "pid": 1, "gpu": "cpu"})
    study._storage.set_trial_system_attr(silent._trial_id, "heartbeat", time.time() - 10)
    with sweep_recovery.heartbeat(study, beating):
        time.sleep(0.2)  # the heartbeat thread has beaten once
        assert sweep_recovery.collect_lost(study, 1) == [silent.number]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].params == trials[0].params and trials[2].system_attrs["retry_history"] == [0]
    assert "heartbeat" not in trials[2].system_attrs and "worker" not in trials[2].user_attrs
    assert trials[0].user_attrs["reason"].startswith("lost: no heartbeat")
    # A worker of this machine that is alive is never lost, however late its heartbeat.
    study._storage.set_trial_system_attr(beating._trial_id, "heartbeat", time.time() - 10)
    study._storage.set_trial_user_attr(beating._trial_id, "worker", {"host": socket.gethostname(),
                                                                     "pid": os.getpid(), "gpu": "cpu"})
    assert sweep_recovery.collect_lost(study, 1) == []
    # A trial whose worker died inside ask (no worker named, no beat), older than the grace period: lost.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asked = study.ask()  # the retry queued above comes first
    time.sleep(3.2)
    assert asked.number == 2 and sweep_recovery.collect_lost(study, 1) == [2]
    assert study.get_trials()[2].user_attrs["reason"].startswith("lost: its worker stopped before it started")


def test_sigterm_stops_the_worker_with_a_snapshot_and_status_130(repo, lmdb_dir, tmp_path):
    """Slurm's time limit or scancel: the trial snapshots, is not a result, the worker exits 130."""
    # A long trial: the signal must find it training, and nothing trains after it.
    space = write_space(tmp_path, lmdb_dir, budget={"max_iter": 5000, "test_interval": 50})
    root = tmp_path / "sweeps"
    worker = worker_mid_trial(repo, space, root, stderr=subprocess.PIPE)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 130, err[-2000:]
    assert "run the same command to continue the study" in err
    trial, retry = trials_of(root)
    assert trial.state.name == "FAIL" and trial.user_attrs["reason"].startswith("lost: stopped by a signal")
    assert retry.state.name == "WAITING" and retry.params == trial.params  # its point runs again next time
    record = json.load(open(root / "space" / "trial_0" / "run.json"))
    assert record["status"] == "interrupted" and os.listdir(root / "space" / "trial_0" / "snapshots")


def test_repeated_failures_end_the_worker(repo, lmdb_dir, tmp_path):
    """A value that always breaks training (here an LR that diverges at once) stops the worker
    after 3 failed trials in a row instead of looping; failed trials are never results."""
    space = write_space(tmp_path, lmdb_dir, params={"base_lr": {"type": "categorical", "choices": [1e6]}})
    out = subprocess.run(sweep_command(space, tmp_path / "sweeps", 2, "--pruner", "none", "--sampler", "random"),
                         cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "3 trials failed in a row: this worker stops" in out.stderr
    trials = trials_of(tmp_path / "sweeps")
    assert [t.state.name for t in trials] == ["FAIL"] * 3
    assert all(not t.intermediate_values for t in trials)  # NaN weights' "100%" val top-1 never reported
    report = subprocess.run([sys.executable, TOOL, "--report", "space", "--root", str(tmp_path / "sweeps")],
                            cwd=repo, capture_output=True, text=True)
    assert report.returncode == 0 and "100.0%" not in report.stdout and "| – |" in report.stdout


def test_a_trial_whose_weights_go_non_finite_late_fails_and_is_never_ranked(repo, lmdb_dir, tmp_path):
    """19 iterations at a huge LR: the only loss line (iteration 0) is fine, the weights are NaN by
    the end and Caffe's final test says 100 %: a FAIL, not a COMPLETE trial at 1.0."""
    space = write_space(tmp_path, lmdb_dir, budget={"max_iter": 19, "test_interval": 19},
                        params={"base_lr": {"type": "categorical", "choices": [1e6]}})
    out = subprocess.run(sweep_command(space, tmp_path / "sweeps", 1, "--pruner", "none", "--sampler", "random"),
                         cwd=repo, capture_output=True, text=True, timeout=600)
    trials = trials_of(tmp_path / "sweeps")
    assert trials and all(t.state.name == "FAIL" for t in trials), [(t.state.name, t.value) for t in trials]
    assert out.returncode == 1 and "diverged" in trials[0].user_attrs["reason"]
    submit = subprocess.run([sys.executable, "tools/make_submission.py", "--from-sweep", "space", "--top", "1",
                             "--sweeps-root", str(tmp_path / "sweeps"), "--lmdb", os.path.join(lmdb_dir, "test_lmdb"),
                             "--out", str(tmp_path / "s.txt")], cwd=repo, capture_output=True, text=True)
    assert submit.returncode == 1 and "0 complete trial(s), fewer than --top 1" in submit.stderr


def test_anything_a_trial_raises_is_a_fail_never_a_running_trial(repo, lmdb_dir, tmp_path, monkeypatch):
    """A TypeError (or any error) inside a trial: FAIL with its reason, not RUNNING until a later
    worker takes it for lost and retries the same crash."""
    space = sweep.load_space(write_space(tmp_path, lmdb_dir, budget={"max_iter": 20, "test_interval": 20}))

    def broken(*args, **kwargs):
        raise TypeError("a bug in a trial")
    monkeypatch.setattr(sweep, "run_trial", broken)
    done, status = sweep.work(space, "space", str(tmp_path / "sweeps" / "space"), 1, None, None, "none", "grid", 1)
    trials = trials_of(tmp_path / "sweeps")
    assert status == 1 and [t.state.name for t in trials] == ["FAIL"] * 3
    assert trials[0].user_attrs["reason"] == "TypeError: a bug in a trial"


def test_a_study_keeps_its_sampler_and_refuses_an_earlier_versions_study(repo, lmdb_dir, tmp_path):
    space, root = write_space(tmp_path, lmdb_dir, budget={"max_iter": 20, "test_interval": 20}), tmp_path / "sweeps"
    first = subprocess.run(sweep_command(space, root, 1), cwd=repo, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    other = subprocess.run(sweep_command(space, root, 2)[:-4] + ["--sampler", "random", "--root", str(root)],
                           cwd=repo, capture_output=True, text=True)
    assert other.returncode == 1 and "(sampler differ)" in other.stderr, other.stderr
    study = sweep.open_study("old", sweep.make_storage(None, str(root / "old")))
    study.ask()  # a trial, and no stored space: a study of an earlier version
    old = subprocess.run(sweep_command(space, root, 1, "--name", "old"), cwd=repo, capture_output=True, text=True)
    assert old.returncode == 1 and "made by an earlier tinycaffe" in old.stderr, old.stderr
    floats = write_space(tmp_path, lmdb_dir, budget={"max_iter": 20.0, "test_interval": 20})
    bad = subprocess.run(sweep_command(floats, root, 1, "--name", "f"), cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 1 and "budget.max_iter: expected an integer, got 20.0" in bad.stderr, bad.stderr


def test_a_changed_space_or_data_is_refused_by_its_study(repo, lmdb_dir, tmp_path):
    budget = {"max_iter": 20, "test_interval": 20}
    space, root = write_space(tmp_path, lmdb_dir, budget=budget), tmp_path / "sweeps"
    first = subprocess.run(sweep_command(space, root, 1), cwd=repo, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    count = len(trials_of(root))
    changed = write_space(tmp_path, lmdb_dir, budget=dict(budget, max_iter=40),
                          params={"base_lr": {"type": "categorical", "choices": [0.02, 0.01]}})
    out = subprocess.run(sweep_command(changed, root, 2), cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "study 'space' was started with another space or data (budget.max_iter, params.base_lr.choices, " \
        "params.weight_decay differ)" in out.stderr and "--name space-2" in out.stderr
    other_data = tmp_path / "lmdb_copy"
    shutil.copytree(lmdb_dir, other_data)
    manifest = json.loads((other_data / "manifest.json").read_text())
    manifest["source_fingerprint"] = "0" * 64  # the same LMDB made from other images
    (other_data / "manifest.json").write_text(json.dumps(manifest))
    moved = write_space(tmp_path, str(other_data), budget=budget)
    out = subprocess.run(sweep_command(moved, root, 2), cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and "(data differ)" in out.stderr, out.stderr
    assert len(trials_of(root)) == count  # nothing ran


def test_reports_only_read_and_odd_roots_are_one_line(repo, lmdb_dir, tmp_path, mount_tmpfs):
    """--report and --from-sweep on a read-only copy of a study (they only read it); a root with
    glob characters works; an unwritable root is one line naming it."""
    root = tmp_path / "sw[1]*"
    space = write_space(tmp_path, lmdb_dir, budget={"max_iter": 20, "test_interval": 20},
                        params={"base_lr": {"type": "categorical", "choices": [0.02]}})
    out = subprocess.run(sweep_command(space, root, 1), cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    copy = mount_tmpfs("size=32m")
    shutil.copytree(root, copy / "sweeps", symlinks=True)
    subprocess.run(["mount", "-o", "remount,ro", str(copy)], check=True)
    before = (copy / "sweeps" / "space" / sweep.JOURNAL).read_bytes()
    report = subprocess.run([sys.executable, TOOL, "--report", "space", "--root", str(copy / "sweeps")], cwd=repo,
                            capture_output=True, text=True)
    assert report.returncode == 0 and "| 1 | 0 |" in report.stdout, report.stderr
    assert "report files not written: %s" % (copy / "sweeps" / "space") in report.stderr
    assert "Read-only file system" in report.stderr and "Traceback" not in report.stderr
    submit = subprocess.run([sys.executable, "tools/make_submission.py", "--from-sweep", "space", "--top", "1",
                             "--sweeps-root", str(copy / "sweeps"), "--lmdb", os.path.join(lmdb_dir, "test_lmdb"),
                             "--out", str(tmp_path / "s.txt")], cwd=repo, capture_output=True, text=True)
    assert submit.returncode == 0 and (tmp_path / "s.txt").is_file(), submit.stderr[-2000:]
    assert (copy / "sweeps" / "space" / sweep.JOURNAL).read_bytes() == before
    unwritable = subprocess.run(sweep_command(space, copy / "other", 1), cwd=repo, capture_output=True, text=True)
    assert unwritable.returncode == 1 and len(unwritable.stderr.strip().splitlines()) == 1, unwritable.stderr
    assert "%s: cannot hold the study's journal (Read-only file system)" % (copy / "other") in unwritable.stderr


@pytest.mark.parametrize("change, needle", [
    (dict(params={"augment": {"type": "categorical", "choices": ["flip", "foo"]}}),
     "params.augment: choice 'foo' is not one of none, flip, colour, scale, full"),
    (dict(params={"solver": {"type": "categorical", "choices": ["adam"]}}), "choice 'adam' is not one of sgd"),
    (dict(params={"stepsize": {"type": "float", "low": 10, "high": 100}}), "params.stepsize: an integer"),
    (dict(params={"batch_size": {"type": "int", "low": 0, "high": 4}}), "low and high must be an integer >= 1"),
    (dict(params={"solver": {"type": "categorical", "choices": ["adagrad"]},
                  "momentum": {"type": "float", "low": 0.5, "high": 0.9}}), "Caffe refuses momentum with AdaGrad"),
    (dict(pruner={"median": {"n_startup": 3}}), "pruner.median:"),
    (dict(variants=["resnet"]), "variants.0: unknown 'resnet' (valid: alexnet"),
    (dict(params={"lr": {"type": "float", "low": 0.1, "high": 1}}), "params.lr: unknown key (valid: batch_size, "),
    (dict(params={"base_lr": {"type": "float", "low": 1, "high": 0.1}}), "needs numbers low < high"),
    (dict(params={"base_lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}), "log scale needs low > 0"),
    (dict(budget={"max_iter": 0, "test_interval": 1}), "budget.max_iter: expected a value >= 1, got 0"),
    # Issue 23: one declared schema, each error one line with the key path and the valid keys.
    (dict(parmas={}), "space.json: parmas: unknown key (valid: variants, lmdb_dir, budget, seed, params, pruner)"),
    (dict(budget=100), "space.json: budget: expected a mapping, got 100"),
    (dict(seed=None), "space.json: seed: expected an integer, got None"),
    (dict(budget={"max_iter": 10, "test_intervall": 5}), "budget: missing test_interval (required: max_iter, "),
    (dict(params={"base_lr": {"type": "float", "low": 0.1, "high": 1, "lo": 3}}),
     "params.base_lr.lo: unknown key (valid: type, low, high, log, choices)"),
    (dict(params={"base_lr": {"type": "normal"}}), "params.base_lr.type: unknown 'normal' (valid: float, int, "),
    (dict(pruner={"hyperband": {}}), "pruner.hyperband: unknown key (valid: asha, median, threshold, none)"),
    (dict(variants=[]), "variants: expected at least 1 item(s), got []"),
    (dict(lmdb_dir="/nonexistent"), "lmdb_dir /nonexistent has no manifest.json"),
    (dict(params={"recipe": {"type": "categorical", "choices": ["modern", "timm"]}}),
     "params.recipe: choice 'timm' is not one of paper, modern"),
    (dict(params={"cutmix": {"type": "float", "low": -1, "high": 1}}), "low and high must be a number >= 0 (0: off)"),
    (dict(params={"random_erasing": {"type": "float", "low": 0, "high": 1.5}}),
     "low and high must be a probability in [0, 1] (0: off)"),
    (dict(params={"ema_decay": {"type": "float", "low": 0.9, "high": 1.0}}), "must be a number in [0, 1) (0: off)"),
])
def test_bad_space_is_one_line_naming_the_field(repo, lmdb_dir, tmp_path, change, needle):  # noqa: E501
    space = write_space(tmp_path, lmdb_dir, **change)
    out = subprocess.run(sweep_command(space, tmp_path / "sweeps", 1), cwd=repo, capture_output=True, text=True)
    assert out.returncode == 1 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "sweeps").exists()


def test_grid_needs_categorical_params_and_report_needs_a_study(repo, lmdb_dir, tmp_path):
    space = write_space(tmp_path, lmdb_dir, params={"base_lr": {"type": "float", "low": 0.001, "high": 0.1}})
    out = subprocess.run(sweep_command(space, tmp_path / "sweeps", 1), cwd=repo, capture_output=True, text=True)
    assert out.returncode == 1 and "--sampler grid needs categorical params only; base_lr are ranges" in out.stderr
    out = subprocess.run([sys.executable, TOOL, "--report", "nothing", "--root", str(tmp_path)], cwd=repo,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "no sweep 'nothing'" in out.stderr


@pytest.fixture
def postgres():
    """A real PostgreSQL server (Debian's, installed by scripts/setup.sh) in a temp folder, on a
    Unix socket only; stopped and removed afterwards. -> the SQLAlchemy URL of a fresh database."""
    import glob
    import pwd
    import shutil
    import tempfile
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries or os.geteuid() != 0:
        pytest.skip("needs Debian's postgresql package and root (to run the server as the postgres user)")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user (Debian's postgresql package creates it)")
    bindir = os.path.dirname(binaries[-1])
    home = tempfile.mkdtemp(prefix="tinycaffe-pg-")  # under /tmp: the postgres user can reach it
    os.makedirs(os.path.join(home, "sock"))
    for folder in (home, os.path.join(home, "sock")):
        os.chown(folder, user.pw_uid, user.pw_gid)
    as_postgres = ["runuser", "-u", "postgres", "--"]
    data_dir, port = os.path.join(home, "data"), "55432"
    subprocess.run(as_postgres + [os.path.join(bindir, "initdb"), "-D", data_dir, "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(as_postgres + [os.path.join(bindir, "pg_ctl"), "-D", data_dir, "-l", os.path.join(home, "log"),
                                  "-w", "-o", "-k %s -p %s -c listen_addresses=''" % (os.path.join(home, "sock"), port),
                                  "start"], check=True, capture_output=True)
    try:
        subprocess.run([os.path.join(bindir, "createdb"), "-h", os.path.join(home, "sock"), "-p", port, "-U", "postgres",
                        "sweeps"], check=True, capture_output=True)
        yield "postgresql+psycopg2://postgres@/sweeps?host=%s&port=%s" % (os.path.join(home, "sock"), port)
    finally:
        subprocess.run(as_postgres + [os.path.join(bindir, "pg_ctl"), "-D", data_dir, "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_on_a_postgresql_study(repo, lmdb_dir, tmp_path, postgres):
    """--storage postgresql://...: Optuna's RDB storage on a real server, two workers at once; a
    password in the URL (the test server trusts any) never in `ps`, in messages or hints."""
    space, root = write_space(tmp_path, lmdb_dir), tmp_path / "sweeps"
    with_password = postgres.replace("postgres@", "postgres:sekret@")
    url_file = tmp_path / "storage.url"
    url_file.write_text(with_password + "\n")
    command = sweep_command(space, root, 3, "--storage-file", str(url_file))
    first = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    listed = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    second = subprocess.run(sweep_command(space, root, 3), cwd=repo, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, **{sweep.STORAGE_ENV: with_password}))
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, (err[-2000:], second.stderr[-2000:])
    assert "tools/sweep.py" in listed and "sekret" not in listed
    assert "sekret" not in err + second.stderr
    assert "--report space --root %s --storage-file %s" % (root, url_file) in err
    assert "tools/sweep.py --report space --root %s (with $%s set to the study's URL)" % (root, sweep.STORAGE_ENV) \
        in second.stderr and ".venv/bin/python tools/sweep.py --report" in second.stderr
    for url in ("postgresql+psycopg2://u:sekret@nohost.invalid:notaport/db",  # does not parse
                "postgresql+psycopg2://u:sekret@127.0.0.1:1/db"):  # a dead database
        bad = subprocess.run([sys.executable, TOOL, "--report", "space", "--root", str(root), "--storage", url],
                             cwd=repo, capture_output=True, text=True)
        assert bad.returncode == 1 and "sekret" not in bad.stderr and "u:***@" in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (root / "space" / sweep.JOURNAL).exists()  # the study is in PostgreSQL, not in a file
    study = sweep.open_study("space", sweep.make_storage(postgres, str(root / "space")))
    finished = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert 3 <= len(finished) <= 4
    assert len({t.user_attrs["worker"]["pid"] for t in finished}) == 2
    for t in finished:
        assert json.load(open(os.path.join(t.user_attrs["run_dir"], "run.json")))["status"] in ("finished", "pruned")
    report = subprocess.run([sys.executable, TOOL, "--report", "space", "--root", str(root), "--storage", postgres],
                            cwd=repo, capture_output=True, text=True)
    assert report.returncode == 0 and report.stdout.count("| complete |") + report.stdout.count("| pruned |") == \
        len(finished)


def test_a_trial_takes_the_modern_recipes_knobs(lmdb_dir, tmp_path):
    """recipe, mixup, cutmix, random_erasing (gen_prototxt's) and ema_decay (the solver's) reach the trial's files."""
    from google.protobuf import text_format
    from tinycaffe import caffe_env, sweep_space
    space = sweep_space.parse_space(write_space(tmp_path, lmdb_dir, params={
        "recipe": {"type": "categorical", "choices": ["modern"]}, "cutmix": {"type": "float", "low": 0.5, "high": 2},
        "ema_decay": {"type": "float", "low": 0.9, "high": 0.99},
        "random_erasing": {"type": "float", "low": 0, "high": 0.5}}))
    values = {"variant": "tiny", "recipe": "modern", "cutmix": 1.5, "ema_decay": 0.95, "random_erasing": 0.25}
    path = sweep.prepare_trial(space, values, str(tmp_path / "trial"), 3, "cpu")
    pb2 = caffe_env.caffe_pb2()
    solver = text_format.Merge(open(path).read(), pb2.SolverParameter())
    assert solver.lr_policy == "cosine" and solver.ema_decay == pytest.approx(0.95) and solver.test_ema
    net = text_format.Merge(open(solver.net).read(), pb2.NetParameter())
    mixup = [layer for layer in net.layer if layer.type == "Mixup"]
    assert len(mixup) == 1 and mixup[0].mixup_param.cutmix_alpha == pytest.approx(1.5)
    assert mixup[0].mixup_param.alpha == 0  # only the searched one
    train = next(layer for layer in net.layer if layer.type == "Data" and layer.include[0].phase == pb2.TRAIN)
    assert train.transform_param.random_erasing_param.prob == pytest.approx(0.25)
    paper = sweep.prepare_trial(space, {"variant": "tiny", "recipe": "paper", "ema_decay": 0.9},
                                str(tmp_path / "paper"), 3, "cpu")
    solver = text_format.Merge(open(paper).read(), pb2.SolverParameter())
    assert solver.lr_policy == "step" and solver.ema_decay == pytest.approx(0.9) and solver.test_ema
