"""Sweeps on a Slurm cluster: one job array, each array task one sweep worker on one GPU (or
on the CPUs it was given) against the study's shared storage.

The job script is written to sweeps/<name>/slurm_job.sh (the record of how the array was
made) and, asked to, submitted with `sbatch --parsable`. Every path in it is absolute: the
nodes share the filesystem, not the submitter's working directory. The worker is exec'd, so
it IS the batch shell and gets the `--signal=B:TERM@<stop_before>` SIGTERM itself: it then
stops its trial with a snapshot (status interrupted, the trial FAIL in the study, exit 130)
before Slurm's own SIGTERM and SIGKILL at the time limit.
"""
import datetime
import os
import re
import shlex
import subprocess

from . import REPO_ROOT, runs, sweep
from .files import write_text

# ---------------------------------------------------------------- defaults
DEFAULT_TASKS = 4  # array size: workers, one per GPU (or per --cpus-per-task CPUs)
DEFAULT_MAX_RUNNING = None  # the array's %M: how many of them may run at once (None: no limit)
DEFAULT_DEVICE = "gpu"  # gpu: --gres=gpu:1 and the worker on the GPU Slurm gave it
DEFAULT_CPUS_PER_TASK = 4  # LMDB reading, the transformer, and the BLAS of a CPU worker
DEFAULT_STOP_BEFORE = 120  # seconds before the time limit that the worker gets SIGTERM and snapshots
JOB_SCRIPT = "slurm_job.sh"  # its name inside sweeps/<name>/
DEVICES = ("gpu", "cpu")

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and UNLIMITED/INFINITE).
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
_MEM = re.compile(r"^\d+[KMGT]?$")  # --mem: a size in MB, or with a unit
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # the job's name and a folder name


class SlurmError(sweep.SweepError):
    """Bad arguments, or sbatch missing or refusing the job: one line."""


