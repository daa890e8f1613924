"""Nothing may mislead in the edit -> train -> read-the-curves loop (issue 22): a copied variant,
a test split as val, augmentation no run checked, NaN weights scored 100 %, curves after a resume
or an anneal, divergence at its iteration, full and read-only disks, the resume command.
Real Caffe on CPU, the sample data."""
import csv
import glob
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import make_sample_lmdbs, wait_for_log
from test_train import TRAIN_PY, TRAIN_SH, assert_rates_match_the_log, make_solver, only_run_dir, run, used_batch
from tinycaffe import caffelog
from tinycaffe.caffe_env import caffe_pb2


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory):
    return make_sample_lmdbs(tmp_path_factory.mktemp("trust"), train=40, seed=5)


def read_net(path):
    net = caffe_pb2().NetParameter()
    text_format.Merge(open(path).read(), net)
    return net


def write_net(path, net):
    open(path, "w").write(text_format.MessageToString(net))


def edit_layer(path, name, edit):
    """Apply edit(layer) to the layer(s) called name (both Data layers for "data") of a net file."""
    net = read_net(path)
    layers = [layer for layer in net.layer if layer.name == name]
    assert layers, name
    for layer in layers:
        edit(layer)
    write_net(path, net)


def stderr_lines(out):
    return [line for line in out.stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------- 1. the edit-a-variant loop
def net_parameters(caffe, net_path):
    """Values in every parameter blob of a net, as Caffe builds it (TEST phase)."""
    net = caffe.Net(net_path, caffe.TEST)
    return sum(blob.data.size for blobs in net.params.values() for blob in blobs)


def widen_fc1(folder):
    edit_layer(os.path.join(folder, "train_val.prototxt"), "fc1",
               lambda layer: setattr(layer.inner_product_param, "num_output", 200))


def test_a_copied_variant_is_refused_naming_both_files(repo, lmdb_dir, tmp_path):
    make_solver(lmdb_dir, tmp_path / "p", max_iter=20, test_interval=20)
    mine = tmp_path / "p" / "mine"
    shutil.copytree(tmp_path / "p" / "tiny", mine)  # what every Caffe user does first
    widen_fc1(mine)
    out = run(repo, TRAIN_SH + [str(mine / "solver.prototxt"), "--gpu", "cpu", "--runs-root", str(tmp_path / "runs")])
    assert out.returncode == 1 and not os.path.exists(tmp_path / "runs")
    last = stderr_lines(out)[-1]
    assert str(tmp_path / "p" / "tiny" / "train_val.prototxt") in last and str(mine / "train_val.prototxt") in last
    assert "--from" in last and "Traceback" not in out.stderr
    check = run(repo, [sys.executable, "tools/gen_prototxt.py", "--check", str(mine / "solver.prototxt")])
    assert check.returncode == 1 and "1 problem(s)" in check.stdout
    assert "a copied variant?" in check.stderr


def test_gen_prototxt_from_to_trains_the_edited_net(repo, caffe, lmdb_dir, tmp_path):
    make_solver(lmdb_dir, tmp_path / "p", max_iter=20, test_interval=20)
    mine = tmp_path / "p" / "mine"
    out = run(repo, [sys.executable, "tools/gen_prototxt.py", "--from", str(tmp_path / "p" / "tiny"), "--to", str(mine)])
    assert out.returncode == 0, out.stderr
    assert "train it: scripts/train.sh %s" % (mine / "solver.prototxt") in out.stdout
    widen_fc1(mine)
    solver = caffe_pb2().SolverParameter()
    text_format.Merge(open(mine / "solver.prototxt").read(), solver)
    assert solver.net == str(mine / "train_val.prototxt") and solver.snapshot_prefix == "runs/mine/mine"
    out = run(repo, TRAIN_SH + [str(mine / "solver.prototxt"), "--gpu", "cpu", "--runs-root", str(tmp_path / "runs")])
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = glob.glob(str(tmp_path / "runs" / "mine" / "*"))[0]
    record = json.load(open(os.path.join(run_dir, "run.json")))
    edited = net_parameters(caffe, str(mine / "train_val.prototxt"))
    assert record["final"]["parameters"] == edited
    assert edited != net_parameters(caffe, str(tmp_path / "p" / "tiny" / "train_val.prototxt"))
    again = run(repo, [sys.executable, "tools/gen_prototxt.py", "--from", str(tmp_path / "p" / "tiny"), "--to", str(mine)])
    assert again.returncode == 1 and "exists and is not an empty folder" in again.stderr


def test_the_fix_names_the_net_path_as_the_solver_writes_it(repo):
    """prototxt/tiny copied with cp: the solver's paths are relative to the repo root, so is the fix."""
    from tinycaffe import prechecks
    problems = prechecks._copied_variant(os.path.join(repo, "prototxt", "tiny", "solver.prototxt"),
                                         os.path.join(repo, "prototxt", "alexnet", "train_val.prototxt"), repo,
                                         written="prototxt/alexnet/train_val.prototxt")
    assert len(problems) == 1 and 'set net: "prototxt/tiny/train_val.prototxt"' in problems[0]


# ---------------------------------------------------------------- 2. the test LMDB as val
@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_the_test_split_as_validation_source_is_refused(repo, lmdb_dir, tmp_path, tool):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=20, test_interval=20)
    net_path = os.path.join(os.path.dirname(solver), "train_val.prototxt")
    net = read_net(net_path)
    test_lmdb = os.path.join(lmdb_dir, "test_lmdb")
    net.layer[1].data_param.source = test_lmdb  # the TEST Data layer
    write_net(net_path, net)
    out = run(repo, tool + [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs")])
    assert out.returncode == 1 and not os.path.exists(tmp_path / "runs"), out.stderr[-2000:]
    last = stderr_lines(out)[-1]
    assert test_lmdb in last and "unlabelled test split" in last
    for checked in (net_path, solver):  # --check on the solver checks the net it names: the run's list
        check = run(repo, [sys.executable, "tools/gen_prototxt.py", "--check", checked])
        assert check.returncode == 1 and "unlabelled test split" in check.stderr, check.stdout


# ---------------------------------------------------------------- 3. augmentation checked before every run
@pytest.mark.parametrize("field, value, message", [
    ("lighting_param", dict(alphastd=0.1, eigval=[1.0, "NaN", 1.0], eigvec=[1, 0, 0, 0, 1, 0, 0, 0, 1]),
     "lighting_param has a negative or non-finite value"),
    ("random_resized_crop_param", dict(min_aspect=1000, max_aspect=2000), "leaves no crop of a 64x64 image"),
])
@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_augmentation_is_checked_before_every_run(repo, lmdb_dir, tmp_path, tool, field, value, message):
    from google.protobuf import json_format
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=20, test_interval=20)
    net_path = os.path.join(os.path.dirname(solver), "train_val.prototxt")
    net = read_net(net_path)
    json_format.ParseDict({field: value}, net.layer[0].transform_param)  # the TRAIN Data layer
    write_net(net_path, net)
    out = run(repo, tool + [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs")])
    assert out.returncode == 1 and not os.path.exists(tmp_path / "runs"), out.stderr[-2000:]
    assert message in stderr_lines(out)[-1] and "layer 'data'" in stderr_lines(out)[-1]
    for checked in (net_path, solver):
        check = run(repo, [sys.executable, "tools/gen_prototxt.py", "--check", checked])
        assert check.returncode == 1 and message in check.stderr, check.stdout


def test_check_and_the_run_precheck_share_one_list(monkeypatch, lmdb_dir, tmp_path):
    """Both call prechecks: a problem planted there shows in --check and refuses a run."""
    from tinycaffe import check, prechecks, runs
    solver_path = make_solver(lmdb_dir, tmp_path / "p", max_iter=20, test_interval=20)
    planted = "planted problem"
    monkeypatch.setattr(prechecks, "augmentation_problems", lambda net, path, base: [planted])
    assert planted in check.check_files([os.path.join(os.path.dirname(solver_path), "train_val.prototxt")],
                                        out=lambda line: None)
    solver = caffe_pb2().SolverParameter()
    text_format.Merge(open(solver_path).read(), solver)
    with pytest.raises(runs.RunError, match=planted):
        runs.precheck(solver, solver_path, str(tmp_path))


# ---------------------------------------------------------------- 4. NaN weights never score 100 %
@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_weights_that_go_non_finite_after_the_last_loss_line_end_diverged(repo, lmdb_dir, tmp_path, tool):
    # display 0: Caffe logs no loss line at all, so only the final weights and test can tell.
    solver = make_solver(lmdb_dir, tmp_path / "p", base_lr=1e6, max_iter=30, test_interval=30, display=0, snapshot=10)
    out = run(repo, tool + [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs")])
    assert out.returncode == 3, out.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    record = json.load(open(os.path.join(run_dir, "run.json")))
    assert record["status"] == "diverged" and record["exit_code"] == 3
    assert record["final"].get("accuracy_top1") != 1.0 and record["final"].get("best_accuracy_top1") != 1.0
    assert "diverged at iteration" in out.stderr
    for model in glob.glob(os.path.join(run_dir, "snapshots", "*.caffemodel")):
        net = caffe_pb2().NetParameter()
        net.ParseFromString(open(model, "rb").read())
        assert all(np.isfinite(np.asarray(b.data)).all() for layer in net.layer for b in layer.blobs), model


# ---------------------------------------------------------------- 5, 6. curves after a resume and an anneal
def read_events(log_dir):
    """[(file, [(tag, step, value) | ("<purge>", step, None)])] of every event file, oldest first."""
    from tensorboardX.proto import event_pb2
    files = []
    for path in sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*")), key=os.path.getmtime):
        blob, at, events = open(path, "rb").read(), 0, []
        while at < len(blob):
            (length,) = struct.unpack("<Q", blob[at:at + 8])
            event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                events.append(("<purge>", event.step, None))
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    events.append((value.tag, event.step, value.simple_value))
        files.append((path, events))
    return files


def scalars_as_tensorboard_shows_them(log_dir):
    """{tag: [(step, value), ...]} after TensorBoard's purge rules: a START session log at step S
    drops every earlier value at step >= S; a value at a step below its tag's last drops the
    tag's values at steps >= it (EventAccumulator's purge_orphaned_data)."""
    shown = {}
    for _, events in read_events(log_dir):
        for tag, step, value in events:
            if tag == "<purge>":
                shown = {t: [(s, v) for s, v in points if s < step] for t, points in shown.items()}
                continue
            points = shown.setdefault(tag, [])
            if points and step < points[-1][0]:
                points[:] = [(s, v) for s, v in points if s < step]
            points.append((step, value))
    return shown


def assert_one_value_per_step(shown):
    for tag, points in shown.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), (tag, steps)


def assert_true_rates(run_dir, shown):
    assert_rates_match_the_log(run_dir, dict(shown["images_per_second"]), used_batch(run_dir))


@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_a_resumed_run_shows_one_value_per_step_and_true_rates(repo, lmdb_dir, tmp_path, tool):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=80, test_interval=40, display=10, snapshot=0)
    proc = subprocess.Popen(tool + [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs")], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_log(proc, tmp_path / "runs", "Iteration 50")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at ~50
    rest = proc.stderr.read()
    assert proc.wait() == 130
    run_dir = only_run_dir(tmp_path / "runs")
    # 9: the last line is the exact command that continues the run; it works as printed.
    resume = [line for line in rest.splitlines() if "continue it with: " in line]
    assert resume and resume[-1] == [line for line in rest.splitlines() if line.strip()][-1]
    command = shlex.split(resume[-1].split("continue it with: ", 1)[1])
    assert command[-3:] == ["--resume", "--run-dir", run_dir]
    out = run(repo, command)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.load(open(os.path.join(run_dir, "run.json")))
    assert record["status"] == "finished" and record["final"]["iterations"] == 80
    files = read_events(run_dir)
    assert len(files) == 2 and files[0][0] != files[1][0]
    shown = scalars_as_tensorboard_shows_them(run_dir)
    assert_one_value_per_step(shown)
    assert [s for s, _ in shown["val/accuracy_top1"]] == [40, 80]
    assert_true_rates(run_dir, shown)
    _, test = caffelog.parse(os.path.join(run_dir, "caffe.log"))
    assert dict(shown["val/accuracy_top1"]) == pytest.approx({r["NumIters"]: r["accuracy_top1"] for r in test})


def test_rates_stay_true_across_plateau_anneals(repo, lmdb_dir, tmp_path):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=60, test_interval=10, display=10, snapshot=0)
    out = run(repo, TRAIN_PY + [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--anneal", "plateau",
                                "--patience", "1", "--min-delta", "1.0", "--max-anneals", "3"])
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = only_run_dir(tmp_path / "runs")
    assert len(json.load(open(os.path.join(run_dir, "run.json")))["anneals"]) >= 2
    shown = scalars_as_tensorboard_shows_them(run_dir)
    assert_one_value_per_step(shown)
    assert_true_rates(run_dir, shown)


# ---------------------------------------------------------------- 7. a divergence is visible where it happened
@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_a_divergence_is_recorded_at_its_iteration(repo, lmdb_dir, tmp_path, tool):
    solver = make_solver(lmdb_dir, tmp_path / "p", base_lr=1e6, max_iter=200, display=20, snapshot=0)
    out = run(repo, tool + [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs")])
    assert out.returncode == 3, out.stderr[-2000:]
    run_dir = only_run_dir(tmp_path / "runs")
    first_bad = json.load(open(os.path.join(run_dir, "run.json")))["final"]["first_bad_iteration"]
    assert first_bad == 20
    assert "diverged at iteration 20" in out.stderr and "after 0 iterations" not in out.stderr
    rows = list(csv.DictReader(open(os.path.join(run_dir, "train.csv"))))
    assert [(r["NumIters"], r["event"]) for r in rows if r["event"]] == [("20", "diverged")]
    shown = scalars_as_tensorboard_shows_them(run_dir)
    assert shown["events/diverged"] == [(20, 1.0)]


# ---------------------------------------------------------------- 8. full and read-only disks
@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs mount point; all unmounted at the end (root only)."""
    mounted = []

    def mount(options):
        point = tmp_path / ("mnt%d" % len(mounted))
        point.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (%s): the disk tests need root" % out.stderr.strip())
        mounted.append(point)
        return point
    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_a_read_only_run_dir_is_one_line(repo, lmdb_dir, tmp_path, tool, mount_tmpfs):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=20, test_interval=20)
    read_only = mount_tmpfs("ro,size=1m")
    out = run(repo, tool + [solver, "--gpu", "cpu", "--run-dir", str(read_only / "run")])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert stderr_lines(out)[-1].endswith("%s: cannot write the run directory (Read-only file system)"
                                          % (read_only / "run"))


@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_a_disk_that_fills_during_training_ends_the_run_failed(repo, lmdb_dir, tmp_path, tool, mount_tmpfs):
    # tiny's snapshots are ~2 MB (weights) + ~2 MB (momentum): a few fit in 12 MB, then the disk is full.
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=2000, test_interval=2000, display=10, snapshot=10)
    disk = mount_tmpfs("size=12m")
    t0 = time.time()
    out = run(repo, tool + [solver, "--gpu", "cpu", "--run-dir", str(disk / "run")], timeout=300)
    assert time.time() - t0 < 240
    assert out.returncode not in (0, 130) and "Traceback" not in out.stderr, out.stderr[-3000:]
    record = json.load(open(disk / "run" / "run.json"))
    assert record["status"] == "failed" and record["final"]["iterations"] < 2000
    assert str(disk / "run") in stderr_lines(out)[-1], stderr_lines(out)[-3:]


# ---------------------------------------------------------------- review round: what a skeptical user tried next
def test_a_symlinked_variant_folder_is_no_copy(repo, lmdb_dir, tmp_path):
    make_solver(lmdb_dir, tmp_path / "p", max_iter=10, test_interval=10)
    os.symlink(tmp_path / "p" / "tiny", tmp_path / "p" / "link")
    solver = caffe_pb2().SolverParameter()
    text_format.Merge(open(tmp_path / "p" / "link" / "solver.prototxt").read(), solver)
    from tinycaffe import prechecks
    assert prechecks.solver_problems(solver, str(tmp_path / "p" / "link" / "solver.prototxt"), str(tmp_path)) == []


def test_augmentation_of_any_transforming_layer_is_checked(repo, tmp_path):
    net = tmp_path / "imagedata.prototxt"
    net.write_text('layer { name: "data" type: "ImageData" top: "data" top: "label" image_data_param { source: "x.txt" '
                   'batch_size: 2 } transform_param { lighting_param { alphastd: 0.1 eigval: [1, nan, 1] '
                   'eigvec: [1, 0, 0, 0, 1, 0, 0, 0, 1] } } }\n')
    check = run(repo, [sys.executable, "tools/gen_prototxt.py", "--check", str(net)])
    assert check.returncode == 1 and "lighting_param has a negative or non-finite value" in check.stderr


def test_the_crop_rule_rounds_as_caffe_does():
    from tinycaffe import augment
    tp = text_format.Parse("random_resized_crop_param { min_aspect: 128 max_aspect: 128 }",
                           caffe_pb2().TransformationParameter())  # a 64x64 image: fallback 64/128 = 0.5 -> 1 row
    assert augment.check_transform(tp, "n") == []
    tp.random_resized_crop_param.min_aspect = tp.random_resized_crop_param.max_aspect = 129
    [problem] = augment.check_transform(tp, "n")
    assert "expected min_aspect <= 128 and max_aspect >= 0.0078125" in problem


@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_a_resume_from_an_older_snapshot_forgets_what_came_after_it(repo, lmdb_dir, tmp_path, tool):
    """Diverged at 40 (the LR jumps 1e8-fold at 20, display 0), kept the snapshot at 20; the solver
    fixed and shortened to 30 as the message advises: the resumed run finishes, tested at 30,
    and the abandoned stretch's test at 40 (NaN, "100 %") is in no output."""
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=40, test_interval=20, display=0, snapshot=20,
                         stepsize=20, gamma=1e8)
    out = run(repo, tool + [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs")])
    assert out.returncode == 3, out.stderr[-2000:]
    run_dir = only_run_dir(tmp_path / "runs")
    used = caffe_pb2().SolverParameter()
    text_format.Merge(open(os.path.join(run_dir, "solver.prototxt")).read(), used)
    used.gamma, used.max_iter = 0.1, 30
    open(os.path.join(run_dir, "solver.prototxt"), "w").write(text_format.MessageToString(used))
    out = run(repo, tool + [solver, "--gpu", "cpu", "--resume", "--run-dir", run_dir])
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.load(open(os.path.join(run_dir, "run.json")))
    assert record["status"] == "finished" and record["final"]["tested_at"] == 30
    tested = [int(r["NumIters"]) for r in csv.DictReader(open(os.path.join(run_dir, "test.csv")))]
    assert tested == [20, 30] and record["final"]["accuracy_top1"] < 1.0


@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_after_a_full_disk_the_run_resumes_from_a_whole_snapshot(repo, lmdb_dir, tmp_path, tool, mount_tmpfs):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=2000, test_interval=2000, display=10, snapshot=10)
    disk = mount_tmpfs("size=12m")
    out = run(repo, tool + [solver, "--gpu", "cpu", "--run-dir", str(disk / "run")], timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]  # failed: 1, whatever Caffe's abort said (caffe_exit_code)
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    states = sorted(glob.glob(str(disk / "run" / "snapshots" / "*.solverstate")))
    used = caffe_pb2().SolverParameter()
    text_format.Merge(open(disk / "run" / "solver.prototxt").read(), used)
    used.max_iter = max(int(p.rsplit("_iter_", 1)[1].split(".")[0]) for p in states) + 10
    open(disk / "run" / "solver.prototxt", "w").write(text_format.MessageToString(used))
    out = run(repo, tool + [solver, "--gpu", "cpu", "--resume", "--run-dir", str(disk / "run")], timeout=300)
    assert out.returncode == 0 and "Check failed" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("tool", [TRAIN_SH, TRAIN_PY])
def test_a_resume_into_a_read_only_run_dir_is_one_line(repo, lmdb_dir, tmp_path, tool, mount_tmpfs):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=20, test_interval=20, snapshot=10)
    disk = mount_tmpfs("size=16m")
    out = run(repo, tool + [solver, "--gpu", "cpu", "--run-dir", str(disk / "run")])
    assert out.returncode == 0, out.stderr[-2000:]
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    out = run(repo, tool + [solver, "--gpu", "cpu", "--resume", "--run-dir", str(disk / "run")])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "cannot write the run directory (Read-only file system)" in stderr_lines(out)[-1]


def test_weights_and_resume_together_are_refused(repo, lmdb_dir, tmp_path):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=10, test_interval=10)
    out = run(repo, TRAIN_SH + [solver, "--gpu", "cpu", "--resume", "--weights", solver])
    assert out.returncode == 1 and "give one of them" in stderr_lines(out)[-1]


def test_the_resume_command_runs_from_where_it_is_typed(repo, tmp_path, monkeypatch):
    from tinycaffe import train
    monkeypatch.chdir(os.path.join(repo, "scripts"))
    command = train.resume_command(["train.sh", "../prototxt/tiny/solver.prototxt", "--run-dir=old", "--gpu", "cpu"],
                                   "/r/d")
    assert command == "./train.sh ../prototxt/tiny/solver.prototxt --gpu cpu --resume --run-dir /r/d"
    monkeypatch.chdir(str(tmp_path))
    assert train.resume_command(["train.sh", "x"], "/r/d").startswith(os.path.join(repo, "scripts", "train.sh"))


def test_only_a_run_that_ends_non_finite_is_diverged(tmp_path):
    """A NaN test the run came back from (a BatchNorm net tested before its first step) is no
    divergence; trailing NaN tests are, from the first of them."""
    from tinycaffe import train
    nan, ok = float("nan"), 0.5
    rows = lambda *values: [{"NumIters": 20 * i, "loss": v, "accuracy_top1": 1.0 if v != v else v}  # noqa: E731
                            for i, v in enumerate(values)]
    (tmp_path / "snapshots").mkdir()
    assert train._late_divergence(str(tmp_path), rows(nan, ok, ok)) is None
    assert train._late_divergence(str(tmp_path), rows(ok, nan, nan)) == 20
    assert train._late_divergence(str(tmp_path), rows(nan, ok, nan)) == 40


# ---------------------------------------------------------------- issue 24: a copy pointed at other LMDBs by hand
def test_a_copy_pointed_at_other_lmdbs_is_told_what_to_edit(repo, lmdb_dir, tmp_path):
    """The newcomer's route: a --from/--to copy of a 200-class variant, its data paths edited to the
    10-class sample. --check and the run name the classifier layer to edit and the test_iter that
    covers the val LMDB once (it read 10,000 images a test, 50 passes over 200), each said once."""
    copy = os.path.join(repo, "prototxt", "zz_test_copy")
    shutil.rmtree(copy, ignore_errors=True)
    try:
        out = run(repo, [sys.executable, "tools/gen_prototxt.py", "--from", "prototxt/tiny", "--to", copy])
        assert out.returncode == 0, out.stderr
        net = os.path.join(copy, "train_val.prototxt")
        text = open(net).read()
        open(net, "w").write(text.replace("data/lmdb/", lmdb_dir.rstrip("/") + "/"))
        files = [os.path.join(copy, f + ".prototxt") for f in ("train_val", "deploy", "solver")]
        check = run(repo, [sys.executable, "tools/gen_prototxt.py", "--check"] + files)
        problems = [x for x in check.stderr.splitlines() if x.startswith("problem: ")]
        assert check.returncode == 1 and len(problems) == 2, check.stderr
        assert "set num_output: 10 in layer 'fc_out' (train_val and deploy), or regenerate" in problems[0]
        assert "test_iter 100 x TEST batch 100 = 10000 images, but %s holds 200" % os.path.join(
            lmdb_dir, "val_lmdb") in problems[1] and problems[1].endswith("set test_iter: 2")
        trained = run(repo, ["bash", "scripts/train.sh", files[2], "--gpu", "cpu", "--runs-root",
                             str(tmp_path / "runs")])
        assert trained.returncode == 1 and "set num_output: 10 in layer 'fc_out'" in trained.stderr
        assert "and 1 more problem" in trained.stderr and not os.path.exists(tmp_path / "runs")
    finally:
        shutil.rmtree(copy, ignore_errors=True)
