#!/usr/bin/env python3
"""Write a small synthetic dataset in the exact tiny-imagenet-200 layout."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from tinycaffe import sample_data  # noqa: E402

# Defaults: small enough for a 2-core CPU demo, big enough to learn something.
DEFAULT_CLASSES = 10  # classes (first N real wnids)
DEFAULT_TRAIN = 100  # train images per class
DEFAULT_VAL = 20  # val images per class
DEFAULT_TEST = 20  # test images per class
DEFAULT_SEED = 0  # decides every pixel


EXAMPLES = """examples:
  %(prog)s data/sample/tiny-imagenet-200   a 10-class dataset in the Tiny ImageNet layout"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (e.g. data/sample/tiny-imagenet-200)")
    p.add_argument("--classes", type=int, default=DEFAULT_CLASSES,
                   help="number of classes, 1..%d (default %d)" % (sample_data.MAX_CLASSES, DEFAULT_CLASSES))
    p.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="train images per class (default %d)" % DEFAULT_TRAIN)
    p.add_argument("--val", type=int, default=DEFAULT_VAL, help="val images per class (default %d)" % DEFAULT_VAL)
    p.add_argument("--test", type=int, default=DEFAULT_TEST, help="test images per class (default %d)" % DEFAULT_TEST)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default %d)" % DEFAULT_SEED)
    p.add_argument("--colours", default="class", choices=sample_data.COLOUR_MODES,
                   help="class: each class has its own colour (8 shapes x 5 colours x 5 textures); random: "
                        "classes are shape x texture only (up to 40), every object a random colour, for "
                        "measuring colour augmentation (default class)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    total = args.classes * (args.train + args.val + args.test)
    try:
        with tqdm(total=max(total, 0), unit="img", disable=args.quiet, desc="sample data") as bar:
            summary = sample_data.generate(args.out_dir, args.classes, args.train, args.val, args.test,
                                           args.seed, progress=bar.update, colours=args.colours)
    except (ValueError, OSError) as exc:
        print("make_sample_data.py: error: %s" % exc, file=sys.stderr)
        return 2
    print("wrote %s: %d classes, %d train / %d val / %d test images (%d grayscale), seed %d, colours %s"
          % (args.out_dir, summary["classes"], summary["train"], summary["val"], summary["test"],
             summary["grayscale"], summary["seed"], summary["colours"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
