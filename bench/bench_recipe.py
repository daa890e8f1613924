#!/usr/bin/env python3
"""The same net trained by Caffe and by its PyTorch twin with the same recipe, the same epochs,
the same initial weights and the same data order, side by side in one run (issue 26).

    python3 bench/bench_recipe.py [--variant resnet_tiny] [--recipes paper,modern] [--seeds 0,1,2]
                                  [--iters 800] [--lmdb-dir data/sample/lmdb] [--gen-flags "--cutmix 1"]
                                  [--threads N] [--out FILE.json]

For each recipe and seed: gen_prototxt.py writes the net and solver (`--recipe`, `--seed`,
`--max-iter`, test every quarter); pycaffe's solver (seeded as `caffe train` is) gives the
initial weights, saved once; Caffe trains from them (`scripts/train.sh --weights`, the
`caffe` binary, CPU) and reports its last val top-1 (the moving average's when the solver tests
that); the twin (bench/torch_nets.py's, of the TRAIN net) loads the same weights and trains
with the same solver read from the same file: per-parameter lr_mult/decay_mult as Caffe's
param specs, torch.optim.SGD (Nesterov when Caffe's is), the rate of every iteration from
tinycaffe.train.scheduled_lr (Caffe's policies, patch 0013 included), cross_entropy with the
net's label_smoothing, the Mixup layer's mixup/CutMix drawn the same way, the weights' moving
average with patch 0015's rule (BatchNorm statistics included) tested when Caffe's is. Data:
the train LMDB read in key order, as Caffe's Data layer does, random crop + mirror with the
mean file subtracted (the `flip` preset: other presets have no twin here); val center-cropped.
Differences that remain, by design: each side's own random crops, SGD's momentum formulation
(Caffe folds the rate into the momentum), BatchNorm's running statistics (PyTorch's momentum
0.1, what its recipes use; Caffe's bias-corrected 0.999 average), float summation order.

Time is training plus its val tests, per epoch: Caffe's from its log (iteration 0 to
"Optimization Done"), the twin's loop (after preloading the LMDB into memory, which a
DataLoader would do per batch). Same threads for both (OMP/OpenBLAS and torch.set_num_threads).
PyTorch is a bench-only dependency: see bench/bench_cpu.py's ensure_torch (a venv made once).
"""
import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from bench_cpu import ensure_torch  # noqa: E402
from tinycaffe import caffe_env, data, devices  # noqa: E402
from tinycaffe.train import scheduled_lr  # noqa: E402

TORCH_BN_MOMENTUM = 0.1  # PyTorch's default, what its recipes train with
TWIN_TRANSFORM = {"crop_size", "mirror", "mean_file"}  # the `flip` preset: what the twin reproduces


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="resnet_tiny", help="a variant with a twin (default resnet_tiny)")
    p.add_argument("--recipes", default="paper,modern", help="comma-separated --recipe values (default paper,modern)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated solver random seeds (default 0,1,2)")
    p.add_argument("--iters", type=int, default=800, help="iterations (default 800)")
    p.add_argument("--lmdb-dir", default=os.path.join(REPO, "data", "sample", "lmdb"),
                   help="LMDBs as make_lmdb.py writes them (default data/sample/lmdb, the quickstart's; made here "
                        "when missing)")
    p.add_argument("--gen-flags", default="", help="more gen_prototxt.py flags for both, e.g. \"--cutmix 1\" "
                                                   "(default none)")
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: the CPUs this may use)")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/recipe-<date>.json)")
    return p


def run(cmd, **kw):
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.exit("bench_recipe.py: error: %s failed:\n%s" % (" ".join(cmd[:3]), (out.stderr or out.stdout)[-2000:]))
    return out


def ensure_lmdbs(lmdb_dir):
    if os.path.isfile(os.path.join(lmdb_dir, "mean.binaryproto")):
        return
    sample = os.path.join(os.path.dirname(lmdb_dir), "tiny-imagenet-200")
    print("[bench_recipe] making the sample data in %s" % os.path.dirname(lmdb_dir), file=sys.stderr)
    if not os.path.isdir(sample):
        run([sys.executable, "tools/make_sample_data.py", sample, "--quiet"])
    run([sys.executable, "tools/make_lmdb.py", sample, lmdb_dir, "--quiet"])


