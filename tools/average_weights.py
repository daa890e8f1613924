#!/usr/bin/env python3
"""Average the weights of several snapshots of one net into one .caffemodel (checkpoint
averaging): a run's last K snapshots, or the models you name. BatchNorm's statistics are
averaged as mean and variance. Writes OUT and OUT.json (what was averaged), atomically."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinycaffe import average, runs  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402

EXAMPLES = """examples:
  %(prog)s runs/resnet_tiny/RUN                 the run's last 5 snapshots -> RUN/averaged_last5.caffemodel
  %(prog)s runs/resnet_tiny/RUN --last 3 --ema  the moving averages (*_ema.caffemodel) of the last 3
  %(prog)s --models A.caffemodel B.caffemodel --out avg.caffemodel   any snapshots of one net"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory made by train.sh (or use --models)")
    p.add_argument("--last", type=int, default=None,
                   help="with RUN_DIR: how many of its newest snapshots (default %d)" % average.DEFAULT_LAST)
    p.add_argument("--ema", action="store_true",
                   help="with RUN_DIR: average the snapshots' moving averages (*_ema.caffemodel) instead "
                        "(default: the snapshots themselves)")
    p.add_argument("--models", nargs="+", metavar="CAFFEMODEL", default=None,
                   help="the .caffemodel files to average instead of a run's (default: none)")
    p.add_argument("--out", default=None,
                   help="the averaged .caffemodel (default with RUN_DIR: RUN_DIR/averaged_last<K>[_ema].caffemodel; "
                        "required with --models)")
    return p


def _fail(message):
    print("average_weights.py: error: %s" % message, file=sys.stderr)
    return 1


def main(argv=None):
    args = build_parser().parse_args(argv)
    if bool(args.run_dir) == bool(args.models):
        return _fail("give a RUN_DIR or --models (one of the two)")
    if args.models and (args.last is not None or args.ema):
        return _fail("--last and --ema choose a RUN_DIR's snapshots; with --models, name the files to average")
    last = average.DEFAULT_LAST if args.last is None else args.last
    if last < 2:
        return _fail("--last must be >= 2, got %d" % last)
    try:
        if args.run_dir:
            try:
                runs.require_run_dir(args.run_dir)
            except runs.RunError as exc:
                return _fail(str(exc).replace("--run-dir ", "RUN_DIR ", 1))
            paths = average.run_snapshots(args.run_dir, last, args.ema)
            out = args.out or os.path.join(args.run_dir, "averaged_last%d%s.caffemodel"
                                           % (len(paths), "_ema" if args.ema else ""))
        else:
            if not args.out:
                return _fail("--models needs --out FILE.caffemodel")
            paths, out = args.models, args.out
        average.write_average(paths, out)
    except (average.AverageError, runs.RunError, CaffeNotFound, OSError) as exc:
        return _fail(str(exc))
    fewer = " (--last %d: the run has %d)" % (last, len(paths)) if args.run_dir and len(paths) < last else ""
    print("averaged %d models%s (%s) -> %s" % (len(paths), fewer, ", ".join(os.path.basename(p) for p in paths), out))
    val = runs.test_lmdb(args.run_dir) if args.run_dir else None
    if val:
        print("next: .venv/bin/python tools/evaluate.py --deploy %s --weights %s --lmdb %s"
              % (os.path.join(args.run_dir, "deploy.prototxt"), out, val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