def time_seconds(value):
    """Slurm's --time text -> seconds (None for UNLIMITED/INFINITE); SlurmError when it is no time."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(value)
    if not m:
        raise SlurmError("--time '%s': expected a Slurm time: minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S" % value)
    days, hours, minutes, seconds, m_only, m_s, h_m_s = m.groups()
    if days is not None:  # D-H[:M[:S]]
        return ((int(days) * 24 + int(hours)) * 60 + int(minutes or 0)) * 60 + int(seconds or 0)
    if h_m_s is not None:  # H:M:S
        return (int(m_only) * 60 + int(m_s)) * 60 + int(h_m_s)
    return int(m_only) * 60 + int(m_s or 0)  # M or M:S


def check(space_path, name, tasks, max_running, trials, pruner, sampler, device, cpus_per_task, mem, time,
          partition, account, stop_before, sbatch_args):
    """Every argument checked before anything is written; -> the loaded space."""
    space = sweep.load_space(space_path)
    sweep.make_pruner(pruner, space["pruner"])
    sweep.make_sampler(sampler, space)
    if not _NAME.match(name):
        raise SlurmError("--name '%s': expected letters, digits, '.', '_' or '-' (it names the job and its folder)"
                         % name)
    for flag, value in (("--tasks", tasks), ("--trials", trials), ("--cpus-per-task", cpus_per_task)):
        if value < 1:
            raise SlurmError("%s must be >= 1, got %d" % (flag, value))
    if max_running is not None and max_running < 1:
        raise SlurmError("--max-running must be >= 1, got %d" % max_running)
    if device not in DEVICES:
        raise SlurmError("unknown --device '%s' (valid: %s)" % (device, ", ".join(DEVICES)))
    if device == "gpu" and runs.caffe_flavour() != "cuda":  # the nodes run this checkout's Caffe
        raise SlurmError("--device gpu, but this Caffe is a CPU-only build: every task would fail; use --device cpu, "
                         "or build the CUDA flavour (scripts/setup.sh --cuda)")
    if mem is not None and not _MEM.match(mem):
        raise SlurmError("--mem '%s': expected a size such as 16G or 16000 (MB), a number with K, M, G or T" % mem)
    if not 1 <= stop_before <= 65535:  # the limit of sbatch's --signal
        raise SlurmError("--stop-before must be 1..65535 seconds, got %d" % stop_before)
    limit = time_seconds(time) if time is not None else None
    if limit is not None and limit <= stop_before:
        raise SlurmError("--time %s (%d s) leaves no training before the --stop-before %d s signal"
                         % (time, limit, stop_before))
    for flag, value in (("--partition", partition), ("--account", account)):
        if value is not None and not _NAME.match(value):
            raise SlurmError("%s '%s': expected a Slurm name (letters, digits, '.', '_', '-')" % (flag, value))
    for arg in sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise SlurmError("--sbatch-arg '%s': expected one sbatch option, e.g. --constraint=a100" % arg)
    return space


def job_script(space_path, name, sweep_dir, tasks=DEFAULT_TASKS, max_running=DEFAULT_MAX_RUNNING,
               trials=sweep.DEFAULT_TRIALS, storage=None, pruner=sweep.DEFAULT_PRUNER,
               sampler=sweep.DEFAULT_SAMPLER, device=DEFAULT_DEVICE, cpus_per_task=DEFAULT_CPUS_PER_TASK, mem=None,
               time=None, partition=None, account=None, stop_before=DEFAULT_STOP_BEFORE, sbatch_args=(),
               command=None, repo=REPO_ROOT):
    """The text of the sbatch script: an array of `tasks` workers of sweep `name`."""
    sweep_dir = os.path.abspath(sweep_dir)
    if re.search(r"[\s%'\"\\]", sweep_dir):  # it goes unquoted into #SBATCH --output, where % is a pattern
        raise SlurmError("%s: the sweep folder's path must have no blanks, quotes, backslashes or %%, since "
                         "sbatch's --output takes it as it is (use --root)" % sweep_dir)
    array = "0-%d" % (tasks - 1) + ("%%%d" % max_running if max_running else "")
    lines = ["#!/bin/bash",
             "# Sweep '%s': %d Slurm array task(s), each one worker of tools/sweep.py against the study's storage."
             % (name, tasks),
             "# Written %s by: %s" % (datetime.datetime.now().isoformat(timespec="seconds"),
                                      " ".join((command or "tinycaffe.slurm").split())),  # one comment line, whatever was typed
             "# Submit: sbatch %s" % shlex.quote(os.path.join(sweep_dir, JOB_SCRIPT)),
             "#SBATCH --job-name=sweep-%s" % name,
             "#SBATCH --array=%s" % array,
             "#SBATCH --output=%s" % os.path.join(sweep_dir, "slurm-%A_%a.out"),
             "#SBATCH --open-mode=append",  # a requeued task adds to its file
             "#SBATCH --ntasks=1",
             "#SBATCH --cpus-per-task=%d" % cpus_per_task]
    if device == "gpu":
        lines.append("#SBATCH --gres=gpu:1")
    if mem is not None:
        lines.append("#SBATCH --mem=%s" % mem)
    if time is not None:
        lines.append("#SBATCH --time=%s" % time)
    if partition is not None:
        lines.append("#SBATCH --partition=%s" % partition)
    if account is not None:
        lines.append("#SBATCH --account=%s" % account)
    # B: the batch shell only, which is the worker (exec below); it forwards SIGINT to Caffe.
    lines.append("#SBATCH --signal=B:TERM@%d" % stop_before)
    lines += ["#SBATCH %s" % arg for arg in sbatch_args]
    python = os.path.join(repo, ".venv", "bin", "python")
    worker = [python, os.path.join(repo, "tools", "sweep.py"), os.path.abspath(space_path), "--name", name,
              "--trials", str(trials), "--gpu", "0" if device == "gpu" else "cpu", "--pruner", pruner,
              "--sampler", sampler, "--root", os.path.dirname(sweep_dir)]
    if storage:
        worker += ["--storage", storage]
    lines += ["",
              "export PYTHONUNBUFFERED=1  # the output file shows each line when it is written",
              "# Slurm's allocation, not the node's cores: a CPU worker's BLAS would use every core of a shared node.",
              'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" OPENBLAS_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
              'echo "[sweep_slurm] job ${SLURM_ARRAY_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:-?} on $(hostname)'
              ' (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}) at $(date -Is)"',
              "cd %s" % shlex.quote(repo),
              "# --gpu 0: Slurm's CUDA_VISIBLE_DEVICES shows the worker only the GPU it allocated, as device 0.",
              "exec %s" % " ".join(shlex.quote(part) for part in worker),
              ""]
    return "\n".join(lines)


def write(space_path, name=None, root=None, tasks=DEFAULT_TASKS, max_running=DEFAULT_MAX_RUNNING,
          trials=sweep.DEFAULT_TRIALS, storage=None, pruner=sweep.DEFAULT_PRUNER, sampler=sweep.DEFAULT_SAMPLER,
          device=DEFAULT_DEVICE, cpus_per_task=DEFAULT_CPUS_PER_TASK, mem=None, time=None, partition=None,
          account=None, stop_before=DEFAULT_STOP_BEFORE, sbatch_args=(), command=None):
    """Check everything, then write sweeps/<name>/slurm_job.sh atomically; -> its path."""
    name = name or os.path.splitext(os.path.basename(space_path))[0]
    check(space_path, name, tasks, max_running, trials, pruner, sampler, device, cpus_per_task, mem, time,
          partition, account, stop_before, sbatch_args)
    sweep_dir = sweep._sweep_dir(name, root)
    text = job_script(space_path, name, sweep_dir, tasks, max_running, trials, storage, pruner, sampler, device,
                      cpus_per_task, mem, time, partition, account, stop_before, sbatch_args, command)
    os.makedirs(sweep_dir, exist_ok=True)  # Slurm creates no folder for --output: the tasks would fail
    path = os.path.join(sweep_dir, JOB_SCRIPT)
    write_text(path, text)
    os.chmod(path, 0o755)
    return path


def submit(path):
    """sbatch --parsable PATH -> the job id."""
    try:
        out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    except FileNotFoundError:
        raise SlurmError("--submit: no sbatch on PATH (Slurm's client, Debian's slurm-client); the job script is "
                         "written: submit it on a login node with: sbatch %s" % path)
    if out.returncode != 0:
        said = " ".join(out.stderr.split()) or "no message"
        raise SlurmError("sbatch %s failed (exit %d): %s" % (path, out.returncode, said))
    job = out.stdout.strip().split(";")[0]  # "<id>[;<cluster>]"
    if not job.isdigit():
        raise SlurmError("sbatch %s: expected a job id, got %r" % (path, out.stdout.strip()))
    return int(job)

