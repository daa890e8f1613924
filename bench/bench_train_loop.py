#!/usr/bin/env python3
"""Training images/s as users feel it: scripts/train.sh with --augment full against the PyTorch
twin's DataLoader loop with the equivalent torchvision transforms, same net, batch and threads.

For each variant, in one run:
  (a) Caffe: gen_prototxt.py --augment full (the TRAIN LMDB; random-resized crop, SSD's colour
      distortion, PCA lighting, mirror, mean file: patch 0010 inside Caffe's Data layer), then
      scripts/train.sh on the CPU with the caffe binary; images/s from Caffe's log between its
      first logged iteration after WARMUP and its last (start-up excluded).
  (b) the twin: bench/torch_nets.py's module of the same TRAIN net, fed by a torch DataLoader over
      torchvision's ImageFolder on the same train JPEGs (the LMDB manifest's source), with
      RandomResizedCrop (same crop, area and aspect), RandomHorizontalFlip, brightness, contrast,
      saturation and hue each RandomApply'd with the preset's probability and strength, PCA
      lighting on the manifest's basis (timm's / fb.resnet.torch's Lighting) and the mean
      subtracted; SGD with momentum, cross-entropy; images/s over the same iterations after
      the same warm-up. Each --workers count is timed; the fastest is the twin's figure.
Same threads: OMP/OpenBLAS threads for Caffe = torch.set_num_threads for the twin (Caffe adds
its one prefetch thread, the DataLoader its worker processes). The ratio is Caffe's images/s
over the twin's best (goal >= 1.0). PyTorch and torchvision are bench-only dependencies (the
venv of bench/bench_cpu.py, made once).

    python3 bench/bench_train_loop.py [--variants tiny,resnet_tiny,alexnet] [--lmdb-dir data/sample/lmdb]
                                      [--batch 64] [--iters 40] [--threads 2] [--workers 0,1,2] [--json F]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from google.protobuf import text_format  # noqa: E402

from bench_cpu import ensure_torch  # noqa: E402
from tinycaffe import caffe_env, caffelog, check, devices  # noqa: E402

DEFAULT_VARIANTS = "tiny,resnet_tiny,alexnet"  # small nets, where the data path shows
WARMUP = 5  # iterations before the clock starts, on both sides (allocations, worker start-up)
DISPLAY = 5  # Caffe logs every 5 iterations: the points its rate is read from
TORCHVISION_SPEC = os.environ.get("TORCHVISION_SPEC", "torchvision==0.28.0")  # matches bench_cpu's torch 2.13.0


def ensure_torchvision():
    """Install torchvision into the bench venv once, and import it.

    PyPI's torchvision is built against the CUDA torch; its C++ operators (nms, roi_align: detection
    only) cannot load into the bench venv's CPU torch, and registering their meta kernels fails at
    import. The transforms and ImageFolder used here are Python and PIL, so that registration is
    skipped (an empty module in its place); nothing measured runs through those operators.
    """
    import importlib.util
    import types
    if importlib.util.find_spec("torchvision") is None:
        print("[bench_train_loop] installing %s into the bench venv, once" % TORCHVISION_SPEC, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        TORCHVISION_SPEC], check=True)
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision
    return torchvision.__version__


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated variants (default %s)"
                   % DEFAULT_VARIANTS)
    p.add_argument("--lmdb-dir", default=os.path.join(REPO, "data", "sample", "lmdb"),
                   help="LMDBs made by make_lmdb.py; their manifest names the JPEGs the twin reads "
                        "(default data/sample/lmdb, written by scripts/quickstart.sh)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--iters", type=int, default=40, help="iterations per run, warm-up included (default 40)")
    p.add_argument("--threads", type=int, default=devices.usable_cpus(),
                   help="compute threads for both (default: the usable CPUs, %d here)" % devices.usable_cpus())
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time (default 0,1,2)")
    p.add_argument("--json", default=None, help="also write the figures to this file (default: none)")
    return p


# ---------------------------------------------------------------- Caffe
def caffe_solver(variant, lmdb_dir, batch, iters, folder):
    subprocess.run([sys.executable, "tools/gen_prototxt.py", "--variants", variant, "--out", folder,
                    "--lmdb-dir", lmdb_dir, "--mode", "cpu", "--augment", "full", "--batch-size", str(batch),
                    "--max-iter", str(iters), "--test-interval", str(iters + 1)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    path = os.path.join(folder, variant, "solver.prototxt")
    solver = caffe_env.caffe_pb2().SolverParameter()
    with open(path) as f:
        text_format.Merge(f.read(), solver)
    solver.display = DISPLAY
    solver.snapshot = 0
    solver.snapshot_after_train = False
    with open(path, "w") as f:
        f.write(text_format.MessageToString(solver))
    return path


def caffe_images_per_second(solver_path, batch, threads, folder):
    run_dir = os.path.join(folder, "run")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    out = subprocess.run(["bash", "scripts/train.sh", solver_path, "--gpu", "cpu", "--engine", "binary",
                          "--run-dir", run_dir], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("bench_train_loop.py: error: scripts/train.sh failed:\n%s" % out.stderr[-2000:])
    rows, _ = caffelog.parse(os.path.join(run_dir, "caffe.log"))
    timed = [r for r in rows if r["NumIters"] >= WARMUP]
    first, last = timed[0], timed[-1]
    return (last["NumIters"] - first["NumIters"]) * batch / (last["Seconds"] - first["Seconds"])


# ---------------------------------------------------------------- the twin
class Lighting:
    """PCA lighting as fb.resnet.torch and timm do it, on a C x H x W float tensor in RGB order:
    + eigvec . (alpha * eigval), alpha ~ N(0, alphastd^2) per image and axis."""

    def __init__(self, alphastd, eigval, eigvec_rgb):
        import torch
        self.alphastd = alphastd
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec_rgb, dtype=torch.float32)

    def __call__(self, img):
        import torch
        alpha = torch.randn(3) * self.alphastd
        return img + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


def twin_transforms(train_layer, manifest):
    """torchvision's counterpart of the layer's transform_param (the `full` preset)."""
    from torchvision import transforms as T
    tp = train_layer.transform_param
    d, r = tp.distort_param, tp.random_resized_crop_param
    basis = manifest["pca_bgr"]
    rgb_rows = [2, 1, 0]  # the basis is stored with rows B, G, R
    eigvec = [[basis["eigvec"][i][j] for j in range(3)] for i in rgb_rows]
    mean_rgb = [m / 255.0 for m in reversed(manifest["mean_bgr"])]
    return T.Compose([
        T.RandomResizedCrop(tp.crop_size, scale=(r.min_area, r.max_area), ratio=(r.min_aspect, r.max_aspect)),
        T.RandomApply([T.ColorJitter(brightness=d.brightness_delta / 128.0)], p=d.brightness_prob),
        T.RandomApply([T.ColorJitter(contrast=(d.contrast_lower, d.contrast_upper))], p=d.contrast_prob),
        T.RandomApply([T.ColorJitter(saturation=(d.saturation_lower, d.saturation_upper))], p=d.saturation_prob),
        T.RandomApply([T.ColorJitter(hue=d.hue_delta / 180.0)], p=d.hue_prob),
        T.ToTensor(),
        Lighting(tp.lighting_param.alphastd / 255.0, [v / 255.0 for v in basis["eigval"]], eigvec),
        T.RandomHorizontalFlip(),
        T.Normalize(mean_rgb, [1.0, 1.0, 1.0]),
    ])


def twin_images_per_second(net, manifest, batch, iters, threads, workers):
    import torch
    import torch_nets
    from torch.nn import functional as F
    from torchvision import datasets
    torch.set_num_threads(threads)
    train_layer = next(layer for layer in net.layer if layer.type == "Data" and layer.include[0].phase == 0)
    crop = train_layer.transform_param.crop_size
    dataset = datasets.ImageFolder(os.path.join(manifest["source"], "train"),
                                   transform=twin_transforms(train_layer, manifest))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    model = torch_nets.build(net, (batch, 3, crop, crop), "TRAIN")
    model.train()
    logits = next(layer for layer in net.layer if layer.type == "SoftmaxWithLoss").bottom[0]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    done, t0 = 0, None
    while done < iters:
        for x, y in loader:
            if done == WARMUP:
                t0 = time.perf_counter()
            loss = F.cross_entropy(model(x, y)[logits], y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            done += 1
            if done == iters:
                break
    return (iters - WARMUP) * batch / (time.perf_counter() - t0)


def main(argv=None):
    args = build_parser().parse_args(argv)
    ensure_torch(sys.argv[1:] if argv is None else argv, script=__file__)
    torchvision_version = ensure_torchvision()
    lmdb_dir = os.path.abspath(args.lmdb_dir)
    with open(os.path.join(lmdb_dir, "manifest.json")) as f:
        manifest = json.load(f)
    workers = [int(w) for w in args.workers.split(",")]
    import torch
    print("%d usable CPUs, batch %d, %d iterations (%d timed), %d threads; Caffe reads %s, the twin %s/train "
          "(torch %s, torchvision %s)" % (devices.usable_cpus(), args.batch, args.iters, args.iters - WARMUP,
                                         args.threads, lmdb_dir, manifest["source"], torch.__version__,
                                         torchvision_version))
    print()
    print("| variant | Caffe train.sh --augment full | twin, DataLoader workers %s | Caffe / best twin |"
          % "/".join(map(str, workers)))
    print("|---|---:|---:|---:|")
    results = []
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as folder:
            solver_path = caffe_solver(variant, lmdb_dir, args.batch, args.iters, folder)
            solver = caffe_env.caffe_pb2().SolverParameter()
            with open(solver_path) as f:
                text_format.Merge(f.read(), solver)
            _, net = check.parse(solver.net)
            caffe = caffe_images_per_second(solver_path, args.batch, args.threads, folder)
            twin = {w: twin_images_per_second(net, manifest, args.batch, args.iters, args.threads, w)
                    for w in workers}
        best = max(twin.values())
        results.append({"variant": variant, "caffe_images_per_s": caffe, "twin_images_per_s": twin,
                        "ratio": caffe / best})
        print("| `%s` | %.0f images/s | %s images/s | %.2f |" % (
            variant, caffe, " / ".join("%.0f" % twin[w] for w in workers), caffe / best), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "iters": args.iters, "warmup": WARMUP, "threads": args.threads,
                       "lmdb_dir": lmdb_dir, "torch": torch.__version__, "torchvision": torchvision_version,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
