#!/usr/bin/env python3
"""Evaluate a trained model on val: top-1/top-5, per-class accuracy (CSV), the most confused
class pairs, images/s; test-time augmentation center (Caffe's TEST crop), mirror or 10crop."""
import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from tinycaffe import data, evaluate, runs  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402
from tinycaffe.files import atomic_open, write_text  # noqa: E402


EXAMPLES = """examples:
  %(prog)s --deploy runs/tiny/RUN/deploy.prototxt --weights runs/tiny/RUN/snapshots/tiny_iter_20000.caffemodel
      val top-1/top-5 of one model (center crop)
  %(prog)s --deploy D --weights W --lmdb data/lmdb/val_lmdb --tta 10crop
      AlexNet's 10-crop test-time augmentation"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_model_arguments(p, "labelled LMDB")
    p.add_argument("--tta", default="center", choices=evaluate.TTA_MODES,
                   help="test-time augmentation (default center)")
    p.add_argument("--batch", type=int, default=evaluate.DEFAULT_BATCH,
                   help="images per forward (default %d)" % evaluate.DEFAULT_BATCH)
    runs.add_gpu_argument(p)
    p.add_argument("--out", default=None, help="folder for per_class_<tta>.csv and eval_<tta>.json "
                                               "(default: the weights' run dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        evaluate.check_batch(args.batch)
        gpu = runs.parse_gpu(args.gpu, several=False)  # a device this build lacks: said before any data
        evaluate.resolve_data_arguments(args, args.deploy)
        labels = data.read_labels(args.labels)
        evaluate.require_lmdb_kind(args.lmdb, "labelled", "evaluate.py")
        out = args.out or evaluate.run_dir_of(args.weights)
        if os.path.exists(out) and not os.path.isdir(out):  # before inference, not after it
            raise evaluate.EvalError("--out %s: a file, expected a folder for per_class_%s.csv and eval_%s.json"
                                     % (out, args.tta, args.tta))
        net = evaluate.load_net(args.deploy, args.weights, gpu)
        evaluate.check_classes(net, args.deploy, args.labels)
        mean = evaluate.preprocessing(args.deploy, args.train_val, args.mean, args.mean_given, args.lmdb,
                                      evaluate.net_crop(net))
        classes = evaluate.net_classes(net)
        total = data.lmdb_count(args.lmdb)
        with tqdm(total=total, unit="img", desc="evaluate", disable=args.quiet) as bar:
            pred = evaluate.predict([(net, 1.0)], args.lmdb, mean, args.tta, args.batch, bar.update,
                                    names=[args.weights])
    except (evaluate.EvalError, data.DataError, runs.RunError, CaffeNotFound) as exc:
        print("evaluate.py: error: %s" % exc, file=sys.stderr)
        return 1
    y, probs, seconds = pred.labels, pred.probs, pred.seconds
    if (y < 0).any():
        print("evaluate.py: error: %s has unlabeled records (label -1): evaluate on val, not test" % args.lmdb,
              file=sys.stderr)
        return 1
    # One model: rank its scores, as Caffe's Accuracy layer does in `caffe test`.
    scores = pred.model_scores[0]
    top1, top5 = evaluate.topk_accuracy(scores, y, 1), evaluate.topk_accuracy(scores, y, 5)
    per_class = evaluate.per_class_accuracy(scores, y, classes)
    csv_path = os.path.join(out, "per_class_%s.csv" % args.tta)
    confused = evaluate.confusions(probs, y)
    result = {"deploy": args.deploy, "weights": args.weights, "lmdb": args.lmdb, "tta": args.tta, "images": len(y),
              "preprocessing": mean.said,
              "top1": top1, "top5": top5, "images_per_second": len(y) / max(seconds, 1e-9),
              "confusions": [{"true": labels[t][0], "predicted": labels[p][0], "count": n}
                             for (t, p), n in confused]}
    try:
        os.makedirs(out, exist_ok=True)
        with atomic_open(csv_path, newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "wnid", "words", "images", "top1"])
            for c, n, acc in per_class:
                w.writerow([c, labels[c][0], labels[c][1], n, "" if acc is None else "%.4f" % acc])
        write_text(os.path.join(out, "eval_%s.json" % args.tta), json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        print("evaluate.py: error: %s: cannot write the results (%s); top-1 %.4f top-5 %.4f"
              % (exc.filename or out, exc.strerror or exc, top1, top5), file=sys.stderr)
        return 1
    print("%s on %s (%d images, tta %s): top-1 %.4f  top-5 %.4f  (%.0f images/s)"
          % (args.weights, args.lmdb, len(y), args.tta, top1, top5, result["images_per_second"]))
    print("preprocessing: %s" % mean.said)
    print("most confused (true -> predicted, count):")
    for (t, p), n in confused[:5]:
        print("  %s %s -> %s %s: %d" % (labels[t][0], labels[t][1], labels[p][0], labels[p][1], n))
    print("per-class accuracy: %s" % csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
