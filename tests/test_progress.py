"""The terminal of a run (progress.py, train.py's last words): one progress line by default on
both engines, Caffe's full log with --verbose, a failing run's cause in its last line, and the
one-run overrides train.sh --max-iter/--test-interval/--batch-size (real Caffe, CPU, sample data)."""
import io
import json
import os
import subprocess
import sys

import pytest
from google.protobuf import text_format

from conftest import make_sample_lmdbs
from test_train import make_solver
from tinycaffe import caffelog, progress
from tinycaffe.caffe_env import caffe_pb2


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory):
    return make_sample_lmdbs(tmp_path_factory.mktemp("progress"), train=40, seed=5)


def train(repo, args, **kw):
    return subprocess.run(["bash", "scripts/train.sh"] + args, cwd=repo, capture_output=True, text=True, **kw)


def run_dirs(root):
    base = os.path.join(str(root), "tiny")
    return sorted(os.path.join(base, d) for d in os.listdir(base))


# ---------------------------------------------------------------- the progress line itself
LINES = [
    "I1204 10:00:00.000000 1 solver.cpp:218] Iteration 0 (0 iter/s, 0.1s/20 iters), loss = 2.3\n",
    "I1204 10:00:01.000000 1 solver.cpp:218] Iteration 20 (20 iter/s, 1s/20 iters), loss = 2.1\n",
    "I1204 10:00:02.000000 1 solver.cpp:330] Iteration 40, Testing net (#0)\n",
    "I1204 10:00:02.100000 1 solver.cpp:397]     Test net output #0: acc1 = 0.25\n",
    "I1204 10:00:02.100000 1 solver.cpp:397]     Test net output #1: loss = 2.0\n",
    "I1204 10:00:02.200000 1 solver.cpp:218] Iteration 40 (20 iter/s, 1s/20 iters), loss = 1.9\n",
]


def fed(tty):
    """A ProgressLine of 100 iterations x 10 images after LINES; -> (it, what it wrote)."""
    out = io.StringIO()
    line = progress.ProgressLine("tiny", 100, 0, images_per_iteration=10, aliases={"acc1": "accuracy_top1"},
                                 stream=out, tty=tty, test_interval=20)
    if line.bar is not None:  # redraw at every update, as a slow run does (the lines come seconds apart)
        line.bar.mininterval, line.bar.miniters = 0, 0
    for text in LINES:
        line.feed(text)
    line.close()
    return line, out.getvalue()


def test_without_a_terminal_one_line_per_val_test():
    line, text = fed(tty=False)
    printed = text.splitlines()
    # Loss lines alone print nothing within HEARTBEAT_SECONDS; the val test prints one line with the
    # rate from the glog timestamps: 20 iterations x 10 images in 1 s.
    assert printed == ["[train] tiny iter 40/100 | loss 2.1 | val top-1 0.2500 | 200 img/s | ETA 0:00:03"]
    # the last loss line: 40 iterations in 2.2 s, of which 0.1 s of val test; 3 tests to come (60, 80, 100)
    assert line.rate == pytest.approx(40 * 10 / (2.2 - 0.1))
    assert line.eta() == pytest.approx((100 - 40) * 10 / line.rate + 3 * 0.1)


def test_on_a_terminal_a_bar_redrawn_in_place():
    _, text = fed(tty=True)
    assert "\r" in text and text.count("\n") == 1  # one line, redrawn; the newline when it closes
    last = text.rstrip("\n").split("\r")[-1]
    assert "40/100" in last and "val top-1 0.2500" in last and "loss 1.9" in last and "img/s" in last
    # every drawing shows the loss of its own iteration, never the reading before it
    drawn = [x for x in text.split("\r") if "/100" in x and "loss" in x]
    assert any("20/100" in x for x in drawn) and all("20/100" not in x or "loss 2.1" in x for x in drawn), drawn


