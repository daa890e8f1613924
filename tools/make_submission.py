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
from tqdm import tqdm  # noqa: E402

from tinycaffe import data, evaluate, fit, runs, submit, sweep  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402
from tinycaffe.files import atomic_open  # noqa: E402


EXAMPLES = """examples:
  %(prog)s --model runs/tiny/RUN/deploy.prototxt runs/tiny/RUN/snapshots/tiny_iter_20000.caffemodel --out submission.txt
      one model
  %(prog)s --model D1 W1 --model D2 W2 --val-lmdb data/lmdb/val_lmdb --out submission.txt
      an ensemble, with each model's val top-1 first
  %(prog)s --validate submission.txt   check a file against the test LMDB"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=2, action="append", metavar=("DEPLOY", "WEIGHTS"),
                   help="a model to average (repeat for an ensemble)")
    p.add_argument("--from-sweep", metavar="NAME", default=None,
                   help="average the --top best complete trials of sweep NAME (tools/sweep.py): their deploy.prototxt "
                        "and final .caffemodel (default: use --model)")
    p.add_argument("--top", type=int, default=3, help="with --from-sweep: how many trials (default 3)")
    p.add_argument("--sweeps-root", default=None, help="with --from-sweep: where sweeps/<name>/ is (default sweeps/)")
    p.add_argument("--storage", default=None, help="with --from-sweep: the study's RDB URL (default: its file journal; "
                                                   "$%s or --storage-file keep a password out of `ps`)"
                                                   % sweep.STORAGE_ENV)
    p.add_argument("--storage-file", default=None, help="with --from-sweep: a file (0600) holding the RDB URL "
                                                        "(default: none)")
    p.add_argument("--weight", type=float, action="append",
                   help="weight of each --model in the average, in order (default: all equal)")
    evaluate.add_data_arguments(p, "test LMDB", evaluate.DEFAULT_TEST_LMDB)
    p.add_argument("--train-val", default=None, help=evaluate.TRAIN_VAL_HELP.replace("the deploy file",
                                                                                     "each deploy file"))
    p.add_argument("--tta", default="center", choices=evaluate.TTA_MODES, help="test-time augmentation (default center)")
    p.add_argument("--batch", type=int, default=evaluate.DEFAULT_BATCH,
                   help="images per forward (default %d)" % evaluate.DEFAULT_BATCH)
    runs.add_gpu_argument(p)
    p.add_argument("--out", default=None, help="submission file to write (required unless --validate)")
    p.add_argument("--top5-csv", default=None, help="also write the five best wnids and scores per image here "
                                                    "(default: none)")
    p.add_argument("--val-lmdb", default=None, help="first report each model's and the ensemble's val top-1 "
                                                    "on this LMDB (default: skip)")
    p.add_argument("--allow-missing", action="store_true",
                   help="write the file even when test images are missing from the LMDB (skipped by make_lmdb "
                        "--skip-bad); default: refuse")
    p.add_argument("--validate", metavar="FILE", default=None, help="check FILE instead of writing one")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the last line (default: show them)")
    return p


def fail(message):
    print("make_submission.py: error: %s" % message, file=sys.stderr)
    return 1


def load_models(args, gpu):
    weights = args.weight or [1.0] * len(args.model)
    if len(weights) != len(args.model):
        raise evaluate.EvalError("%d --weight values for %d --model pairs" % (len(weights), len(args.model)))
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise evaluate.EvalError("--weight values must be >= 0 and not all 0")
    pairs = []
    for (deploy, caffemodel), w in zip(args.model, weights):
        net = evaluate.load_net(deploy, caffemodel, gpu)
        evaluate.check_classes(net, deploy, args.labels)
        pairs.append((net, w))
    return pairs


def report_val(pairs, args, mean):
    """Val top-1 by Caffe's rule: each model on its own scores, the ensemble on the averaged softmax."""
    pred = evaluate.predict(pairs, args.val_lmdb, mean, args.tta, args.batch,
                            names=[w for _, w in args.model])
    for (_, caffemodel), scores in zip(args.model, pred.model_scores):
        print("val top-1 %.4f  %s" % (evaluate.topk_accuracy(scores, pred.labels, 1), caffemodel))
    print("val top-1 %.4f  ensemble of %d" % (evaluate.topk_accuracy(pred.probs, pred.labels, 1), len(pairs)))


def write_top5(path, names, probs, labels):
    order = sorted(range(len(names)), key=lambda i: int(submit.NAME_RE.match(names[i]).group(1)))
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + ["wnid%d" % k for k in range(1, 6)] + ["score%d" % k for k in range(1, 6)])
        for i in order:
            top = np.argsort(-probs[i])[:5]
            w.writerow([names[i]] + [labels[c][0] for c in top] + ["%.6f" % probs[i][c] for c in top])


