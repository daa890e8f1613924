#!/usr/bin/env python3
"""Generate prototxt/<variant>/{train_val,deploy,solver}.prototxt for the paper's variants,
start a new variant from an old one (--from prototxt/tiny --to prototxt/mine), or check
hand-edited prototxt files with real Caffe (--check FILE ...)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinycaffe import REPO_ROOT, augment, data, fit, gen, nets, solver  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402
from tinycaffe.files import PrototxtError  # noqa: E402


EXAMPLES = """examples:
  %(prog)s --lmdb-dir data/lmdb                      all variants into prototxt/ for make_lmdb.py's output
  %(prog)s --from prototxt/tiny --to prototxt/mine   a copy of a variant to edit
  %(prog)s --check prototxt/mine/solver.prototxt     check an edited variant with real Caffe"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", nargs="+", metavar="FILE",
                   help="check these prototxt files (net or solver) instead of generating")
    p.add_argument("--from", dest="from_dir", metavar="DIR", default=None,
                   help="start a new variant from this variant folder (e.g. prototxt/tiny), with --to "
                        "(default: generate from the builders)")
    p.add_argument("--to", dest="to_dir", metavar="DIR", default=None,
                   help="with --from: the new variant folder (e.g. prototxt/mine); its solver trains its own "
                        "train_val.prototxt and snapshots under runs/<name>/ (default: none)")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="with --check: the images a net's data layers give when neither their LMDB, their mean file "
                        "nor a deploy net beside them says (default: those)")
    p.add_argument("--variants", default="all",
                   help="all, or comma-separated names from: %s (default all)" % ", ".join(nets.VARIANTS))
    p.add_argument("--out", default=gen.DEFAULT_OUT, help="output folder (default %s)" % gen.DEFAULT_OUT)
    p.add_argument("--lmdb-dir", default=None,
                   help="where make_lmdb.py wrote, as written into the nets (default %s); with --check, the "
                        "data the nets are checked against (default: the LMDBs their Data layers read)"
                   % gen.DEFAULT_LMDB_DIR)
    p.add_argument("--crop", type=int, default=gen.DEFAULT_CROP, help="crop side (default %d)" % gen.DEFAULT_CROP)
    p.add_argument("--batch-size", type=int, default=None,
                   help="train batch (default per variant: %s); the BatchNorm families' base_lr follows it "
                        "linearly: 0.1 x batch/128, times 4 for resnet_tiny"
                   % ", ".join("%s %d" % (n, v.batch_size) for n, v in nets.VARIANTS.items()))
    p.add_argument("--schedule", default="fast", choices=sorted(solver.SCHEDULES),
                   help="fast: LR/10 every 5,000 iterations of 20,000, alexnet: every 100,000 of 450,000; the "
                        "BatchNorm families (resnet*, inception_small) /10 at 50%% and 75%% of those lengths "
                        "(default fast)")
    p.add_argument("--solver", default="sgd", choices=sorted(solver.SOLVER_TYPES),
                   help="solver type (default sgd)")
    p.add_argument("--mode", default="gpu", choices=sorted(solver.MODES), help="solver_mode (default gpu)")
    p.add_argument("--max-iter", type=int, default=None,
                   help="iterations (default: the schedule's, %s)"
                   % ", ".join("%s %d" % (k, v["max_iter"]) for k, v in solver.SCHEDULES.items()))
    p.add_argument("--test-interval", type=int, default=None,
                   help="iterations between val tests (default: the schedule's, %s)"
                   % ", ".join("%s %d" % (k, v["test_interval"]) for k, v in solver.SCHEDULES.items()))
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes (default: the line count of --labels, else of labels.txt in --lmdb-dir, else %d)"
                   % gen.DEFAULT_NUM_CLASSES)
    p.add_argument("--labels", default=None, help="labels.txt to take the class count from (default: none)")
    p.add_argument("--val-size", type=int, default=None,
                   help="val images, so that test_iter covers val exactly once (default: the record count of "
                        "val_lmdb in --lmdb-dir, else %d)" % gen.DEFAULT_VAL_SIZE)
    p.add_argument("--augment", default=augment.DEFAULT_PRESET, choices=list(augment.PRESETS),
                   help="TRAIN augmentation: none (random crop), flip (+ mirror), colour (+ SSD's brightness/"
                        "contrast/saturation/hue distortion), scale (+ random-resized crop), full (all of them "
                        "+ PCA lighting on the LMDBs' own colour basis); values in tinycaffe/augment.py "
                        "(default %s)" % augment.DEFAULT_PRESET)
    p.add_argument("--recipe", default="paper", choices=solver.RECIPES,
                   help="paper: the paper's step schedules (SGD); modern: the same base LR and length with a "
                        "1-epoch warmup, a cosine to 0, Nesterov, label smoothing 0.1, a tested weight EMA and no "
                        "decay on BatchNorm/Scale/bias/PReLU (Caffe patches 0013-0015) (default paper)")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup of each TRAIN batch, lambda ~ Beta(ALPHA, ALPHA) (DeiT: 0.8, ResNet strikes back: 0.1-0.2), by a Mixup layer after "
                        "the data and a loss on both labels (Caffe patch 0016) (default 0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="CutMix of each TRAIN batch, lambda ~ Beta(ALPHA, ALPHA) (timm and DeiT: 1.0); with --mixup too, "
                        "each batch is one or the other, half the time each (default 0: off)")
    p.add_argument("--random-erasing", type=float, default=0.0, metavar="PROB",
                   help="erase one random rectangle (area 2-33%%, aspect 0.3-3.3, set to the mean) of a TRAIN image "
                        "with probability PROB, last, after mirror and mean: random erasing, Zhong et al. 2017, "
                        "timm's ranges (timm's recipes: 0.25, with noise where this fills the mean; Caffe patch "
                        "0018) (default 0: off)")
    p.add_argument("--seed", type=int, default=solver.RANDOM_SEED,
                   help="solver random_seed (default %d)" % solver.RANDOM_SEED)
    return p


