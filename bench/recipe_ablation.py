#!/usr/bin/env python3
"""What each piece of `--recipe modern` buys: the modern recipe, the modern recipe with one
piece put back to the paper's, and the paper's recipe, on the same net, data, iterations and
seeds, through scripts/train.sh (the `caffe` binary, CPU). Val top-1 at the end (the moving
average's where the solver tests it), mean and standard deviation over the seeds.

    .venv/bin/python bench/recipe_ablation.py [--variant resnet_tiny] [--iters 800] [--seeds 0,1,2]
                                              [--lmdb-dir data/sample/lmdb] [--out FILE.json]

The pieces (tinycaffe/solver.py's modernise and gen.py's modern net):
  schedule   warmup + cosine            -> the paper's multistep schedule
  nesterov   Nesterov                   -> SGD
  smoothing  label smoothing 0.1        -> none
  ema        weight EMA, tested         -> none
  norm_decay no decay on BatchNorm Scale -> decayed as in the paper's net
  weight_decay the modern recipe's 5e-4  -> the variant's paper value (resnet_tiny: 1e-4)
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from google.protobuf import text_format  # noqa: E402

from tinycaffe import caffe_env, gen  # noqa: E402

PIECES = ("schedule", "nesterov", "smoothing", "ema", "norm_decay", "weight_decay")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="resnet_tiny", help="a BatchNorm variant (default resnet_tiny)")
    p.add_argument("--iters", type=int, default=800, help="iterations (default 800)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated solver random seeds (default 0,1,2)")
    p.add_argument("--lmdb-dir", default=os.path.join(REPO, "data", "sample", "lmdb"),
                   help="LMDBs as make_lmdb.py writes them (default data/sample/lmdb, the quickstart's)")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/ablation-<date>.json)")
    return p


def files(variant, recipe, seed, iters, lmdb_dir, folder):
    """(solver message, net message) that gen_prototxt writes for the recipe."""
    cfg = gen.GenConfig(out=folder, lmdb_dir=lmdb_dir, mode="cpu", max_iter=iters, test_interval=max(1, iters // 4),
                        seed=seed, recipe=recipe, num_classes=_classes(lmdb_dir), val_size=_val_count(lmdb_dir))
    gen.generate([variant], cfg)
    pb2 = caffe_env.caffe_pb2()
    solver = text_format.Parse(_strip(os.path.join(folder, variant, "solver.prototxt")), pb2.SolverParameter())
    net = text_format.Parse(_strip(os.path.join(folder, variant, "train_val.prototxt")), pb2.NetParameter())
    return solver, net


def _strip(path):
    return "".join(line for line in open(path) if not line.startswith("#"))


def _manifest(lmdb_dir):
    return json.load(open(os.path.join(lmdb_dir, "manifest.json")))


def _classes(lmdb_dir):
    return _manifest(lmdb_dir)["num_classes"]


def _val_count(lmdb_dir):
    return _manifest(lmdb_dir)["splits"]["val"]["count"]


def without(piece, solver, net, paper_solver, paper_net):
    """The modern solver and net with `piece` put back to the paper's, in place."""
    if piece == "schedule":
        for field in ("lr_policy", "gamma", "stepsize", "stepvalue", "warmup_iter", "warmup_start_factor", "min_lr"):
            solver.ClearField(field)
        for field in ("lr_policy", "gamma", "stepsize"):
            if paper_solver.HasField(field):
                setattr(solver, field, getattr(paper_solver, field))
        solver.stepvalue.extend(paper_solver.stepvalue)
    elif piece == "nesterov":
        solver.type = "SGD"
    elif piece == "smoothing":
        for layer in net.layer:
            layer.loss_param.ClearField("label_smoothing")
            if not layer.loss_param.ListFields():
                layer.ClearField("loss_param")
    elif piece == "ema":
        solver.ClearField("ema_decay")
        solver.ClearField("test_ema")
    elif piece == "weight_decay":
        solver.weight_decay = paper_solver.weight_decay
    elif piece == "norm_decay":
        paper_scales = {layer.name: layer for layer in paper_net.layer if layer.type == "Scale"}
        for layer in net.layer:
            if layer.type == "Scale":
                del layer.param[:]
                layer.param.extend(paper_scales[layer.name].param)


def train(solver, net, folder):
    net_path, solver_path = os.path.join(folder, "train_val.prototxt"), os.path.join(folder, "solver.prototxt")
    solver.net = net_path
    with open(net_path, "w") as f:
        f.write(text_format.MessageToString(net))
    with open(solver_path, "w") as f:
        f.write(text_format.MessageToString(solver))
    run_dir = os.path.join(folder, "run")
    out = subprocess.run(["bash", "scripts/train.sh", solver_path, "--gpu", "cpu", "--run-dir", run_dir], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("recipe_ablation.py: error: training %s failed:\n%s" % (folder, out.stderr[-2000:]))
    return json.load(open(os.path.join(run_dir, "run.json")))["final"]["accuracy_top1"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    lmdb_dir = os.path.abspath(args.lmdb_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = ["modern"] + ["modern without %s" % piece for piece in PIECES] + ["paper"]
    results = {config: [] for config in configs}
    with tempfile.TemporaryDirectory(prefix="recipe_ablation.") as work:
        for seed in seeds:
            paper_solver, paper_net = files(args.variant, "paper", seed, args.iters, lmdb_dir,
                                            os.path.join(work, "paper_gen_%d" % seed))
            for n, config in enumerate(configs):
                if config == "paper":
                    solver, net = paper_solver, paper_net
                else:
                    solver, net = files(args.variant, "modern", seed, args.iters, lmdb_dir,
                                        os.path.join(work, "gen_%d_%d" % (seed, n)))
                    if config != "modern":
                        without(config.split()[-1], solver, net, paper_solver, paper_net)
                folder = os.path.join(work, "run_%d_%d" % (seed, n))
                os.makedirs(folder)
                results[config].append(train(solver, net, folder))
                print("%-28s seed %d  val top-1 %.1f %%" % (config, seed, 100 * results[config][-1]), flush=True)
    print("\n| %s, %d iterations | val top-1, seeds %s | mean ± sd | vs modern |\n|---|---|---|---|"
          % (args.variant, args.iters, " / ".join(map(str, seeds))))
    base = statistics.mean(results["modern"])
    for config in configs:
        values = results[config]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print("| %s | %s | %.1f ± %.1f | %+.1f |" % (config, " / ".join("%.1f" % (100 * v) for v in values),
                                                   100 * statistics.mean(values), 100 * sd,
                                                   100 * (statistics.mean(values) - base)))
    out = args.out or os.path.join(REPO, "bench", "results", "ablation-%s.json" % datetime.date.today().isoformat())
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(variant=args.variant, iters=args.iters, lmdb_dir=lmdb_dir, seeds=seeds, results=results), f,
                  indent=1)
    print("\nresults: %s" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
