#!/usr/bin/env python3
"""Pictures of a trained model, as in the paper's Figure 4: the first conv layer's filters
(filters.png), the feature maps of one val image through the first conv layers
(features_<layer>.png), and a one-page run report (report.md) tying them to the curves,
per-class accuracy and confusions that train.py and evaluate.py wrote."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tinycaffe import data, evaluate, runs, visualize  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402


EXAMPLES = """examples:
  %(prog)s --deploy runs/tiny/RUN/deploy.prototxt --weights runs/tiny/RUN/snapshots/tiny_iter_20000.caffemodel
      filters.png and feature maps of one val image"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_model_arguments(p, "where the example image comes from")
    p.add_argument("--index", type=int, default=0, help="which record of --lmdb to show (default 0)")
    p.add_argument("--layers", type=int, default=2, help="conv layers whose maps are drawn (default 2)")
    p.add_argument("--out", default=None, help="folder for the PNGs and report.md (default: the weights' run dir)")
    runs.add_gpu_argument(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = args.out or evaluate.run_dir_of(args.weights)
    try:
        gpu = runs.parse_gpu(args.gpu, several=False)  # a device this build lacks: said before any data
        evaluate.resolve_data_arguments(args, args.deploy)
        net = evaluate.load_net(args.deploy, args.weights, gpu)
        if os.path.isfile(args.labels):
            evaluate.check_classes(net, args.deploy, args.labels)
        crop = evaluate.net_crop(net)
        # the net's own TEST transform (its train_val: mean_file or mean_value, scale), as evaluate.py uses
        pre = evaluate.preprocessing(args.deploy, args.train_val, args.mean, args.mean_given, args.lmdb, crop)
        records = list(data.iter_lmdb(args.lmdb, limit=args.index + 1))
        if len(records) <= args.index:
            raise evaluate.EvalError("--index %d: %s has only %d records" % (args.index, args.lmdb, len(records)))
        key, datum = records[args.index]
        chw = np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
        y, x, _ = evaluate.crop_offsets(chw.shape[-1], crop, "center")[0]
        image = pre.apply(chw)[:, y:y + crop, x:x + crop]
    except (evaluate.EvalError, data.DataError, runs.RunError, CaffeNotFound) as exc:
        print("visualize.py: error: %s" % exc, file=sys.stderr)
        return 1
    os.makedirs(out, exist_ok=True)
    layer, n, cols = visualize.filter_grid(net, os.path.join(out, "filters.png"))
    maps = visualize.feature_maps(net, image, out, layers=args.layers)
    report = visualize.write_report(out)
    print("filters of %s (%d, %d per row): %s" % (layer, n, cols, os.path.join(out, "filters.png")))
    for path in maps:
        print("feature maps of %s: %s" % (key, path))
    print("report: %s" % report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
