#!/usr/bin/env python3
"""Parse a Caffe training log (also one still being written) into train.csv and test.csv
(the columns of Caffe's tools/extra/parse_log.py: NumIters, Seconds, LearningRate and one
column per net output) and draw curves.png: train loss, val top-1/top-5 and the LR."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinycaffe import caffelog, runs  # noqa: E402


EXAMPLES = """examples:
  %(prog)s runs/tiny/RUN/caffe.log   train.csv, test.csv and curves.png beside the log"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", metavar="LOGFILE", help="a Caffe log, e.g. runs/tiny/<stamp>/caffe.log")
    p.add_argument("--out", default=None, help="output folder (default: the log's folder)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.log):
        print("plot_log.py: error: %s: no such log file" % args.log, file=sys.stderr)
        return 1
    out = args.out or os.path.dirname(os.path.abspath(args.log))
    folder = os.path.dirname(os.path.abspath(args.log))
    # a run dir's log: its net's accuracy outputs named as train.py names them in the run's own CSVs
    aliases = runs.accuracy_aliases(folder) if os.path.isfile(os.path.join(folder, "train_val.prototxt")) else None
    train, test = caffelog.write_outputs(args.log, out, title=os.path.basename(folder), aliases=aliases)
    if not train and not test:
        print("plot_log.py: error: %s: no 'Train/Test net output' lines (is it a Caffe training log?)" % args.log,
              file=sys.stderr)
        return 1
    print("%d train rows, %d test rows -> %s" % (len(train), len(test),
                                                 ", ".join(os.path.join(out, f) for f in ("train.csv", "test.csv",
                                                                                          "curves.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