def check_writable(path, flag):
    """Before any inference: an output file's folder must exist, and the path not be a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise evaluate.EvalError("%s %s: no such directory %s" % (flag, path, folder))
    if os.path.isdir(path):
        raise evaluate.EvalError("%s %s: is a directory (expected a file name, e.g. %s)"
                                 % (flag, path, os.path.join(path, "submission.txt")))


def check_val_lmdb(args, pairs, mean):
    """--val-lmdb, before any inference: labelled, same classes, images that fit the mean and crop."""
    evaluate.require_lmdb_kind(args.val_lmdb, "labelled", "--val-lmdb")
    labels = fit.beside(args.val_lmdb, "labels.txt")
    if labels:
        for (net, _), (deploy, _) in zip(pairs, args.model):
            evaluate.check_classes(net, deploy, labels)
    evaluate.ensemble_preprocessing([d for d, _ in args.model], args.train_val, args.mean, args.mean_given,
                                    args.val_lmdb, evaluate.net_crop(pairs[0][0]))


def validate(args, wnids, names):
    if not os.path.isfile(args.validate):
        return fail("%s: no such file" % args.validate)
    problems = submit.validate_file(args.validate, names, wnids)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    with open(args.validate) as f:
        used = len({line.split()[1] for line in f})
    print("%s: valid, %d images, %d classes used" % (args.validate, len(names), used))
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        evaluate.check_batch(args.batch)
        gpu = runs.parse_gpu(args.gpu, several=False) if not args.validate else None
        evaluate.resolve_data_arguments(args, args.model[0][0] if args.model else None)
        labels = data.read_labels(args.labels)
        wnids = [w for w, _ in labels]
        evaluate.require_lmdb_kind(args.lmdb, "test", "a submission")
        names = submit.expected_names(args.lmdb)
        if args.validate:
            return validate(args, wnids, names)
        if args.from_sweep:
            if args.model:
                return fail("give --model pairs or --from-sweep NAME, not both")
            storage = sweep.storage_url(args.storage, args.storage_file)
            args.model = [list(pair) for pair in sweep.best_models(args.from_sweep, args.top, args.sweeps_root,
                                                                   storage)]
            if not args.quiet:
                print("ensemble of the %d best trials of sweep %s: %s"
                      % (len(args.model), args.from_sweep, ", ".join(os.path.dirname(os.path.dirname(w))
                                                                     for _, w in args.model)))
        if not args.model or not args.out:
            return fail("give --model DEPLOY WEIGHTS (one or more) and --out FILE, or --validate FILE")
        check_writable(args.out, "--out")
        if args.top5_csv:
            check_writable(args.top5_csv, "--top5-csv")
        pairs = load_models(args, gpu)
        mean = evaluate.ensemble_preprocessing([d for d, _ in args.model], args.train_val, args.mean, args.mean_given,
                                               args.lmdb, evaluate.net_crop(pairs[0][0]))
        if args.val_lmdb:
            check_val_lmdb(args, pairs, mean)
        missing = submit.missing_names(names, args.lmdb)
        if missing and not args.allow_missing:
            raise submit.SubmissionError(
                "%s lacks %d of the %d test images of its manifest (first %s, skipped by make_lmdb --skip-bad): "
                "the scoreboard counts them wrong; fix the images and rerun make_lmdb, or pass --allow-missing"
                % (args.lmdb, len(missing), len(names), missing[0]))
        if args.val_lmdb:
            report_val(pairs, args, mean)
        with tqdm(total=data.lmdb_count(args.lmdb), unit="img", desc="submission", disable=args.quiet) as bar:
            pred = evaluate.predict(pairs, args.lmdb, mean, args.tta, args.batch, progress=bar.update,
                                    names=[w for _, w in args.model])
        test_names = [submit.name_of_key(k) for k in pred.keys]
        count = submit.write(args.out, test_names, [wnids[c] for c in pred.probs.argmax(1)], wnids)
        if args.top5_csv:
            write_top5(args.top5_csv, test_names, pred.probs, labels)
    except (evaluate.EvalError, submit.SubmissionError, data.DataError, runs.RunError, CaffeNotFound,
            sweep.SweepError) as exc:
        return fail(str(exc))
    print("wrote %s: %d lines, %d model(s), tta %s, validated (%.0f images/s)%s%s"
          % (args.out, count, len(pairs), args.tta, count / max(pred.seconds, 1e-9),
             "; top-5 in %s" % args.top5_csv if args.top5_csv else "",
             "; %d test images missing (--allow-missing): first %s" % (len(missing), missing[0]) if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
