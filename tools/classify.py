#!/usr/bin/env python3
"""Classify JPEG/PNG files of any size with a trained model (or an ensemble): the top classes of
each image with wnid, words and probability. Images are resized and mean-subtracted exactly as
make_lmdb.py and evaluate.py's val path do, so a val image gets the same answer here as there."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from tinycaffe import classify, data, evaluate, runs  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402

EXAMPLES = """examples:
  %(prog)s photo.jpg --model runs/tiny/RUN/deploy.prototxt runs/tiny/RUN/snapshots/tiny_iter_20000.caffemodel
      the five most likely classes of one image
  %(prog)s my_images/ --model D1 W1 --model D2 W2 --top 1 --json
      the best class of every JPEG/PNG in a folder, by an ensemble, as one JSON list"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files, or folders searched at any depth")
    p.add_argument("--model", nargs=2, action="append", required=True, metavar=("DEPLOY", "WEIGHTS"),
                   help="a model (repeat for an ensemble: the average of their softmax)")
    p.add_argument("--weight", type=float, action="append",
                   help="weight of each --model in the average, in order (default: all equal)")
    p.add_argument("--top", type=int, default=classify.DEFAULT_TOP,
                   help="classes listed per image (default %d)" % classify.DEFAULT_TOP)
    p.add_argument("--json", action="store_true",
                   help='print one JSON list, an object per image: {"image", "top": [{"wnid", "words", "prob"}]} '
                        "(default: text)")
    p.add_argument("--lmdb", default=None,
                   help="the model's val LMDB, whose labels.txt, mean and image size apply (default: the one the "
                        "train_val.prototxt beside the first deploy file tests on)")
    p.add_argument("--mean", default=None, help=evaluate.MEAN_HELP)
    p.add_argument("--labels", default=None, help=evaluate.LABELS_HELP)
    p.add_argument("--train-val", default=None, help=evaluate.TRAIN_VAL_HELP)
    p.add_argument("--batch", type=int, default=evaluate.DEFAULT_BATCH,
                   help="images per forward (default %d)" % evaluate.DEFAULT_BATCH)
    runs.add_gpu_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show it for 100+ images)")
    return p


def as_text(results):
    lines = []
    for item in results:
        lines.append(item["image"])
        for rank, c in enumerate(item["top"], 1):
            lines.append("  %d. %.4f  %s  %s" % (rank, c["prob"], c["wnid"], c["words"]))
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        evaluate.check_batch(args.batch)
        if args.weight and len(args.weight) != len(args.model):
            raise classify.ClassifyError("%d --weight values for %d --model pairs" % (len(args.weight),
                                                                                      len(args.model)))
        if args.weight and (min(args.weight) < 0 or sum(args.weight) <= 0):
            raise classify.ClassifyError("--weight values must be >= 0 and not all 0")
        paths = classify.image_paths(args.images)
        gpu = runs.parse_gpu(args.gpu, several=False)
        model = classify.Classifier(args.model, args.lmdb, args.mean, args.labels, args.train_val, gpu, args.weight)
        failed = []  # one image that does not decode spoils no folder: said, and the exit status is 1
        with tqdm(total=len(paths), unit="img", desc="classify", disable=args.quiet or len(paths) < 100,
                  file=sys.stderr) as bar:
            results = model.classify(paths, args.top, args.batch, bar.update, failed)
    except (evaluate.EvalError, data.DataError, runs.RunError, CaffeNotFound) as exc:
        print("classify.py: error: %s" % exc, file=sys.stderr)
        return 1
    if results:
        print(json.dumps(results, indent=1) if args.json else as_text(results))
    for message in failed:
        print("classify.py: error: %s" % message, file=sys.stderr)
    if failed:
        print("classify.py: %d of %d images could not be read (above); the others are classified"
              % (len(failed), len(paths)), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
