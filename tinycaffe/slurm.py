"""Sweeps on a Slurm cluster: one job array, each array task one sweep worker on one GPU (or
on the CPUs it was given) against the study's shared storage.

The job script is written to sweeps/<name>/slurm_job.sh (the record of how the array was
made) beside a copy of the space, sweeps/<name>/space.<ext>, which the workers read: the
array's space is fixed when the script is written. Asked to, it is submitted with `sbatch
--parsable`. Every path in it is absolute: the nodes share the filesystem, not the
submitter's working directory. The script is its owner's only (0700), as a --storage URL
may hold a password; that password is never printed.

The worker is exec'd, so it IS the batch shell and gets the `--signal=B:TERM@<stop_before>`
SIGTERM itself: it then stops its trial with a snapshot (status interrupted, the trial FAIL
in the study, exit 130) before Slurm's own SIGTERM and SIGKILL at the time limit. Nothing
resumes that trial: submitting again starts new ones.
"""
import contextlib
import datetime
import glob
import json
import os
import re
import shlex
import subprocess

from . import REPO_ROOT, gen, runs, sweep
from .files import atomic_open

# ---------------------------------------------------------------- defaults
DEFAULT_TASKS = 4  # array size: workers, one per GPU (or per --cpus-per-task CPUs)
DEFAULT_MAX_RUNNING = None  # the array's %M: how many of them may run at once (None: no limit)
DEFAULT_DEVICE = "gpu"  # gpu: --gres=gpu:1 and the worker on the GPU Slurm gave it
DEFAULT_CPUS_PER_TASK = 4  # LMDB reading, the transformer, and the BLAS of a CPU worker
DEFAULT_STOP_BEFORE = 120  # seconds before the time limit that the worker gets SIGTERM and snapshots
JOB_SCRIPT = "slurm_job.sh"  # its name inside sweeps/<name>/
SPACE_COPY = "space"  # sweeps/<name>/space.<SPACE's extension>: the space every task of the array reads
SBATCH_TIMEOUT = 60  # seconds sbatch may take; it waits on slurmctld, which may be unreachable
DEVICES = ("gpu", "cpu")

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and UNLIMITED/INFINITE).
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
_MEM = re.compile(r"^\d+[KMGTkmgt]?$")  # --mem: a size in MB, or with a unit (sbatch 22.05 takes either case)
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # a Slurm partition, account or GPU type
# The study: a folder under --root and an argument of tools/sweep.py, so never '.', '..' or an option.
_STUDY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_STUDY_RULE = "expected a letter or digit, then letters, digits, '.', '_' or '-' (it names the job and its folder)"

# sbatch options the script sets and depends on -> what to do instead. sbatch also takes any
# unambiguous abbreviation of a long name (--arr=4), so those are refused too.
_OWN_OPTIONS = {
    "array": "use --tasks and --max-running",
    "output": "each task writes sweeps/<name>/slurm-<job>_<task>.out",
    "error": "each task writes sweeps/<name>/slurm-<job>_<task>.out",
    "open-mode": "a requeued task appends to its output",
    "signal": "use --stop-before",
    "export": "the workers take $TINYCAFFE_HOME and the rest of the submitter's environment",
    "wrap": "the job script is the job",
    "ntasks": "one worker per task: use --tasks for more",
}
_GPU_OPTIONS = ("gres", "gpus", "gpus-per-node", "gpus-per-socket", "gpus-per-task", "gpu-bind", "gpu-freq",
                "cpus-per-gpu", "mem-per-gpu")  # refused with --device cpu
_SHORT = {"array": "a", "output": "o", "error": "e", "ntasks": "n", "gpus": "G"}
_FULL_NAMES = {"mem"}  # sbatch options whose full name begins a refused one's (mem-per-gpu): never abbreviations
# sbatch's short options that take no argument: getopt reads the next letter of the same word as
# another option (-Ha0-7 is -H -a 0-7); any other letter takes the rest of the word as its value.
_SHORT_FLAGS = set("HhOQsuVvW")


class SlurmError(sweep.SweepError):
    """Bad arguments, or sbatch missing or refusing the job: one line."""


