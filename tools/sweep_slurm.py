#!/usr/bin/env python3
"""A sweep on a Slurm cluster: writes sweeps/<name>/slurm_job.sh, a job array whose every task
is one tools/sweep.py worker on one GPU (or on its --cpus-per-task CPUs) against the study's
shared storage, beside sweeps/<name>/space.<ext>, the copy of SPACE the tasks read; with
--submit it submits it (sbatch). The task's output goes to sweeps/<name>/slurm-<job>_<task>.out.
Near the time limit (--stop-before) each worker gets SIGTERM: its trial stops with a snapshot
and is marked failed, never resumed; submitting again continues the study with new trials, so
--time must exceed one trial. Prints the job id with --submit, else the script's path. The
ranked table afterwards: tools/sweep.py --report NAME."""
import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinycaffe import runs, slurm, sweep  # noqa: E402


EXAMPLES = """examples:
  %(prog)s sweeps/sample.yaml --tasks 4 --device gpu --submit   a Slurm job array of four workers"""


def build_parser(prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", metavar="SPACE", help="the search space, YAML or JSON (see sweeps/example.yaml)")
    p.add_argument("--name", default=None,
                   help="study and job name: a letter or digit, then letters, digits, '.', '_', '-' (default: SPACE's "
                        "file name without extension)")
    p.add_argument("--tasks", type=int, default=slurm.DEFAULT_TASKS,
                   help="array tasks, i.e. workers (default %d)" % slurm.DEFAULT_TASKS)
    p.add_argument("--max-running", type=int, default=slurm.DEFAULT_MAX_RUNNING,
                   help="at most this many tasks at once, the array's %%M (default: no limit)")
    p.add_argument("--trials", type=int, default=sweep.DEFAULT_TRIALS,
                   help="finished (complete or pruned) trials the study aims at, all workers together (default %d)"
                        % sweep.DEFAULT_TRIALS)
    p.add_argument("--storage", default=None,
                   help="an Optuna RDB URL every node reaches (postgresql+psycopg2://USER@HOST/DB); the workers read "
                        "it from sweeps/<name>/storage.url (mode 0600), it is in no job script and never printed; "
                        "with a password, give it by --storage-file or $%s instead, out of `ps` "
                        "(default: the file journal in sweeps/<name>/, which must then be on a filesystem all nodes "
                        "share, e.g. NFS)" % sweep.STORAGE_ENV)
    p.add_argument("--storage-file", default=None, help="a file (0600) holding the RDB URL (default: none)")
    p.add_argument("--pruner", default=sweep.DEFAULT_PRUNER,
                   help="%s (default %s)" % (" | ".join(sweep.PRUNERS), sweep.DEFAULT_PRUNER))
    p.add_argument("--sampler", default=sweep.DEFAULT_SAMPLER,
                   help="%s (default %s)" % (" | ".join(sweep.SAMPLERS), sweep.DEFAULT_SAMPLER))
    p.add_argument("--root", default=None,
                   help="where sweeps/<name>/ folders go, on the shared filesystem (default sweeps/ in the repo)")
    p.add_argument("--device", default=slurm.DEFAULT_DEVICE,
                   help="gpu: each task asks --gres=gpu:1 and trains on it; cpu: no GPU, Caffe on the task's CPUs "
                        "(default %s)" % slurm.DEFAULT_DEVICE)
    p.add_argument("--gpu-type", metavar="TYPE", default=None,
                   help="with --device gpu: ask for a GPU of this Slurm type, --gres=gpu:TYPE:1 (default: any)")
    p.add_argument("--cpus-per-task", type=int, default=slurm.DEFAULT_CPUS_PER_TASK,
                   help="CPUs of each task (default %d)" % slurm.DEFAULT_CPUS_PER_TASK)
    p.add_argument("--mem", default=None, help="memory of each task, e.g. 16G (default: the partition's)")
    p.add_argument("--time", default=None,
                   help="time limit of each task, Slurm's form: minutes, H:M:S, D-H:M:S (default: the partition's)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--account", default=None, help="Slurm account (default: yours)")
    p.add_argument("--stop-before", type=int, default=slurm.DEFAULT_STOP_BEFORE,
                   help="seconds before the time limit that a worker gets SIGTERM and snapshots its trial; Slurm "
                        "may send it up to a minute earlier (default %d)" % slurm.DEFAULT_STOP_BEFORE)
    p.add_argument("--sbatch-arg", metavar="ARG", action="append", default=[],
                   help="an extra sbatch option, given with '=' as it starts with a dash: --sbatch-arg=--constraint=a100; "
                        "repeatable; not one the script sets itself (--array, --output, --error, --open-mode, "
                        "--signal, --export, --wrap, --ntasks), nor a GPU option with --device cpu (default: none)")
    p.add_argument("--submit", action="store_true", help="submit the array with sbatch (default: only write it)")
    return p


def main(argv=None, prog=None):
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or os.path.basename(sys.argv[0]) or "sweep_slurm.py"
    args = build_parser(prog).parse_args(argv)
    try:
        args.storage = sweep.storage_url(args.storage, args.storage_file)
        path = slurm.write(args.space, name=args.name, root=args.root, tasks=args.tasks, max_running=args.max_running,
                           trials=args.trials, storage=args.storage, pruner=args.pruner, sampler=args.sampler,
                           device=args.device, cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time,
                           partition=args.partition, account=args.account, stop_before=args.stop_before,
                           sbatch_args=args.sbatch_arg, gpu_type=args.gpu_type,
                           command=" ".join(shlex.quote(a) for a in [prog] + list(argv)))
        job = slurm.submit(path) if args.submit else None
    except (sweep.SweepError, runs.RunError, ValueError) as exc:
        print("%s: error: %s" % (prog, str(exc).strip("'\"")), file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an unreadable space.* already in sweeps/<name>/; writes fail as SlurmError
        print("%s: error: %s" % (prog, "%s: %s" % (exc.filename, exc.strerror) if exc.filename else exc),
              file=sys.stderr)
        return 1
    sweep_dir, name = os.path.dirname(path), os.path.basename(os.path.dirname(path))
    if job is None:
        print("[sweep_slurm] wrote %s; submit it with: sbatch %s" % (path, shlex.quote(path)), file=sys.stderr)
        print(path)
        return 0
    print("[sweep_slurm] submitted job %d (%d task(s)); watch: squeue -j %d; logs: %s/slurm-%d_*.out; the table: "
          "%s" % (job, args.tasks, job, sweep_dir, job,
                  sweep.again_command("--report", name, args.root,
                                      os.path.join(sweep_dir, sweep.STORAGE_FILE) if args.storage else None)),
          file=sys.stderr)
    print(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
