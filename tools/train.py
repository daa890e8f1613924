#!/usr/bin/env python3
"""Train a variant (or any solver.prototxt) into a run directory: runs/<variant>/<timestamp>/
with the exact solver and net used, caffe.log, snapshots, run.json, train/test CSVs and curves.png.

The terminal shows one progress line (iteration, loss, val top-1, images/s, ETA); Caffe's full
log is in the run's caffe.log (--verbose shows it as it comes). Engines: `binary` runs the real
`caffe train`; `pycaffe` is a loop over Caffe's solver that adds --anneal plateau (divide the LR
by 10 when val top-1 stalls: the paper's manual cuts, automated)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinycaffe import data, nets, runs, train  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402


EXAMPLES = """examples:
  %(prog)s tiny --gpu cpu --max-iter 300            a short CPU run of the 'tiny' variant
  %(prog)s alexnet_prelu --gpu 0                     the paper's best variant on GPU 0
  %(prog)s prototxt/mine/solver.prototxt --gpu 0     an edited copy (gen_prototxt.py --from/--to)
  %(prog)s alexnet_prelu --resume --max-iter 60000   continue the newest run, and train it longer"""


INT32_MAX = 2 ** 31 - 1  # Caffe's int32 fields (max_iter, test_interval, batch_size)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= INT32_MAX:
        raise argparse.ArgumentTypeError("expected a whole number from 1 to %d, got '%s'" % (INT32_MAX, text))
    return value


def build_parser(prog=None, default_engine="pycaffe"):
    # No abbreviated flags: the resume command printed on Ctrl-C drops flags by their full names.
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="VARIANT|SOLVER",
                   help="a variant (%s) or a path to a solver.prototxt" % ", ".join(nets.VARIANTS))
    runs.add_gpu_argument(p, several=True)
    p.add_argument("--resume", action="store_true",
                   help="continue the newest run of this variant (or --run-dir) from its newest .solverstate "
                        "(default: start a new run)")
    p.add_argument("--weights", default=None, help="initialise from this .caffemodel (default: the fillers)")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<variant>/<timestamp>)")
    p.add_argument("--runs-root", default=None, help="where run directories go (default %s under the repo)"
                   % runs.DEFAULT_RUNS)
    p.add_argument("--max-iter", type=positive_int, default=None,
                   help="train this many iterations in all (this run's solver max_iter; with --resume, to "
                        "extend a run) (default: the solver's)")
    p.add_argument("--test-interval", type=positive_int, default=None,
                   help="test on val every this many iterations (default: the solver's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per TRAIN batch (the TRAIN Data layers'; new runs only) (default: the net's)")
    p.add_argument("--verbose", action="store_true",
                   help="stream Caffe's full log to the terminal (default: one progress line; the log is in the "
                        "run's caffe.log)")
    p.add_argument("--engine", choices=("pycaffe", "binary"), default=default_engine,
                   help="pycaffe loop or the caffe binary (default %s)" % default_engine)
    p.add_argument("--anneal", choices=("step", "plateau"), default="step",
                   help="step: the solver's own lr_policy; plateau: /10 when val top-1 stalls, pycaffe engine "
                        "only (default step)")
    p.add_argument("--patience", type=int, default=train.DEFAULT_PATIENCE,
                   help="plateau: evaluations without improvement before an anneal (default %d)"
                   % train.DEFAULT_PATIENCE)
    p.add_argument("--min-delta", type=float, default=train.DEFAULT_MIN_DELTA,
                   help="plateau: val top-1 gain that counts as improvement (default %g)" % train.DEFAULT_MIN_DELTA)
    p.add_argument("--max-anneals", type=int, default=train.DEFAULT_MAX_ANNEALS,
                   help="plateau: stop at the next plateau after this many anneals (default %d)"
                   % train.DEFAULT_MAX_ANNEALS)
    return p


def main(argv=None, prog=None, default_engine="pycaffe"):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog, default_engine).parse_args(argv)
    name = prog or "train.py"
    if args.anneal == "plateau" and args.engine != "pycaffe":
        print("%s: error: --anneal plateau needs --engine pycaffe (the caffe binary cannot change its LR)" % name,
              file=sys.stderr)
        return 2
    if args.patience < 1 or args.max_anneals < 0:
        print("%s: error: --patience must be >= 1 and --max-anneals >= 0" % name, file=sys.stderr)
        return 2
    try:
        return train.launch(args, [name] + list(argv))
    except (runs.RunError, data.DataError, CaffeNotFound) as exc:
        print("%s: error: %s" % (name, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