def time_seconds(value):
    """Slurm's --time text -> seconds (None for UNLIMITED/INFINITE, and for 0, which sbatch reads as "no
    limit"); SlurmError when it is no time."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(value)
    if not m:
        raise SlurmError("--time '%s': expected a Slurm time: minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S" % value)
    days, hours, minutes, seconds, m_only, m_s, h_m_s = m.groups()
    if days is not None:  # D-H[:M[:S]]
        total = ((int(days) * 24 + int(hours)) * 60 + int(minutes or 0)) * 60 + int(seconds or 0)
    elif h_m_s is not None:  # H:M:S
        total = (int(m_only) * 60 + int(m_s)) * 60 + int(h_m_s)
    else:
        total = int(m_only) * 60 + int(m_s or 0)  # M or M:S
    return total or None


masked = sweep.masked  # a URL with its password as ***, for anything printed


def study_name(space_path, name=None):
    """--name, or SPACE's file name without extension; SlurmError when it cannot name a folder."""
    if name is not None:
        if not _STUDY.match(name):
            raise SlurmError("--name '%s': %s" % (name, _STUDY_RULE))
        return name
    base = os.path.basename(space_path)
    name = os.path.splitext(base)[0]
    if not _STUDY.match(name):
        raise SlurmError("the study name '%s' comes from the file name '%s' (no --name): %s; give --name"
                         % (name, base, _STUDY_RULE))
    return name


def check_storage(url):
    """--storage: a URL SQLAlchemy parses, of a dialect and driver this .venv has (the nodes run
    it), and no SQLite file relative to a working directory the nodes do not share."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise SlurmError("--storage '%s': expected a database URL dialect[+driver]://..., e.g. "
                         "postgresql+psycopg2://USER@HOST/DB (%s)" % (masked(url), " ".join(str(exc).split())))
    except ImportError as exc:
        raise SlurmError("--storage '%s': its driver is not installed in this .venv, which the nodes run (%s); "
                         "name one that is, e.g. postgresql+psycopg2://" % (masked(url), exc))
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise SlurmError("--storage '%s': an in-memory SQLite database is each worker's own, not a shared study; "
                             "give a file: sqlite:////shared/path/study.db" % masked(url))
        if not os.path.isabs(parsed.database):
            raise SlurmError("--storage '%s': a relative SQLite path, but the nodes do not share this working "
                             "directory; give it absolute: sqlite:////shared/path/study.db" % masked(url))


def check_sbatch_arg(arg, device):
    """One --sbatch-arg: an sbatch option that none of the script's own options overrides."""
    try:
        words = shlex.split(arg)  # sbatch splits an #SBATCH line into words too: each may be an option
    except ValueError:
        words = []
    if not words or not words[0].startswith("-") or "\n" in arg:
        raise SlurmError("--sbatch-arg '%s': expected one sbatch option, e.g. --constraint=a100" % arg)
    for word in words:
        own = _option_names(word, _OWN_OPTIONS)
        if own:
            raise SlurmError("--sbatch-arg '%s': --%s is written by sweep_slurm itself (%s)"
                             % (arg, own[0], _OWN_OPTIONS[own[0]]))
        if device == "cpu" and _option_names(word, _GPU_OPTIONS):
            raise SlurmError("--sbatch-arg '%s': a GPU option, but --device cpu (use --device gpu, and --gpu-type "
                             "for a GPU type)" % arg)


def _option_names(word, names):
    """Those of names that one word of an #SBATCH line sets: a long name, its abbreviation, or the short form."""
    if word.startswith("--"):
        typed = word[2:].split("=")[0]
        return [n for n in names if typed and (n == typed or (n.startswith(typed) and typed not in _FULL_NAMES))]
    if word.startswith("-") and len(word) > 1:
        return [n for n in names if _SHORT.get(n) in _short_letters(word)]
    return []  # a value


def _short_letters(word):
    """The option letters getopt reads from one -word: flags, then at most one option with its value."""
    letters = []
    for letter in word[1:]:
        letters.append(letter)
        if letter not in _SHORT_FLAGS:
            break
    return letters


def check(space_path, name, tasks, max_running, trials, pruner, sampler, device, cpus_per_task, mem, time,
          partition, account, stop_before, sbatch_args, storage=None, gpu_type=None):
    """Every argument checked before anything is written; -> (the loaded space, the study name)."""
    space = sweep.load_space(space_path)
    name = study_name(space_path, name)
    sweep.make_pruner(pruner, space["pruner"])
    sweep.make_sampler(sampler, space)
    for flag, value in (("--tasks", tasks), ("--trials", trials), ("--cpus-per-task", cpus_per_task)):
        if value < 1:
            raise SlurmError("%s must be >= 1, got %d" % (flag, value))
    if max_running is not None and max_running < 1:
        raise SlurmError("--max-running must be >= 1, got %d" % max_running)
    if device not in DEVICES:
        raise SlurmError("unknown --device '%s' (valid: %s)" % (device, ", ".join(DEVICES)))
    if gpu_type is not None and device != "gpu":
        raise SlurmError("--gpu-type %s needs --device gpu (--device cpu asks for no GPU)" % gpu_type)
    if gpu_type is not None and not _NAME.match(gpu_type):
        raise SlurmError("--gpu-type '%s': expected a Slurm GPU type such as a100 (letters, digits, '.', '_', '-')"
                         % gpu_type)
    if device == "gpu" and runs.caffe_flavour() != "cuda":  # the nodes run this checkout's Caffe
        raise SlurmError("--device gpu, but this Caffe is a CPU-only build: every task would fail; use --device cpu, "
                         "or build the CUDA flavour (scripts/setup.sh --cuda)")
    if mem is not None and not _MEM.match(mem):
        raise SlurmError("--mem '%s': expected a size in MB (16000) or with a unit K, M, G or T in either case "
                         "(16G, 16g)" % mem)
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
        check_sbatch_arg(arg, device)
    if storage:
        check_storage(storage)
    return space, name


