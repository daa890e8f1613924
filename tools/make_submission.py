#!/usr/bin/env python3
"""Write the scoreboard's submission file: the averaged softmax of one or more models
(optionally weighted) over the test LMDB, one `test_N.JPEG wnid` line per image, sorted by N,
validated before it is renamed into place. Or check an existing file with --validate."""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tinycaffe import data, evaluate, runs, submit  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402
from tinycaffe.files import atomic_open  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", nargs=2, action="append", metavar=("DEPLOY", "WEIGHTS"),
                   help="a model to average (repeat for an ensemble)")
    p.add_argument("--weight", type=float, action="append",
                   help="weight of each --model in the average, in order (default: all equal)")
    p.add_argument("--lmdb", default=evaluate.DEFAULT_TEST_LMDB,
                   help="test LMDB (default %s)" % evaluate.DEFAULT_TEST_LMDB)
    p.add_argument("--labels", default=None, help="labels.txt (default: the one beside the LMDB)")
    p.add_argument("--mean", default=evaluate.DEFAULT_MEAN,
                   help="mean.binaryproto (default %s)" % evaluate.DEFAULT_MEAN)
    p.add_argument("--tta", default="center", choices=evaluate.TTA_MODES, help="test-time augmentation (default center)")
    p.add_argument("--batch", type=int, default=evaluate.DEFAULT_BATCH,
                   help="images per forward (default %d)" % evaluate.DEFAULT_BATCH)
    runs.add_gpu_argument(p)
    p.add_argument("--out", default=None, help="submission file to write (required unless --validate)")
    p.add_argument("--top5-csv", default=None, help="also write the five best wnids and scores per image here "
                                                    "(default: none)")
    p.add_argument("--val-lmdb", default=None, help="first report each model's and the ensemble's val top-1 "
                                                    "on this LMDB (default: skip)")
    p.add_argument("--validate", metavar="FILE", default=None, help="check FILE instead of writing one")
    return p


def fail(message):
    print("make_submission.py: error: %s" % message, file=sys.stderr)
    return 1


def load_models(args, labels, labels_path, gpu):
    weights = args.weight or [1.0] * len(args.model)
    if len(weights) != len(args.model):
        raise evaluate.EvalError("%d --weight values for %d --model pairs" % (len(weights), len(args.model)))
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise evaluate.EvalError("--weight values must be >= 0 and not all 0")
    pairs = []
    for (deploy, caffemodel), w in zip(args.model, weights):
        net = evaluate.load_net(deploy, caffemodel, gpu)
        classes = net.blobs[evaluate.output_blob(net)].data.shape[1]
        if classes != len(labels):
            raise evaluate.EvalError("%s has %d classes but %s lists %d: test LMDB and model come from different "
                                     "datasets" % (deploy, classes, labels_path, len(labels)))
        pairs.append((net, w))
    return pairs


def report_val(pairs, args, mean):
    _, y, ensemble, per_model, _ = evaluate.predict(pairs, args.val_lmdb, mean, args.tta, args.batch)
    for (_, caffemodel), probs in zip(args.model, per_model):
        print("val top-1 %.4f  %s" % (evaluate.topk_accuracy(probs, y, 1), caffemodel))
    print("val top-1 %.4f  ensemble of %d" % (evaluate.topk_accuracy(ensemble, y, 1), len(pairs)))


def write_top5(path, names, probs, labels):
    order = sorted(range(len(names)), key=lambda i: int(submit.NAME_RE.match(names[i]).group(1)))
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + ["wnid%d" % k for k in range(1, 6)] + ["score%d" % k for k in range(1, 6)])
        for i in order:
            top = np.argsort(-probs[i])[:5]
            w.writerow([names[i]] + [labels[c][0] for c in top] + ["%.6f" % probs[i][c] for c in top])


def main(argv=None):
    args = build_parser().parse_args(argv)
    labels_path = args.labels or os.path.join(os.path.dirname(os.path.normpath(args.lmdb)), "labels.txt")
    try:
        gpu = runs.parse_gpu(args.gpu, several=False) if not args.validate else None
        labels = data.read_labels(labels_path)
        wnids = [w for w, _ in labels]
        names = submit.expected_names(args.lmdb)
        if args.validate:
            if not os.path.isfile(args.validate):
                return fail("%s: no such file" % args.validate)
            problems = submit.validate_file(args.validate, names, wnids)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                return 1
            print("%s: valid, %d images, %d classes used" % (args.validate, len(names),
                                                             len({line.split()[1] for line in open(args.validate)})))
            return 0
        if not args.model or not args.out:
            return fail("give --model DEPLOY WEIGHTS (one or more) and --out FILE, or --validate FILE")
        if not os.path.isfile(args.mean):
            return fail("%s: no such mean file (expected mean.binaryproto from make_lmdb.py)" % args.mean)
        mean = data.read_mean(args.mean)
        pairs = load_models(args, labels, labels_path, gpu)
        if args.val_lmdb:
            report_val(pairs, args, mean)
        keys, _, probs, _, seconds = evaluate.predict(pairs, args.lmdb, mean, args.tta, args.batch)
        test_names = [submit.name_of_key(k) for k in keys]
        count = submit.write(args.out, test_names, [wnids[c] for c in probs.argmax(1)], wnids)
        if args.top5_csv:
            write_top5(args.top5_csv, test_names, probs, labels)
    except (evaluate.EvalError, submit.SubmissionError, data.DataError, runs.RunError, CaffeNotFound) as exc:
        return fail(str(exc))
    print("wrote %s: %d lines, %d model(s), tta %s, validated (%.0f images/s)%s"
          % (args.out, count, len(pairs), args.tta, count / max(seconds, 1e-9),
             "; top-5 in %s" % args.top5_csv if args.top5_csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
