"""scripts/sweep_slurm.sh: a sweep as a Slurm job array, checked as text and on a real one-node
Slurm cluster (Debian's slurm-wlm and munge, started here as root in a temp folder)."""
import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from tinycaffe import slurm, sweep, sweep_recovery

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sweep import trials_of, write_space  # noqa: E402

TOOL = "scripts/sweep_slurm.sh"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # the daemons live in sbin


def slurm_space(folder, lmdb, max_iter=60):
    """tiny, a test every 50 iterations; a base_lr that learns, two weight decays."""
    return write_space(folder, lmdb, budget={"max_iter": max_iter, "test_interval": 50},
                       params={"base_lr": {"type": "categorical", "choices": [0.02]},
                               "weight_decay": {"type": "categorical", "choices": [0.0005, 0.0001]}})


def sweep_slurm(repo, *args, env=None):
    return subprocess.run([os.path.join(repo, TOOL), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def sbatch_lines(text):
    return [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]


def sweep_tool(repo):
    """tools/sweep.py as a module (its build_parser)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sweep_tool", os.path.join(repo, "tools", "sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_argv(text):
    """The exec line's words after the interpreter and tools/sweep.py."""
    [line] = [line for line in text.splitlines() if line.startswith("exec ")]
    return shlex.split(line)[1:]


# ---------------------------------------------------------------- the job script as text
def test_cpu_job_script_runs_sweep_py_with_absolute_paths(repo, lmdb_dir, tmp_path, monkeypatch):
    space = slurm_space(tmp_path, lmdb_dir)
    monkeypatch.chdir(tmp_path)  # relative paths are the caller's, made absolute in the script
    out = sweep_slurm(repo, "space.json", "--name", "lr", "--tasks", "3", "--max-running", "2", "--trials", "7",
                      "--device", "cpu", "--cpus-per-task", "2", "--mem", "8g", "--time", "2-00:00:00",
                      "--partition", "short", "--account", "lab", "--stop-before", "300",
                      "--sbatch-arg=--constraint=avx2", "--sbatch-arg=--requeue", "--root", "sw",
                      "--pruner", "threshold", "--sampler", "random")
    assert out.returncode == 0, out.stderr
    path = str(tmp_path / "sw" / "lr" / "slurm_job.sh")
    assert out.stdout.strip() == path and "submit it with: sbatch %s" % path in out.stderr
    assert not os.path.exists(path + ".tmp")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700  # a --storage password is in it: the owner's only
    text = open(path).read()
    assert text.startswith("#!/bin/bash\n")
    assert sbatch_lines(text) == [
        "--job-name=sweep-lr", "--array=0-2%2", "--output=%s/slurm-%%A_%%a.out" % (tmp_path / "sw" / "lr"),
        "--open-mode=append", "--ntasks=1", "--cpus-per-task=2", "--mem=8g", "--time=2-00:00:00",
        "--partition=short", "--account=lab", "--signal=B:TERM@300", "--constraint=avx2", "--requeue"]
    # sbatch reads #SBATCH lines only before the first command
    first_command = min(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")) < first_command
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    assert 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" OPENBLAS_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"' \
        in text
    assert "\ncd %s\n" % repo in text
    assert "--gpu 0" not in text  # the comment on CUDA_VISIBLE_DEVICES is for GPU jobs
    argv = worker_argv(text)
    assert argv[:2] == [os.path.join(repo, ".venv", "bin", "python"), os.path.join(repo, "tools", "sweep.py")]
    args = sweep_tool(repo).build_parser().parse_args(argv[2:])  # a command line tools/sweep.py accepts
    copy = str(tmp_path / "sw" / "lr" / "space.json")  # the array's space, fixed at writing
    assert (args.space, args.name, args.trials, args.gpu, args.pruner, args.sampler, args.root, args.storage) == \
        (copy, "lr", 7, "cpu", "threshold", "random", str(tmp_path / "sw"), None)
    assert open(copy).read() == open(space).read() and not os.path.exists(copy + ".tmp")


def test_gpu_job_script_asks_one_gpu_per_task_and_passes_the_storage(repo, lmdb_dir, tmp_path):
    space = slurm_space(tmp_path, lmdb_dir)
    url = "postgresql+psycopg2://sweeper@db.cluster/sweeps?sslmode=require&x=a b"  # & and a blank: quoted
    text = slurm.job_script(space, "space", str(tmp_path / "sweeps" / "space"), tasks=8, storage=url,
                            time="90", repo=repo)
    assert sbatch_lines(text) == [
        "--job-name=sweep-space", "--array=0-7", "--output=%s/slurm-%%A_%%a.out" % (tmp_path / "sweeps" / "space"),
        "--open-mode=append", "--ntasks=1", "--cpus-per-task=%d" % slurm.DEFAULT_CPUS_PER_TASK, "--gres=gpu:1",
        "--time=90", "--signal=B:TERM@%d" % slurm.DEFAULT_STOP_BEFORE]
    assert "# --gpu 0: Slurm's CUDA_VISIBLE_DEVICES shows the worker only the GPU it allocated" in text
    typed = slurm.job_script(space, "space", str(tmp_path / "sweeps" / "space"), gpu_type="a100", repo=repo)
    assert "--gres=gpu:a100:1" in sbatch_lines(typed) and "--gres=gpu:1" not in sbatch_lines(typed)
    argv = worker_argv(text)
    assert argv[argv.index("--gpu") + 1] == "0"  # Slurm's CUDA_VISIBLE_DEVICES makes the allocated GPU number 0
    assert url not in text and "--storage " not in text  # the URL is read from the 0600 file beside the script
    args = sweep_tool(repo).build_parser().parse_args(argv[2:])
    assert (args.gpu, args.storage, args.storage_file, args.trials, args.pruner, args.sampler) == \
        ("0", None, str(tmp_path / "sweeps" / "space" / sweep.STORAGE_FILE), sweep.DEFAULT_TRIALS,
         sweep.DEFAULT_PRUNER, sweep.DEFAULT_SAMPLER)
    path = tmp_path / "job.sh"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


@pytest.mark.parametrize("value, seconds", [("90", 5400), ("1:30", 90), ("2:00:05", 7205), ("1-2", 93600),
                                            ("1-0:30", 88200), ("0-0:0:59", 59), ("UNLIMITED", None),
                                            ("0", None), ("0:00", None), ("0-0", None)])  # sbatch: 0 is no limit
def test_slurm_time_forms(value, seconds):
    assert slurm.time_seconds(value) == seconds


@pytest.mark.parametrize("args, needle", [
    (["missing.yaml"], "missing.yaml: No such file or directory"),
    (["SPACE", "--tasks", "0"], "--tasks must be >= 1, got 0"),
    (["SPACE", "--trials", "0"], "--trials must be >= 1, got 0"),
    (["SPACE", "--max-running", "0"], "--max-running must be >= 1, got 0"),
    (["SPACE", "--device", "tpu"], "unknown --device 'tpu' (valid: gpu, cpu)"),
    (["SPACE", "--pruner", "hyperband"], "unknown --pruner 'hyperband' (valid: asha, median, threshold, none)"),
    (["SPACE", "--sampler", "cmaes"], "unknown --sampler 'cmaes' (valid: tpe, random, grid)"),
    (["SPACE", "--time", "2h"], "--time '2h': expected a Slurm time: minutes, M:S, H:M:S"),
    (["SPACE", "--time", "2", "--stop-before", "120"], "--time 2 (120 s) leaves no training before the "
                                                        "--stop-before 120 s signal"),
    (["SPACE", "--mem", "8GB"], "--mem '8GB': expected a size in MB (16000) or with a unit K, M, G or T"),
    (["SPACE", "--name", "my sweep"], "--name 'my sweep': expected a letter or digit, then letters, digits"),
    (["SPACE", "--name", ".."], "--name '..': expected a letter or digit, then"),  # it would be --root's parent
    (["SPACE", "--name", "."], "--name '.': expected a letter or digit, then"),
    (["SPACE", "--name=-x"], "--name '-x': expected a letter or digit, then"),  # tools/sweep.py: an option
    (["SPACE", "--storage", "db.example.org/sweeps"], "--storage 'db.example.org/sweeps': expected a database URL"),
    (["SPACE", "--storage", "nosuchdb://u:secret@h/db"], "--storage 'nosuchdb://u:***@h/db': expected a database URL"),
    (["SPACE", "--storage", "mysql+mysqldb://u:secret@h/db"], "--storage 'mysql+mysqldb://u:***@h/db': its driver "
                                                               "is not installed in this .venv"),
    (["SPACE", "--storage", "sqlite:///study.db"], "--storage 'sqlite:///study.db': a relative SQLite path"),
    (["SPACE", "--storage", "sqlite://"], "--storage 'sqlite://': an in-memory SQLite database"),
    (["SPACE", "--gpu-type", "a100"], "--gpu-type a100 needs --device gpu"),
    (["SPACE", "--sbatch-arg", "constraint=a100"], "--sbatch-arg 'constraint=a100': expected one sbatch option"),
    (["SPACE", "--sbatch-arg=--array=0-99"], "--sbatch-arg '--array=0-99': --array is written by sweep_slurm"),
    (["SPACE", "--sbatch-arg=--arr=0-99"], "--sbatch-arg '--arr=0-99': --array is written by sweep_slurm"),
    (["SPACE", "--sbatch-arg=-a 0-99"], "--sbatch-arg '-a 0-99': --array is written by sweep_slurm"),
    (["SPACE", "--sbatch-arg=--output=/tmp/x"], "--sbatch-arg '--output=/tmp/x': --output is written by"),
    (["SPACE", "--sbatch-arg=-o/tmp/x"], "--sbatch-arg '-o/tmp/x': --output is written by"),
    (["SPACE", "--sbatch-arg=--error=/tmp/x"], "--sbatch-arg '--error=/tmp/x': --error is written by"),
    (["SPACE", "--sbatch-arg=--signal=USR1@60"], "--sbatch-arg '--signal=USR1@60': --signal is written by"),
    (["SPACE", "--sbatch-arg=--open-mode=truncate"], "'--open-mode=truncate': --open-mode is written by"),
    (["SPACE", "--sbatch-arg=--export=NONE"], "--sbatch-arg '--export=NONE': --export is written by"),
    (["SPACE", "--sbatch-arg=--wrap=true"], "--sbatch-arg '--wrap=true': --wrap is written by"),
    (["SPACE", "--sbatch-arg=--ntasks=2"], "--sbatch-arg '--ntasks=2': --ntasks is written by"),
    (["SPACE", "--sbatch-arg=-n2"], "--sbatch-arg '-n2': --ntasks is written by"),
    (["SPACE", "--sbatch-arg=--comment=x --array=1"], "'--comment=x --array=1': --array is written by"),
    (["SPACE", "--sbatch-arg=--gres=gpu:1"], "--sbatch-arg '--gres=gpu:1': a GPU option, but --device cpu"),
    (["SPACE", "--sbatch-arg=--gpus-per-task=1"], "--sbatch-arg '--gpus-per-task=1': a GPU option, but --device"),
    (["SPACE", "--sbatch-arg=-G1"], "--sbatch-arg '-G1': a GPU option, but --device cpu"),
    # Issue 23: short options clustered after flags, as getopt reads them (-H holds, then -a 0-7).
    (["SPACE", "--sbatch-arg=-Ha0-7"], "--sbatch-arg '-Ha0-7': --array is written by sweep_slurm"),
    (["SPACE", "--sbatch-arg=-Qvo/tmp/x"], "--sbatch-arg '-Qvo/tmp/x': --output is written by"),
    (["SPACE", "--sbatch-arg=-HG1"], "--sbatch-arg '-HG1': a GPU option, but --device cpu"),
    (["SPACE", "--partition", "gpu;rm"], "--partition 'gpu;rm': expected a Slurm name"),
    (["BAD_SPACE"], "params.lr: unknown key (valid: batch_size"),
])
def test_bad_input_is_one_line_and_writes_nothing(repo, lmdb_dir, tmp_path, args, needle):
    space = slurm_space(tmp_path, lmdb_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    bad_space = write_space(bad, lmdb_dir, params={"lr": {"type": "float", "low": 0.1, "high": 1}})
    args = [{"SPACE": space, "BAD_SPACE": bad_space}.get(a, a) for a in args]
    out = sweep_slurm(repo, "--device", "cpu", "--root", tmp_path / "sweeps", *args)  # a later --device wins
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("sweep_slurm.sh: error: ") and needle in out.stderr, out.stderr
    assert not (tmp_path / "sweeps").exists() and out.stdout == ""  # not even the sweep's folder
    assert "secret" not in out.stderr  # a password is never printed


def test_a_name_from_the_file_name_is_checked_and_says_so(repo, lmdb_dir, tmp_path):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    os.rename(slurm_space(spaces, lmdb_dir), str(spaces / "my space.json"))
    out = sweep_slurm(repo, spaces / "my space.json", "--device", "cpu", "--root", tmp_path / "sweeps")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "the study name 'my space' comes from the file name 'my space.json' (no --name): expected a letter or " \
           "digit, then" in out.stderr and "give --name" in out.stderr, out.stderr
    assert not (tmp_path / "sweeps").exists()


def test_write_errors_are_one_line_naming_the_path_and_leave_nothing(repo, lmdb_dir, tmp_path):
    space = slurm_space(tmp_path, lmdb_dir)
    (tmp_path / "a_file").write_text("")
    out = sweep_slurm(repo, space, "--device", "cpu", "--root", tmp_path / "a_file")  # --root is a file
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("sweep_slurm.sh: error: %s: " % (tmp_path / "a_file" / "space")), out.stderr
    assert "Not a directory" in out.stderr and (tmp_path / "a_file").is_file()
    job = tmp_path / "sweeps" / "space" / "slurm_job.sh"
    job.mkdir(parents=True)  # where the script goes is a folder: the rename into place fails
    out = sweep_slurm(repo, space, "--device", "cpu", "--root", tmp_path / "sweeps")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("sweep_slurm.sh: error: %s: " % job) and "Is a directory" in out.stderr, out.stderr
    assert sorted(os.listdir(job.parent)) == ["slurm_job.sh"]  # no slurm_job.sh.tmp, no space.json


def test_the_space_is_copied_and_a_study_keeps_one_space(repo, lmdb_dir, tmp_path):
    """The array's space is the copy beside the job script: editing SPACE later changes nothing
    for a submitted array; another space under the same name is refused."""
    space, root = slurm_space(tmp_path, lmdb_dir), tmp_path / "sweeps"
    assert sweep_slurm(repo, space, "--device", "cpu", "--root", root).returncode == 0
    copy, job = root / "space" / "space.json", root / "space" / "slurm_job.sh"
    assert copy.read_text() == open(space).read() and worker_argv(job.read_text())[2] == str(copy)
    again = sweep_slurm(repo, space, "--device", "cpu", "--root", root, "--tasks", "2")  # the same space: fine
    assert again.returncode == 0, again.stderr
    written = job.read_text()
    with open(space, "w") as f:
        f.write(copy.read_text().replace("0.0005", "0.005"))
    out = sweep_slurm(repo, space, "--device", "cpu", "--root", root, "--tasks", "3")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "study 'space' already has a different space, %s" % copy in out.stderr and "--name" in out.stderr
    assert job.read_text() == written and "0.005" not in copy.read_text()  # nothing rewritten


def test_the_copy_finds_an_lmdb_dir_given_relative_to_the_space_file(repo, lmdb_dir, tmp_path):
    """lmdb_dir relative to SPACE's folder would not resolve from sweeps/<name>/: the copy has it absolute."""
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    os.symlink(lmdb_dir, str(spaces / "lmdb_here"))
    space = write_space(spaces, "lmdb_here")
    out = sweep_slurm(repo, space, "--device", "cpu", "--root", tmp_path / "sweeps")
    assert out.returncode == 0, out.stderr
    copy = str(tmp_path / "sweeps" / "space" / "space.json")
    assert sweep.load_space(copy)["lmdb_dir"] == sweep.load_space(space)["lmdb_dir"] == str(spaces / "lmdb_here")
    assert json.load(open(copy))["lmdb_dir"] == str(spaces / "lmdb_here")


def fake_sbatch(folder, body):
    """An sbatch that runs body (sh): on PATH before the real one."""
    folder.mkdir()
    path = folder / "sbatch"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return dict(os.environ, PATH="%s:%s" % (folder, os.environ.get("PATH", "")))


def test_a_storage_password_is_in_the_private_script_only(repo, lmdb_dir, tmp_path):
    space = slurm_space(tmp_path, lmdb_dir)
    url = "postgresql+psycopg2://sweeper:secret@db.cluster/sweeps"
    env = fake_sbatch(tmp_path / "bin", "echo 4242")
    out = sweep_slurm(repo, space, "--device", "cpu", "--root", tmp_path / "sweeps", "--storage", url, "--submit",
                      env=env)
    assert out.returncode == 0 and out.stdout.strip() == "4242", out.stderr
    assert "secret" not in out.stderr and "tools/sweep.py --report space --root %s --storage-file %s" % (
        tmp_path / "sweeps", tmp_path / "sweeps" / "space" / sweep.STORAGE_FILE) in out.stderr, out.stderr
    job = tmp_path / "sweeps" / "space" / "slurm_job.sh"
    argv = worker_argv(job.read_text())
    assert "secret" not in job.read_text()  # nor in any node's `ps`: the workers read the URL from a file
    url_file = tmp_path / "sweeps" / "space" / sweep.STORAGE_FILE
    assert argv[argv.index("--storage-file") + 1] == str(url_file)
    assert url_file.read_text() == url + "\n" and stat.S_IMODE(url_file.stat().st_mode) == 0o600
    assert sweep.storage_url(None, str(url_file)) == url
    assert stat.S_IMODE(job.stat().st_mode) == 0o700


def test_sbatch_refusing_or_hanging_says_the_script_is_written(repo, lmdb_dir, tmp_path, monkeypatch):
    space = slurm_space(tmp_path, lmdb_dir)
    env = fake_sbatch(tmp_path / "bin", "echo 'sbatch: error: Invalid account or account/partition combination' >&2"
                                        "; exit 1")
    out = sweep_slurm(repo, space, "--device", "cpu", "--root", tmp_path / "sweeps", "--submit", env=env)
    job = tmp_path / "sweeps" / "space" / "slurm_job.sh"
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "sbatch %s failed (exit 1): sbatch: error: Invalid account or account/partition combination; the job " \
           "script is written: fix that and submit it with: sbatch %s" % (job, job) in out.stderr, out.stderr
    assert job.is_file()
    fake_sbatch(tmp_path / "slow", "exec sleep 30")
    monkeypatch.setenv("PATH", "%s:%s" % (tmp_path / "slow", os.environ.get("PATH", "")))
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT", 1)
    started = time.time()
    with pytest.raises(slurm.SlurmError) as raised:
        slurm.submit(str(job))
    assert time.time() - started < 10
    assert str(raised.value) == ("sbatch %s: no answer in 1 s (is slurmctld reachable?); the job script is written: "
                                 "see squeue whether it was queued, else submit it with: sbatch %s" % (job, job))


def test_gpu_on_a_cpu_only_build_and_submit_without_sbatch(repo, lmdb_dir, tmp_path):
    """Every task would fail on a CPU-only Caffe; --submit without Slurm's client says so and
    leaves the written script for a login node."""
    from tinycaffe import runs
    space = slurm_space(tmp_path, lmdb_dir)
    if runs.caffe_flavour() != "cuda":
        out = sweep_slurm(repo, space, "--root", tmp_path / "sweeps")
        assert out.returncode == 1 and "--device gpu, but this Caffe is a CPU-only build" in out.stderr
        assert not (tmp_path / "sweeps" / "space" / "slurm_job.sh").exists()
    out = subprocess.run([sys.executable, "tools/sweep_slurm.py", space, "--device", "cpu", "--root",
                          str(tmp_path / "sweeps"), "--submit"], cwd=repo, capture_output=True, text=True,
                         env=dict(os.environ, PATH=str(tmp_path)))  # no sbatch on this PATH
    path = tmp_path / "sweeps" / "space" / "slurm_job.sh"
    assert out.returncode == 1 and out.stderr.startswith("sweep_slurm.py: error: ") and \
        len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--submit: no sbatch on PATH" in out.stderr and "sbatch %s" % path in out.stderr and path.is_file()


# ---------------------------------------------------------------- SIGTERM between trials
def test_sigterm_between_trials_stops_the_worker_with_status_130(repo, lmdb_dir, tmp_path):
    """Slurm's time-limit signal may come when no trial is training (here: the worker waits for the
    study's journal lock, held by "another worker"): the worker stops as on Ctrl-C, one line and
    130, never killed silently by the signal."""
    space, root = slurm_space(tmp_path, lmdb_dir), tmp_path / "sweeps"
    folder = root / "space"
    folder.mkdir(parents=True)
    (folder / sweep.JOURNAL).write_text("")
    os.symlink(str(folder / sweep.JOURNAL), str(folder / (sweep.JOURNAL + ".lock")))  # Optuna's file lock, held
    worker = subprocess.Popen([sys.executable, "tools/sweep.py", space, "--trials", "1", "--root", str(root)],
                              cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # it is waiting for the lock (Optuna breaks a lock only after 30 s)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 130, (worker.returncode, err[-2000:])
    assert err.strip().splitlines() == ["sweep.py: stopped by a signal between trials (Ctrl-C or SIGTERM); run the "
                                        "same command to continue the study"]


# ---------------------------------------------------------------- a real Slurm cluster
class Cluster:
    def __init__(self, home):
        self.home = home
        self.env = dict(os.environ, SLURM_CONF=os.path.join(home, "slurm.conf"), PATH=SBIN_PATH)

    def run(self, *command, check=True, timeout=60):
        out = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError("%s: exit %d: %s%s" % (" ".join(command), out.returncode, out.stderr, self.logs()))
        return out

    def logs(self):
        said = []
        for name in ("munge/log", "slurmctld.log", "slurmd.log"):
            try:
                with open(os.path.join(self.home, name)) as f:
                    said.append("\n--- %s (end):\n%s" % (name, "".join(f.readlines()[-25:])))
            except OSError:
                said.append("\n--- %s: not written" % name)
        return "".join(said)

    def jobs(self, job):
        """{array task id: {field: value}} of a job, while Slurm still holds it (MinJobAge)."""
        out = self.run("scontrol", "show", "job", "-o", str(job), check=False)
        tasks = {}
        for line in out.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            tasks[fields.get("ArrayTaskId", "")] = fields
        return tasks

    def wait(self, job, timeout):
        """Until every task of the job has ended; -> {task: fields}."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            tasks = self.jobs(job)
            if tasks and all(t["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                               "NODE_FAIL") for t in tasks.values()):
                return tasks
            time.sleep(1)
        raise AssertionError("job %s not done after %d s: %s%s" % (job, timeout, tasks, self.logs()))


def free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(home, host, ports, cpus):
    """A one-node cluster: everything as root, no cgroups (linuxproc, task/none), no accounting."""
    return "\n".join([
        "ClusterName=tinycaffe",
        "SlurmctldHost=%s(127.0.0.1)" % host,
        "AuthType=auth/munge", "AuthInfo=socket=%s/munge/sock" % home, "CredType=cred/munge",
        "SlurmUser=root", "SlurmdUser=root", "SlurmctldPort=%d" % ports[0], "SlurmdPort=%d" % ports[1],
        "StateSaveLocation=%s/state" % home, "SlurmdSpoolDir=%s/spool" % home,
        "SlurmctldPidFile=%s/slurmctld.pid" % home, "SlurmdPidFile=%s/slurmd.pid" % home,
        "SlurmctldLogFile=%s/slurmctld.log" % home, "SlurmdLogFile=%s/slurmd.log" % home,
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SwitchType=switch/none", "MpiDefault=none",
        "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "ReturnToService=2", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "KillWait=30",  # seconds between scancel's (or the time limit's) SIGTERM and SIGKILL
        "MinJobAge=600",  # ended jobs stay in `scontrol show job` (no sacct without accounting)
        # slurmd insists on its real host name
        "NodeName=%s NodeAddr=127.0.0.1 CPUs=%d State=UNKNOWN" % (host, cpus),
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def _pid(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pid, grace):
    """Wait for a daemon to exit; SIGKILL it after grace seconds."""
    deadline = time.time() + grace
    while pid and sweep_recovery._alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if pid and sweep_recovery._alive(pid):
        os.kill(pid, signal.SIGKILL)


def _started_by(conf):
    """Processes whose environment names this cluster's slurm.conf: its daemons, and its jobs
    (they inherit the submitter's environment), even ones orphaned past Slurm's process tracking."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                if ("SLURM_CONF=%s" % conf).encode() in f.read().split(b"\0") and int(entry) != os.getpid():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


@pytest.fixture(scope="module")
def slurm_cluster():
    """munged, slurmctld and slurmd in a temp folder (one CPU-only node: this machine), stopped
    and removed afterwards. Skipped only without root or without the packages (scripts/setup.sh
    installs them); packages present but a cluster that does not start is a failure."""
    missing = [b for b in DAEMONS + CLIENTS if not shutil.which(b, path=SBIN_PATH)]
    if os.geteuid() != 0 or missing:
        pytest.skip("needs root and Debian's munge, slurmctld, slurmd and slurm-client (missing: %s)"
                    % (", ".join(missing) or "none; not root"))
    home = tempfile.mkdtemp(prefix="tinycaffe-slurm-")  # short: the munge socket path has a length limit
    cluster = Cluster(home)
    for sub in ("munge", "state", "spool"):
        os.makedirs(os.path.join(home, sub), mode=0o700)
    key = os.path.join(home, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    host = socket.gethostname().split(".")[0]
    with open(cluster.env["SLURM_CONF"], "w") as f:
        f.write(slurm_conf(home, host, free_ports(2), os.cpu_count() or 2))
    try:
        try:
            cluster.run("munged", "--force", "-S", home + "/munge/sock", "--key-file=" + key,
                        "--log-file=%s/munge/log" % home, "--pid-file=%s/munge/pid" % home,
                        "--seed-file=%s/munge/seed" % home)
            cluster.run("slurmctld", "-i")
            cluster.run("slurmd")
            deadline = time.time() + 60
            while cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() != "idle":
                if time.time() > deadline:
                    raise RuntimeError("the node is not idle after 60 s: sinfo says %r%s" % (
                        cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip(), cluster.logs()))
                time.sleep(0.5)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            pytest.fail("the one-node Slurm cluster did not start: %s" % exc, pytrace=False)
        yield cluster
    finally:
        if _pid(home + "/slurmctld.pid"):
            cluster.run("scancel", "--user", "root", check=False)  # a job of a failed test: SIGTERM, KillWait
            deadline = time.time() + 45
            while cluster.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(1)
            cluster.run("scontrol", "shutdown", check=False)  # slurmctld and every slurmd
        for daemon in ("slurmctld", "slurmd"):
            _stop(_pid("%s/%s.pid" % (home, daemon)), 20)
        munged = _pid(home + "/munge/pid")
        if munged:
            cluster.run("munged", "-s", "-S", home + "/munge/sock", check=False)
            _stop(munged, 10)
        left = _started_by(cluster.env["SLURM_CONF"])
        for pid in left:  # a job's worker that outlived its job (a failed test): it would train on
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
        assert not left, "processes of the cluster's jobs outlived it (killed now): %s" % left


def submit(repo, cluster, space, root, tasks, trials, sampler="random"):
    out = sweep_slurm(repo, space, "--tasks", tasks, "--trials", trials, "--device", "cpu", "--cpus-per-task", 1,
                      "--pruner", "none", "--sampler", sampler, "--root", root, "--submit", env=cluster.env)
    assert out.returncode == 0, out.stderr + cluster.logs()
    job = int(out.stdout.strip())
    assert "submitted job %d (%d task(s))" % (job, tasks) in out.stderr
    return job


def test_array_of_two_workers_on_a_real_slurm(repo, lmdb_dir, tmp_path, slurm_cluster):
    """Two array tasks, two workers at once (one CPU each) on one file journal; both trials finish."""
    space, root = slurm_space(tmp_path, lmdb_dir), tmp_path / "sweeps"
    job = submit(repo, slurm_cluster, space, root, 2, 2)
    tasks = slurm_cluster.wait(job, 300)
    assert sorted(tasks) == ["0", "1"], tasks
    assert {(t["JobState"], t["ExitCode"]) for t in tasks.values()} == {("COMPLETED", "0:0")}, tasks
    for task in ("0", "1"):
        said = (root / "space" / ("slurm-%d_%s.out" % (job, task))).read_text()
        assert "[sweep_slurm] job %d task %s on " % (job, task) in said and "[sweep] done" in said, said[-3000:]
    trials = trials_of(root)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # the worker that finishes first starts one more trial while the other's is still training
    assert 2 <= len(complete) == len(trials) <= 3, [(t.number, t.state.name) for t in trials]
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) == 2  # two workers told trials
    assert {t.user_attrs["worker"]["gpu"] for t in complete} == {"cpu"}
    for t in complete:
        run_dir = t.user_attrs["run_dir"]
        assert run_dir == str(root / "space" / ("trial_%d" % t.number))
        record = json.load(open(os.path.join(run_dir, "run.json")))
        assert record["status"] == "finished" and record["final"]["iterations"] == 60
        assert os.path.isfile(os.path.join(run_dir, "snapshots", "tiny_iter_60.caffemodel"))
        assert t.value == record["final"]["accuracy_top1"]  # the final snapshot's: what --from-sweep submits
    first_two = sorted(complete, key=lambda t: t.number)[:2]
    assert max(t.datetime_start for t in first_two) < min(t.datetime_complete for t in first_two)  # at once


@pytest.mark.parametrize("scancel, state", [
    ([], "CANCELLED"),  # scancel: SIGTERM to every process of the job (the worker and its caffe), then SIGKILL
    (["--batch", "--signal=TERM"], "FAILED"),  # the batch shell only, as --signal=B:TERM@N does before the limit
], ids=["scancel", "time-limit-signal"])
def test_scancel_stops_the_trial_with_a_snapshot(repo, lmdb_dir, tmp_path, slurm_cluster, scancel, state):
    """SIGTERM from Slurm: the trial snapshots where it is, is FAIL in the study (never a result),
    and the worker says so and exits 130. Sent to the batch shell only, it reaches Caffe only
    because the script exec'd the worker, which passes it on."""
    space, root = slurm_space(tmp_path, lmdb_dir, max_iter=100000), tmp_path / "sweeps"
    job = submit(repo, slurm_cluster, space, root, 1, 1)
    log = root / "space" / "trial_0" / "caffe.log"
    deadline = time.time() + 120
    while time.time() < deadline:  # training, past its first test
        text = log.read_text() if log.exists() else ""
        done = [int(n) for n in re.findall(r"Iteration (\d+) \(.*\), loss", text)]
        if done and max(done) > 50:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("trial 0 not past iteration 50 after 120 s%s" % slurm_cluster.logs())
    slurm_cluster.run("scancel", *scancel, str(job))
    [task] = slurm_cluster.wait(job, 60).values()
    assert (task["JobState"], task["ExitCode"]) == (state, "130:0"), task
    said = (root / "space" / ("slurm-%d_0.out" % job)).read_text()
    trial, retry = trials_of(root)
    assert trial.state.name == "FAIL" and trial.value is None
    # Not a result, and not lost: its point is queued again, for the next submission of the same study.
    assert retry.state.name == "WAITING" and retry.params == trial.params
    assert trial.user_attrs["reason"].startswith("lost: stopped by a signal")
    record = json.load(open(root / "space" / "trial_0" / "run.json"))
    stopped = record["final"]["iterations"]
    assert record["status"] == "interrupted" and stopped > 50
    assert "[sweep] trial 0 stopped by a signal at iteration %d" % stopped in said, said[-3000:]
    snapshots = sorted(os.listdir(root / "space" / "trial_0" / "snapshots"))
    assert snapshots == ["tiny_iter_%d.caffemodel" % stopped, "tiny_iter_%d.solverstate" % stopped]


def test_a_worker_killed_on_slurm_loses_no_grid_point(repo, lmdb_dir, tmp_path, slurm_cluster):
    """Two array tasks on a 3-point grid; one worker gets SIGKILL mid-trial (a node failure, an OOM
    kill): its Caffe dies with it, the other worker fails the lost trial and runs its point again;
    a second submission (the resume) trains nothing more. Every point completes exactly once, and
    the report's numbers are the ones --from-sweep submits."""
    space = write_space(tmp_path, lmdb_dir, budget={"max_iter": 60, "test_interval": 50},
                        params={"base_lr": {"type": "categorical", "choices": [0.02, 0.01, 0.005]}}, pruner={})
    root = tmp_path / "sweeps"
    job = submit(repo, slurm_cluster, space, root, 2, 3, sampler="grid")
    deadline, victim = time.time() + 120, None
    while time.time() < deadline and victim is None:
        for t in trials_of(root):
            log = os.path.join(t.user_attrs.get("run_dir", "/nonexistent"), "caffe.log")
            if t.state.name == "RUNNING" and os.path.isfile(log) and "Iteration 20" in open(log).read():
                victim = t
                break
        time.sleep(0.2)
    assert victim is not None, "no trial reached iteration 20" + slurm_cluster.logs()
    pid = victim.user_attrs["worker"]["pid"]
    caffe = [int(p) for p in subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True,
                                            text=True).stdout.split()]
    os.kill(pid, signal.SIGKILL)
    tasks = slurm_cluster.wait(job, 300)
    assert sorted(t["JobState"] for t in tasks.values()) == ["COMPLETED", "FAILED"], tasks
    assert caffe and not any(os.path.exists("/proc/%d" % c) for c in caffe), "Caffe outlived its worker"
    again = submit(repo, slurm_cluster, space, root, 1, 3, sampler="grid")  # the resume: nothing is missing
    [task] = slurm_cluster.wait(again, 120).values()
    assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), task
    trials = trials_of(root)
    by_point = {}
    for t in trials:
        by_point.setdefault(t.system_attrs["grid_id"], []).append(t)
    assert sorted(by_point) == [0, 1, 2]
    for point in by_point.values():
        assert [t.state.name for t in point].count("COMPLETE") == 1, [(t.number, t.state.name) for t in point]
    lost = next(t for t in trials if t.number == victim.number)
    assert lost.state.name == "FAIL" and lost.user_attrs["reason"].startswith("lost: its worker (pid %d" % pid)
    assert json.load(open(os.path.join(lost.user_attrs["run_dir"], "run.json")))["status"] == "failed"
    report = subprocess.run([sys.executable, "tools/sweep.py", "--report", "space", "--root", str(root)], cwd=repo,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    with open(root / "space" / "report.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "complete"]
    out = subprocess.run([sys.executable, "tools/make_submission.py", "--from-sweep", "space", "--top", "3",
                          "--sweeps-root", str(root), "--lmdb", os.path.join(lmdb_dir, "test_lmdb"),
                          "--val-lmdb", os.path.join(lmdb_dir, "val_lmdb"), "--gpu", "cpu",
                          "--out", str(tmp_path / "submission.txt")], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    submitted = [float(line.split()[2]) for line in out.stdout.splitlines()
                 if line.startswith("val top-1") and "ensemble" not in line]
    assert submitted == pytest.approx([float(r["top1"]) for r in rows], abs=1e-6)
