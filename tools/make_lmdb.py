#!/usr/bin/env python3
"""Convert tiny-imagenet-200/ into Caffe LMDBs, mean.binaryproto, labels.txt and manifest.json."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from tinycaffe import data  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402


EXAMPLES = """examples:
  %(prog)s data/tiny-imagenet-200 data/lmdb   train/val/test LMDBs, mean.binaryproto, labels.txt, manifest.json"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR", help="the tiny-imagenet-200 folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write (e.g. data/lmdb); must not exist unless --force")
    p.add_argument("--workers", type=int, default=None,
                   help="decode processes (default: the CPUs this process may use, %d here)" % data.default_workers())
    p.add_argument("--seed", type=int, default=data.DEFAULT_SEED,
                   help="train shuffle seed (default %d)" % data.DEFAULT_SEED)
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT_DIR, only once the new one is complete (default: refuse)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip undecodable images and list them in the manifest (default: stop with an error)")
    p.add_argument("--splits", default=",".join(data.DEFAULT_SPLITS),
                   help="comma-separated subset of train,val,test (default %s)" % ",".join(data.DEFAULT_SPLITS))
    p.add_argument("--size", type=int, default=data.DEFAULT_SIZE,
                   help="output side in pixels; other sizes are resized %s (default %d)"
                   % (data.RESIZE_FILTER.lower(), data.DEFAULT_SIZE))
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        print("make_lmdb.py: error: --workers must be >= 1, got %d" % args.workers, file=sys.stderr)
        return 2
    bars = []

    def progress_factory(split, total):
        bar = tqdm(total=total, desc=split, unit="img", disable=args.quiet)
        bars.append(bar)
        return bar.update

    try:
        manifest = data.make_lmdbs(args.data_dir, args.out_dir, workers=args.workers, seed=args.seed,
                                   force=args.force, skip_bad=args.skip_bad,
                                   splits=[s for s in args.splits.split(",") if s], size=args.size,
                                   progress_factory=progress_factory)
    except (data.DataError, CaffeNotFound, OSError) as exc:
        for bar in bars:
            bar.close()
        print("make_lmdb.py: error: %s" % exc, file=sys.stderr)
        return 1
    finally:
        for bar in bars:
            bar.close()
    counts = ", ".join("%s %d" % (s, v["count"]) for s, v in manifest["splits"].items())
    skipped = len(manifest["skipped"])
    print("wrote %s: %s images, %d classes, %d skipped, %d resized, %.1f s (%.0f images/s)"
          % (args.out_dir, counts, manifest["num_classes"], skipped,
             sum(v["resized"] for v in manifest["splits"].values()),
             manifest["elapsed_seconds"], manifest["images_per_second"]))
    for item in manifest["skipped"]:
        print("  skipped %s: %s" % (item["file"], item["reason"]))
    if "mean_bgr" in manifest:
        print("mean (B, G, R) = %s  -> transform_param { mean_file: \"%s\" }"
              % (", ".join("%.2f" % v for v in manifest["mean_bgr"]), os.path.join(args.out_dir, "mean.binaryproto")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