def generate(variant, recipe, seed, iters, lmdb_dir, folder, gen_flags):
    run([sys.executable, "tools/gen_prototxt.py", "--variants", variant, "--out", folder, "--lmdb-dir", lmdb_dir,
         "--mode", "cpu", "--recipe", recipe, "--seed", str(seed), "--max-iter", str(iters),
         "--test-interval", str(max(1, iters // 4))] + gen_flags.split())
    return os.path.join(folder, variant, "solver.prototxt")


def read(path, message):
    with open(path) as f:
        return text_format.Parse(f.read(), message)


def initial_weights(solver_path, out):
    """The weights `caffe train` starts from (pycaffe's solver, seeded by random_seed), saved."""
    caffe = caffe_env.import_caffe()
    caffe.set_mode_cpu()
    message = read(solver_path, caffe_env.caffe_pb2().SolverParameter())
    message.snapshot_prefix = os.path.join(os.path.dirname(out), "init")  # the solver checks it is writable
    copy = os.path.join(os.path.dirname(out), "init_solver.prototxt")
    with open(copy, "w") as f:
        f.write(text_format.MessageToString(message))
    caffe.get_solver(copy).net.save(out)
    return out


# ---------------------------------------------------------------- Caffe
GLOG_TIME = re.compile(r"^[IWEF]\d{4,8} (\d\d):(\d\d):(\d\d\.\d+)")


def log_seconds(log_path):
    """Seconds from the solver's first iteration line to "Optimization Done" in a Caffe log."""
    start = end = None
    with open(log_path, errors="replace") as f:
        for line in f:
            m = GLOG_TIME.match(line)
            if not m:
                continue
            t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
            if start is None and "Iteration 0," in line:
                start = t
            if "Optimization Done" in line:
                end = t
    if start is None or end is None:
        return None
    return (end - start) % 86400


def caffe_train(solver_path, init, run_dir, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    run(["bash", "scripts/train.sh", solver_path, "--gpu", "cpu", "--engine", "binary", "--weights", init,
         "--run-dir", run_dir], env=env)
    record = json.load(open(os.path.join(run_dir, "run.json")))
    return record["final"]["accuracy_top1"], log_seconds(os.path.join(run_dir, "caffe.log"))


# ---------------------------------------------------------------- the PyTorch twin
def load_split(lmdb_path):
    """(uint8 N x C x H x W, int64 labels) in key order: the order Caffe's Data layer reads."""
    images, labels = [], []
    for _, datum in data.iter_lmdb(lmdb_path):
        images.append(np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width))
        labels.append(datum.label)
    return np.stack(images), np.asarray(labels, np.int64)


def transform(images, mean, crop, rng, train):
    """Caffe's DataTransformer for crop + mirror + mean_file: random offsets and flips in TRAIN,
    the center in TEST; the mean is cropped at the same offsets."""
    n, _, h, w = images.shape
    out = np.empty((n, images.shape[1], crop, crop), np.float32)
    for i in range(n):
        if train:
            y, x, flip = rng.randint(h - crop + 1), rng.randint(w - crop + 1), rng.randint(2)
        else:
            y, x, flip = (h - crop) // 2, (w - crop) // 2, 0
        v = images[i, :, y:y + crop, x:x + crop].astype(np.float32) - mean[:, y:y + crop, x:x + crop]
        out[i] = v[:, :, ::-1] if flip else v
    return out


def split_mixup(net):
    """Remove the Mixup layer (the twin mixes in the loop) -> its MixupParameter or None."""
    for i, layer in enumerate(net.layer):
        if layer.type == "Mixup":
            param = layer.mixup_param
            del net.layer[i]
            return param
    return None


def mix(x, y, param, rng):
    """Patch 0016's draw: (x, partner labels, lambda)."""
    if param is None or rng.rand() >= param.prob:
        return x, y, 1.0
    cutmix = param.cutmix_alpha > 0 and (param.alpha == 0 or rng.rand() < param.switch_prob)
    lam = rng.beta(*(2 * [param.cutmix_alpha if cutmix else param.alpha]))
    perm = rng.permutation(len(x))
    x = x.copy()
    if cutmix:
        h, w = x.shape[2:]
        cut = math.sqrt(1 - lam)
        ch, cw, cy, cx = int(h * cut), int(w * cut), rng.randint(h), rng.randint(w)
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, y[perm], lam


def param_groups(twin, net, solver):
    """Caffe's ParamSpec lr_mult/decay_mult for each twin parameter (BatchNorm's affine part is
    its Scale layer's)."""
    specs = {layer.name: list(layer.param) for layer in net.layer}
    groups = []
    for name, module in twin.layers.items():
        owner = twin.scale_of.get(name, name)
        for index, (_, tensor) in enumerate(module.named_parameters(recurse=False)):
            spec = specs.get(owner, [])
            lr_mult = spec[index].lr_mult if index < len(spec) else 1.0
            decay_mult = spec[index].decay_mult if index < len(spec) else 1.0
            groups.append(dict(params=[tensor], lr_mult=lr_mult, weight_decay=solver.weight_decay * decay_mult,
                               lr=solver.base_lr * lr_mult))
    return groups


def twin_accuracy(model, images, labels, mean, crop, logits_blob, batch=100):
    import torch
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(transform(images[start:start + batch], mean, crop, None, False))
            scores = model(x, torch.from_numpy(labels[start:start + batch]))[logits_blob]
            correct += int((scores.argmax(1).numpy() == labels[start:start + batch]).sum())
    model.train()
    return correct / float(len(images))


def twin_train(solver_path, init, lmdb_dir, seed, threads):
    import torch
    import torch_nets
    from torch.nn import functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    pb2 = caffe_env.caffe_pb2()
    solver = read(solver_path, pb2.SolverParameter())
    net = read(solver.net, pb2.NetParameter())
    mixup = split_mixup(net)
    train_layer = next(layer for layer in net.layer if layer.type == "Data" and layer.include[0].phase == 0)
    tp = train_layer.transform_param
    extra = {f.name for f, _ in tp.ListFields()} - TWIN_TRANSFORM
    if extra:
        sys.exit("bench_recipe.py: error: the twin has crop + mirror + mean only (--augment flip); the net also "
                 "has %s" % ", ".join(sorted(extra)))
    if solver.type not in ("SGD", "Nesterov", ""):
        sys.exit("bench_recipe.py: error: solver type %s has no twin here (SGD, Nesterov)" % solver.type)
    loss_layer = next(layer for layer in net.layer if layer.type == "SoftmaxWithLoss")
    smoothing, logits_blob = loss_layer.loss_param.label_smoothing, loss_layer.bottom[0]
    crop, batch = tp.crop_size, train_layer.data_param.batch_size
    mean = data.read_mean(tp.mean_file)
    train_x, train_y = load_split(train_layer.data_param.source)
    val_source = next(layer for layer in net.layer if layer.type == "Data" and layer.include[0].phase == 1)
    val_x, val_y = load_split(val_source.data_param.source)

    caffe = caffe_env.import_caffe()
    start_net = caffe.Net(solver.net, init, caffe.TEST)
    twin = torch_nets.build(net, (batch, 3, crop, crop), "TRAIN")
    torch_nets.load_caffe_weights(twin, start_net)
    for module in twin.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = TORCH_BN_MOMENTUM
    twin.train()
    groups = param_groups(twin, net, solver)
    optimiser = torch.optim.SGD(groups, lr=solver.base_lr, momentum=solver.momentum,
                                nesterov=solver.type == "Nesterov")
    ema = None
    if solver.ema_decay > 0:
        ema = {k: v.detach().clone() for k, v in twin.state_dict().items() if v.dtype.is_floating_point}
    rng = np.random.RandomState(seed)
    tested = []

    def test():
        if ema is not None and solver.test_ema:
            raw = {k: v.detach().clone() for k, v in twin.state_dict().items()}
            twin.load_state_dict(dict(raw, **ema))
            tested.append(twin_accuracy(twin, val_x, val_y, mean, crop, logits_blob))
            twin.load_state_dict(raw)
        else:
            tested.append(twin_accuracy(twin, val_x, val_y, mean, crop, logits_blob))

    t0 = time.perf_counter()
    for it in range(solver.max_iter):
        if solver.test_initialization and it == 0 or it and it % solver.test_interval == 0:
            test()
        rate = scheduled_lr(solver, it)
        for group in optimiser.param_groups:
            group["lr"] = rate * group["lr_mult"]
        index = (np.arange(batch) + it * batch) % len(train_x)
        x = transform(train_x[index], mean, crop, rng, True)
        y = train_y[index]
        x, y_mix, lam = mix(x, y, mixup, rng)
        scores = twin(torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y))[logits_blob]
        loss = lam * F.cross_entropy(scores, torch.from_numpy(y), label_smoothing=smoothing)
        if lam < 1:
            loss = loss + (1 - lam) * F.cross_entropy(scores, torch.from_numpy(y_mix), label_smoothing=smoothing)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if ema is not None:
            decay = min(solver.ema_decay, (1.0 + it) / (10.0 + it))
            with torch.no_grad():
                for k, v in twin.state_dict().items():
                    if k in ema:
                        ema[k].mul_(decay).add_(v, alpha=1 - decay)
    test()
    return tested[-1], time.perf_counter() - t0


# ---------------------------------------------------------------- the table
def spread(values):
    return "%.1f ± %.1f" % (100 * statistics.mean(values), 100 * (statistics.stdev(values) if len(values) > 1 else 0))


def main(argv=None):
    args = build_parser().parse_args(argv)
    ensure_torch(sys.argv[1:] if argv is None else argv, __file__)
    threads = args.threads or devices.usable_cpus()
    lmdb_dir = os.path.abspath(args.lmdb_dir)
    ensure_lmdbs(lmdb_dir)
    train_count = data.lmdb_count(os.path.join(lmdb_dir, "train_lmdb"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_recipe.") as work:
        for recipe in args.recipes.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                folder = os.path.join(work, "%s_s%d" % (recipe, seed))
                solver_path = generate(args.variant, recipe, seed, args.iters, lmdb_dir, folder, args.gen_flags)
                solver = read(solver_path, caffe_env.caffe_pb2().SolverParameter())
                epochs = args.iters * read(solver.net, caffe_env.caffe_pb2().NetParameter()).layer[0] \
                    .data_param.batch_size / float(train_count)
                init = initial_weights(solver_path, os.path.join(folder, "init.caffemodel"))
                caffe_top1, caffe_s = caffe_train(solver_path, init, os.path.join(folder, "run"), threads)
                torch_top1, torch_s = twin_train(solver_path, init, lmdb_dir, seed, threads)
                row = dict(recipe=recipe, seed=seed, epochs=epochs, caffe_top1=caffe_top1, torch_top1=torch_top1,
                           caffe_s_per_epoch=caffe_s / epochs, torch_s_per_epoch=torch_s / epochs,
                           time_ratio=caffe_s / torch_s)
                rows.append(row)
                print("%-7s seed %d  %.1f epochs  val top-1 Caffe %.1f %%  twin %.1f %%  s/epoch Caffe %.2f  twin %.2f"
                      "  Caffe/twin time %.2f" % (recipe, seed, epochs, 100 * caffe_top1, 100 * torch_top1,
                                                  row["caffe_s_per_epoch"], row["torch_s_per_epoch"],
                                                  row["time_ratio"]), flush=True)
    print("\n| recipe | seeds | Caffe val top-1 | twin val top-1 | Caffe − twin | Caffe s/epoch | twin s/epoch "
          "| time Caffe/twin |\n|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        mine = [r for r in rows if r["recipe"] == recipe]
        gap = statistics.mean(r["caffe_top1"] - r["torch_top1"] for r in mine)
        print("| %s | %s | %s | %s | %+.1f | %.2f | %.2f | %.2f |"
              % (recipe, ",".join(str(r["seed"]) for r in mine), spread([r["caffe_top1"] for r in mine]),
                 spread([r["torch_top1"] for r in mine]), 100 * gap,
                 statistics.median(r["caffe_s_per_epoch"] for r in mine),
                 statistics.median(r["torch_s_per_epoch"] for r in mine),
                 statistics.median(r["time_ratio"] for r in mine)))
    import torch
    out = args.out or os.path.join(REPO, "bench", "results", "recipe-%s.json" % datetime.date.today().isoformat())
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(variant=args.variant, iters=args.iters, lmdb_dir=lmdb_dir, gen_flags=args.gen_flags,
                       threads=threads, torch=torch.__version__, rows=rows), f, indent=1)
    print("\nresults: %s" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