def test_failure_cause_is_caffes_own_line(tmp_path):
    log = tmp_path / "caffe.log"
    log.write_text(
        "I1204 10:00:00.000000 1 net.cpp:84] Creating Layer data\n"
        "E1204 10:00:00.100000 1 io.cpp:80] Could not open or find file x\n"
        "F1204 10:00:00.200000 1 data_transformer.cpp:63] Check failed: datum_height >= crop_size (32 vs. 60)\n"
        "*** Check failure stack trace: ***\n"
        "E1204 10:00:00.300000 9 tinycaffe] tinycaffe: something of ours\n")
    assert caffelog.failure_cause(str(log)) == \
        "Check failed: datum_height >= crop_size (32 vs. 60) (data_transformer.cpp:63)"
    log.write_text("Traceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: boom\n")
    assert caffelog.failure_cause(str(log)) == "RuntimeError: boom"
    log.write_text("I1204 10:00:00.000000 1 net.cpp:84] fine\n")
    assert caffelog.failure_cause(str(log)) is None


# ---------------------------------------------------------------- a run's terminal, both engines
@pytest.mark.parametrize("engine", ["binary", "pycaffe"])
def test_a_run_prints_progress_not_caffes_log(repo, lmdb_dir, tmp_path, engine):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=60, test_interval=30)
    out = train(repo, [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--engine", engine])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    assert not any("Test net output" in x or "Creating Layer" in x for x in lines), lines
    progress_lines = [x for x in lines if x.startswith("[train] tiny iter")]
    assert [x.split(" | ")[0] for x in progress_lines] == ["[train] tiny iter 30/60", "[train] tiny iter 60/60"]
    run_dir = run_dirs(tmp_path / "runs")[0]
    record = json.load(open(os.path.join(run_dir, "run.json")))
    last = progress_lines[-1]
    assert "val top-1 %.4f" % record["final"]["accuracy_top1"] in last and "img/s" in last
    assert len(lines) <= 8, lines
    assert lines[-1].startswith("[train] next: ") and "tools/evaluate.py --deploy" in lines[-1]
    # The command it suggests runs as printed and reports the run's own val top-1.
    evaluate = subprocess.run(lines[-1][len("[train] next: "):] + " --quiet", shell=True, cwd=repo,
                              capture_output=True, text=True)
    assert evaluate.returncode == 0, evaluate.stderr
    assert "top-1 %.4f" % record["final"]["accuracy_top1"] in evaluate.stdout
    # The full log is in caffe.log all the same.
    assert "Test net output" in open(os.path.join(run_dir, "caffe.log")).read()


def test_verbose_streams_caffes_log(repo, lmdb_dir, tmp_path):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=20, test_interval=20)
    out = train(repo, [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--verbose"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Test net output" in out.stderr and "Optimization Done" in out.stderr
    assert "[train] tiny iter" not in out.stderr


@pytest.mark.parametrize("engine", ["binary", "pycaffe"])
def test_a_failing_run_ends_with_its_cause(repo, lmdb_dir, tmp_path, engine):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=60, test_interval=30, lr_policy="no_such_policy")
    out = train(repo, [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--engine", engine])
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("[train] error: Caffe stopped") and \
        "Unknown learning rate policy: no_such_policy (sgd_solver.cpp:" in lines[-1], lines
    run_dir = run_dirs(tmp_path / "runs")[0]
    # the net's files too: a solver's check builds no layer
    assert "gen_prototxt.py --check %s" % " ".join(os.path.join(run_dir, f + ".prototxt")
                                                  for f in ("train_val", "deploy", "solver")) in lines[-2]
    assert len(lines) <= 5, lines


# ---------------------------------------------------------------- train.sh --max-iter/--test-interval/--batch-size
def test_overrides_for_one_run_are_recorded(repo, lmdb_dir, tmp_path):
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=300, test_interval=100)
    before = open(solver).read()
    out = train(repo, [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--max-iter", "40",
                       "--test-interval", "20", "--batch-size", "16"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert open(solver).read() == before  # the variant's files are not touched
    run_dir = run_dirs(tmp_path / "runs")[0]
    used = caffe_pb2().SolverParameter()
    text_format.Merge(open(os.path.join(run_dir, "solver.prototxt")).read(), used)
    assert (used.max_iter, used.test_interval) == (40, 20)
    assert "max_iter 40, test_interval 20, batch_size 16 set on the command line" in \
        open(os.path.join(run_dir, "solver.prototxt")).read()
    net = caffe_pb2().NetParameter()
    text_format.Merge(open(os.path.join(run_dir, "train_val.prototxt")).read(), net)
    batches = {layer.include[0].phase: layer.data_param.batch_size for layer in net.layer if layer.type == "Data"}
    assert batches[caffe_pb2().TRAIN] == 16 and batches[caffe_pb2().TEST] == 100  # val still covered once
    record = json.load(open(os.path.join(run_dir, "run.json")))
    assert record["overrides"] == {"max_iter": 40, "test_interval": 20, "batch_size": 16}
    assert record["final"]["iterations"] == 40
    assert [r["NumIters"] for r in caffelog.parse(os.path.join(run_dir, "caffe.log"))[1]] == [20, 40]
    assert "batch_size: 16" in open(os.path.join(run_dir, "caffe.log")).read()  # what Caffe built
    # --resume --max-iter trains the same run further; --batch-size cannot change mid-run.
    again = train(repo, [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--resume",
                         "--batch-size", "8"])
    assert again.returncode == 1 and "--batch-size cannot change on --resume" in again.stderr
    again = train(repo, [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--resume",
                         "--max-iter", "40"])
    assert again.returncode == 1 and "--max-iter 40: the run is already at iteration 40" in again.stderr
    again = train(repo, [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--resume",
                         "--max-iter", "60"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(binary, cpu, resuming from iteration 40)" in again.stderr.splitlines()[0]
    record = json.load(open(os.path.join(run_dir, "run.json")))
    assert record["final"]["iterations"] == 60 and record["resumes"][-1]["overrides"] == {"max_iter": 60}
    text_format.Merge(open(os.path.join(run_dir, "solver.prototxt")).read(), used)
    assert used.max_iter == 60


@pytest.mark.parametrize("flag", ["--max-iter", "--test-interval", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "99999999999", "-3"])
def test_overrides_must_fit_caffes_int32(repo, flag, value):
    out = train(repo, ["tiny", flag, value])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "expected a whole number from 1 to 2147483647, got '%s'" % value in out.stderr


def test_abbreviated_flags_are_refused(repo):
    """The Ctrl-C resume command drops override flags by their full names: `--batch 16` would stay
    in it and make the resume refuse (argparse takes prefixes unless told not to)."""
    out = train(repo, ["tiny", "--batch", "16"])
    assert out.returncode == 2 and "unrecognized arguments: --batch 16" in out.stderr


def test_batch_size_changes_train_only_layers(repo):
    from tinycaffe import runs
    net = caffe_pb2().NetParameter()
    text_format.Merge("""
layer { name: "train" type: "Data" top: "data" top: "label" include { phase: TRAIN } data_param { batch_size: 32 } }
layer { name: "val" type: "Data" top: "data" top: "label" exclude { phase: TRAIN } data_param { batch_size: 100 } }
""", net)
    runs.apply_overrides(caffe_pb2().SolverParameter(), net, {"batch_size": 8})
    assert [layer.data_param.batch_size for layer in net.layer] == [8, 100]
    shared = caffe_pb2().NetParameter()
    text_format.Merge('layer { name: "both" type: "Data" top: "data" data_param { batch_size: 32 } }', shared)
    with pytest.raises(runs.RunError, match="Data layer 'both' serves both phases"):
        runs.apply_overrides(caffe_pb2().SolverParameter(), shared, {"batch_size": 8})


def test_a_cause_from_an_earlier_segment_is_not_this_runs(tmp_path):
    log = tmp_path / "caffe.log"
    log.write_text(
        "F1204 10:00:00.000000 1 syncedmem.cpp:71] Check failed: error == cudaSuccess (2 vs. 0)  out of memory\n"
        "I1204 11:00:00.000000 9 tinycaffe] tinycaffe: /usr/bin/caffe train -solver s -snapshot x_iter_10.solverstate\n"
        "I1204 11:00:01.000000 9 solver.cpp:218] Iteration 20 (1 iter/s, 1s/10 iters), loss = 2\n")
    assert caffelog.failure_cause(str(log)) is None


def test_weights_that_fit_no_layer_are_refused(repo, lmdb_dir, tmp_path):
    from tinycaffe import runs
    solver = make_solver(lmdb_dir, tmp_path / "p", max_iter=10, test_interval=10)
    stranger = caffe_pb2().NetParameter()
    stranger.layer.add(name="conv_elsewhere").blobs.add().data.extend([1.0])
    (tmp_path / "stranger.caffemodel").write_bytes(stranger.SerializeToString())
    out = train(repo, [solver, "--gpu", "cpu", "--runs-root", str(tmp_path / "runs"), "--weights",
                       str(tmp_path / "stranger.caffemodel")])
    assert out.returncode == 1 and "shares no layer name with the net" in out.stderr
    assert "training would start from random weights" in out.stderr and not os.path.exists(tmp_path / "runs")
    assert runs.layers_with_weights(str(tmp_path / "stranger.caffemodel")) == {"conv_elsewhere"}


# ---------------------------------------------------------------- every tool's --help
TOOLS = ["classify", "evaluate", "gen_prototxt", "lmdb_info", "make_lmdb", "make_sample_data", "make_submission",
         "plot_log", "report", "sweep", "sweep_slurm", "train", "visualize"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_shows_examples(repo, tool):
    out = subprocess.run([sys.executable, "tools/%s.py" % tool, "--help"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0
    examples = out.stdout.split("\nexamples:\n", 1)
    assert len(examples) == 2 and examples[1].strip().startswith(tool + ".py "), out.stdout[-500:]


def test_train_sh_help_names_its_own_default_engine(repo):
    out = train(repo, ["--help"])
    assert "(default binary)" in out.stdout and "default engine is a pycaffe" not in out.stdout.replace("\n", " ")
    assert "train.sh tiny --gpu cpu" in out.stdout


@pytest.mark.parametrize("tty", [False, True])
def test_caffes_warnings_are_shown_on_their_own_line(tty):
    out = io.StringIO()
    line = progress.ProgressLine("tiny", 100, 0, images_per_iteration=10, stream=out, tty=tty)
    warning = "W1204 10:00:00.000000 1 net.cpp:50] a layer Caffe warns about"
    line.feed(LINES[0])
    line.feed(warning + "\n")
    line.feed("E1204 10:00:00.000000 1 io.cpp:80] an error Caffe logs and goes on\n")
    line.feed("W1204 10:00:00.000000 1 tinycaffe] tinycaffe: our own, said again at the end\n")
    line.close()
    shown = [x.split("\r")[-1] for x in out.getvalue().splitlines()]
    assert warning in shown and not any("our own" in x for x in shown)
    assert "E1204 10:00:00.000000 1 io.cpp:80] an error Caffe logs and goes on" in shown


@pytest.mark.parametrize("rows, columns", [(0, 0), (0, 100)])
def test_a_terminal_nobody_sized_still_shows_the_bar(rows, columns):
    """A pty of 0 x 0 (docker -t, script(1) without a size), or one with columns but no rows
    (`stty cols 100`): tqdm would draw nothing at all."""
    import fcntl
    import struct
    import termios
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    stream = os.fdopen(slave, "w")
    line = progress.ProgressLine("tiny", 100, 0, images_per_iteration=10, aliases={"acc1": "accuracy_top1"},
                                 stream=stream)
    assert line.tty and progress._size(stream) == (columns, rows)
    for text in LINES:
        line.feed(text)
    line.close()
    stream.close()
    import select
    chunks = []  # a pty hands its bytes over in pieces
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    shown = b"".join(chunks).decode(errors="replace")
    os.close(master)
    assert "40/100" in shown and "val top-1 0.2500" in shown