def _fail(message):
    print("gen_prototxt.py: error: %s" % message, file=sys.stderr)
    return 1


def _input_shape(text):
    if text is None:
        return None
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError("--input-shape %s: expected C,H,W, three integers >= 1 (e.g. 3,64,64)" % text)
    return shape


def _num_classes(args):
    if args.num_classes is not None:
        return args.num_classes
    labels = args.labels or _in_lmdb_dir(args, "labels.txt")
    if labels:
        with open(labels) as f:
            return sum(1 for line in f if line.strip())
    return gen.DEFAULT_NUM_CLASSES


def _val_size(args):
    """--val-size, else the val LMDB's own record count (test_iter then covers it exactly once)."""
    if args.val_size is not None:
        return args.val_size
    val = _in_lmdb_dir(args, "val_lmdb")
    if not val:
        return gen.DEFAULT_VAL_SIZE
    count = data.lmdb_count(val)
    if not count:
        raise ValueError("%s is empty (no records): rerun make_lmdb.py, or give --val-size" % val)
    return count


def _in_lmdb_dir(args, name):
    """name inside the --lmdb-dir given, or None."""
    if not args.lmdb_dir:
        return None
    path = os.path.join(fit.absolute(args.lmdb_dir, REPO_ROOT), name)
    return path if os.path.exists(path) else None


def _resolve_lmdb_dir(args):
    """--lmdb-dir as written into the nets: relative to the repo root (so that runs work from any
    directory), or absolute where the folder given exists from here but not from the repo root.
    A folder that exists nowhere yet is said: the nets' class count and test_iter are defaults."""
    if not args.lmdb_dir:
        return
    from_repo = fit.absolute(args.lmdb_dir, REPO_ROOT)
    if not os.path.isdir(from_repo) and os.path.isdir(args.lmdb_dir):
        args.lmdb_dir = os.path.abspath(args.lmdb_dir)
    elif not os.path.isdir(from_repo):
        print("gen_prototxt.py: note: --lmdb-dir %s does not exist (yet; relative paths are taken from the repo root "
              "%s): the nets get %s and test_iter for %s val images; regenerate after make_lmdb.py, or give "
              "--num-classes and --val-size" % (args.lmdb_dir, REPO_ROOT,
                                                "%d classes" % args.num_classes if args.num_classes
                                                else "%d classes" % gen.DEFAULT_NUM_CLASSES,
                                                args.val_size or gen.DEFAULT_VAL_SIZE), file=sys.stderr)


def run_check(files, lmdb_dir, input_shape=None):
    from tinycaffe import check
    problems = check.check_files(files, lmdb_dir=lmdb_dir, input_shape=input_shape)
    for problem in problems:
        print("problem: " + problem, file=sys.stderr)
    print("%d file(s) checked, %d problem(s)" % (len(files), len(problems)))
    return 1 if problems else 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            return run_check(args.check, args.lmdb_dir, _input_shape(args.input_shape))
        if args.from_dir or args.to_dir:
            if not (args.from_dir and args.to_dir):
                return _fail("--from and --to go together (e.g. --from prototxt/tiny --to prototxt/mine)")
            written = gen.copy_variant(args.from_dir, args.to_dir)
            for path in written:
                print("wrote " + path)
            print("train it: scripts/train.sh %s" % os.path.join(args.to_dir, "solver.prototxt"))  # the user's path
            return 0
        _resolve_lmdb_dir(args)
        names = list(nets.VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
        unknown = [n for n in names if n not in nets.VARIANTS]
        if unknown or not names:
            return _fail("--variants: unknown %s (valid: all, %s)" % (",".join(unknown) or "(none)",
                                                                      ", ".join(nets.VARIANTS)))
        cfg = gen.GenConfig(out=args.out, lmdb_dir=args.lmdb_dir or gen.DEFAULT_LMDB_DIR, crop=args.crop,
                            batch_size=args.batch_size,
                            schedule=args.schedule, solver=args.solver, mode=args.mode, max_iter=args.max_iter,
                            test_interval=args.test_interval,
                            num_classes=_num_classes(args), val_size=_val_size(args), seed=args.seed,
                            augment=args.augment, recipe=args.recipe, mixup=args.mixup, cutmix=args.cutmix,
                            random_erasing=args.random_erasing)
        written = gen.generate(names, cfg)
    except (ValueError, KeyError, OSError, CaffeNotFound, PrototxtError, data.DataError) as exc:
        return _fail(str(exc).strip("'\""))
    for path in written:
        print("wrote " + path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