def space_copy(space_path, space, sweep_dir):
    """(path, bytes) of the space's copy in sweep_dir: SPACE as it is, unless its lmdb_dir is
    relative and would resolve differently from there; then with that lmdb_dir made absolute."""
    import yaml
    ext = os.path.splitext(space_path)[1] or ".yaml"
    path = os.path.join(sweep_dir, SPACE_COPY + ext)
    with open(space_path, "rb") as f:
        data = f.read()
    raw = yaml.safe_load(data)  # load_space read it already: a mapping
    if sweep.resolve_lmdb_dir(raw.get("lmdb_dir", gen.DEFAULT_LMDB_DIR), path) != space["lmdb_dir"]:
        raw["lmdb_dir"] = space["lmdb_dir"]
        if ext.lower() == ".json":
            data = (json.dumps(raw, indent=2) + "\n").encode()
        else:
            data = ("# %s, its lmdb_dir made absolute for this folder\n%s"
                    % (os.path.abspath(space_path), yaml.safe_dump(raw, sort_keys=False))).encode()
    return path, data


def _existing_space(name, sweep_dir, path, data):
    """True when the study's copy is there already with this content; SlurmError for another space."""
    for other in sorted(glob.glob(os.path.join(glob.escape(sweep_dir), SPACE_COPY + ".*"))):
        if other.endswith(".tmp"):
            continue
        with open(other, "rb") as f:
            if other == path and f.read() == data:
                return True
        raise SlurmError("study '%s' already has a different space, %s: its trials were searched there; give a new "
                         "--name for this space (or use that file)" % (name, other))
    return False


def job_script(space_path, name, sweep_dir, tasks=DEFAULT_TASKS, max_running=DEFAULT_MAX_RUNNING,
               trials=sweep.DEFAULT_TRIALS, storage=None, pruner=sweep.DEFAULT_PRUNER,
               sampler=sweep.DEFAULT_SAMPLER, device=DEFAULT_DEVICE, cpus_per_task=DEFAULT_CPUS_PER_TASK, mem=None,
               time=None, partition=None, account=None, stop_before=DEFAULT_STOP_BEFORE, sbatch_args=(),
               command=None, repo=REPO_ROOT, gpu_type=None):
    """The text of the sbatch script: an array of `tasks` workers of sweep `name` on the space at space_path."""
    sweep_dir = os.path.abspath(sweep_dir)
    if re.search(r"[\s%'\"\\]", sweep_dir):  # it goes unquoted into #SBATCH --output, where % is a pattern
        raise SlurmError("%s: the sweep folder's path must have no blanks, quotes, backslashes or %%, since "
                         "sbatch's --output takes it as it is (use --root)" % sweep_dir)
    array = "0-%d" % (tasks - 1) + ("%%%d" % max_running if max_running else "")
    lines = ["#!/bin/bash",
             "# Sweep '%s': %d Slurm array task(s), each one worker of tools/sweep.py against the study's storage."
             % (name, tasks),
             "# Written %s by: %s" % (datetime.datetime.now().isoformat(timespec="seconds"),
                                      masked(" ".join((command or "tinycaffe.slurm").split()))),  # one comment line, whatever was typed
             "# Submit: sbatch %s" % shlex.quote(os.path.join(sweep_dir, JOB_SCRIPT)),
             "#SBATCH --job-name=sweep-%s" % name,
             "#SBATCH --array=%s" % array,
             "#SBATCH --output=%s" % os.path.join(sweep_dir, "slurm-%A_%a.out"),
             "#SBATCH --open-mode=append",  # a requeued task adds to its file
             "#SBATCH --ntasks=1",
             "#SBATCH --cpus-per-task=%d" % cpus_per_task]
    if device == "gpu":
        lines.append("#SBATCH --gres=gpu:%s1" % (gpu_type + ":" if gpu_type else ""))
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
    if storage:  # the URL stays out of the script and of every node's `ps`: a 0600 file beside it
        worker += ["--storage-file", os.path.join(sweep_dir, sweep.STORAGE_FILE)]
    lines += ["",
              "export PYTHONUNBUFFERED=1  # the output file shows each line when it is written",
              "# Slurm's allocation, not the node's cores: a CPU worker's BLAS would use every core of a shared node.",
              'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" OPENBLAS_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
              'echo "[sweep_slurm] job ${SLURM_ARRAY_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:-?} on $(hostname)'
              ' (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}) at $(date -Is)"',
              "cd %s" % shlex.quote(repo)]
    if device == "gpu":
        lines.append("# --gpu 0: Slurm's CUDA_VISIBLE_DEVICES shows the worker only the GPU it allocated, as device 0.")
    lines += ["exec %s" % " ".join(shlex.quote(part) for part in worker), ""]
    return "\n".join(lines)


def _missing_dirs(path):
    """path and those of its parents that do not exist, deepest first."""
    missing = []
    while path and not os.path.exists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def write(space_path, name=None, root=None, tasks=DEFAULT_TASKS, max_running=DEFAULT_MAX_RUNNING,
          trials=sweep.DEFAULT_TRIALS, storage=None, pruner=sweep.DEFAULT_PRUNER, sampler=sweep.DEFAULT_SAMPLER,
          device=DEFAULT_DEVICE, cpus_per_task=DEFAULT_CPUS_PER_TASK, mem=None, time=None, partition=None,
          account=None, stop_before=DEFAULT_STOP_BEFORE, sbatch_args=(), command=None, gpu_type=None):
    """Check everything, then write sweeps/<name>/space.<ext> and slurm_job.sh atomically; -> the
    script's path. A folder or file that cannot be made is a SlurmError, and this call's writes are undone."""
    space, name = check(space_path, name, tasks, max_running, trials, pruner, sampler, device, cpus_per_task, mem,
                        time, partition, account, stop_before, sbatch_args, storage, gpu_type)
    sweep_dir = sweep._sweep_dir(name, root)
    copy, data = space_copy(space_path, space, sweep_dir)
    have_copy = _existing_space(name, sweep_dir, copy, data)
    text = job_script(copy, name, sweep_dir, tasks, max_running, trials, storage, pruner, sampler, device,
                      cpus_per_task, mem, time, partition, account, stop_before, sbatch_args, command,
                      gpu_type=gpu_type)
    path = os.path.join(sweep_dir, JOB_SCRIPT)
    made = _missing_dirs(sweep_dir)
    target = sweep_dir
    try:
        os.makedirs(sweep_dir, exist_ok=True)  # Slurm creates no folder for --output: the tasks would fail
        if not have_copy:
            target = copy
            with atomic_open(copy, "wb") as f:
                f.write(data)
        if storage:
            target = os.path.join(sweep_dir, sweep.STORAGE_FILE)
            with atomic_open(target) as f:
                os.fchmod(f.fileno(), 0o600)  # before the text: the URL may hold a password
                f.write(storage + "\n")
        target = path
        with atomic_open(path) as f:
            os.fchmod(f.fileno(), 0o700)
            f.write(text)
    except OSError as exc:  # --root a file, a read-only folder, slurm_job.sh a folder, ...: undo this call's writes
        if not have_copy and target == path:
            with contextlib.suppress(OSError):
                os.unlink(copy)
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise SlurmError("%s: %s" % (exc.filename if target == sweep_dir and exc.filename else target,
                                     exc.strerror or exc))
    return path


def submit(path):
    """sbatch --parsable PATH -> the job id."""
    written = "the job script is written"
    try:
        out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True, timeout=SBATCH_TIMEOUT)
    except FileNotFoundError:
        raise SlurmError("--submit: no sbatch on PATH (Slurm's client, Debian's slurm-client); %s: submit it on a "
                         "login node with: sbatch %s" % (written, path))
    except subprocess.TimeoutExpired:
        raise SlurmError("sbatch %s: no answer in %d s (is slurmctld reachable?); %s: see squeue whether it was "
                         "queued, else submit it with: sbatch %s" % (path, SBATCH_TIMEOUT, written, path))
    if out.returncode != 0:
        said = " ".join(out.stderr.split()) or "no message"
        raise SlurmError("sbatch %s failed (exit %d): %s; %s: fix that and submit it with: sbatch %s"
                         % (path, out.returncode, said, written, path))
    job = out.stdout.strip().split(";")[0]  # "<id>[;<cluster>]"
    if not job.isdigit():
        raise SlurmError("sbatch %s: expected a job id, got %r; %s: see squeue, else submit it with: sbatch %s"
                         % (path, out.stdout.strip(), written, path))
    return int(job)
