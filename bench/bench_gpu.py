#!/usr/bin/env python3
"""Caffe and PyTorch side by side on one GPU: the same nets, the same batch, ms per
forward-backward, and the ratio (goal: Caffe within 1.2x of PyTorch).

    python3 bench/bench_gpu.py [--variants alexnet,alexnet_prelu,alexnet_prelu_bn,vgg_prelu_bn]
                               [--batch 128] [--iterations 20] [--gpu 0|cpu] [--out FILE.json]

Caffe: `caffe time -gpu 0` on prototxt/<variant>/train_val.prototxt with its Data layers
turned into DummyData of the same shape (as bench/bench_nets.py), TRAIN phase.
PyTorch: bench/torch_nets.py's twin of that very NetParameter, train mode, forward +
loss + backward; FP32 throughout (TF32 off, as Caffe computes in FP32) and
cudnn.benchmark off (Caffe picks algorithms by cuDNN's heuristic, not by trial).
Before any timing, the twins are checked: the same weights through pycaffe (CPU) and
PyTorch give the same value in every blob of each variant's deploy net. A variant whose twin does
not match is reported and not timed.

`--gpu cpu` runs all of it on the CPU, to check this script where no GPU is lent.
Results go to bench/results/gpu-<card>-<date>.json (default) and a Markdown table.
"""
import argparse
import datetime
import json
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_nets  # noqa: E402
from bench_nets import caffe_time, timing_net  # noqa: E402
from tinycaffe import caffe_env, check  # noqa: E402
from tinycaffe.files import atomic_open  # noqa: E402

DEFAULT_VARIANTS = "alexnet,alexnet_prelu,alexnet_prelu_bn,vgg_prelu_bn"  # the four
GOAL_RATIO = 1.2      # Caffe ms / PyTorch ms we aim to stay under
WARMUP = 5            # untimed PyTorch iterations (cuDNN handles, allocator)


def torch_time(net, iterations, device):
    shape = _data_shape(net)
    model = torch_nets.build(net, shape).to(device).train()
    loss_top = next(layer.top[0] for layer in net.layer if layer.type == "SoftmaxWithLoss")
    classes = next(layer.inner_product_param.num_output for layer in reversed(net.layer)
                   if layer.type == "InnerProduct")
    x = torch.randn(shape, device=device) * 50
    y = torch.randint(0, classes, (shape[0],), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        model(x, y)[loss_top].backward()

    for _ in range(WARMUP):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iterations * 1000, torch_nets.parameter_count(model)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data_shape(net):
    for layer in net.layer:
        if layer.type == "DummyData":
            return tuple(layer.dummy_data_param.shape[0].dim)
        if layer.type == "Input":
            return tuple(layer.input_param.shape[0].dim)
    raise ValueError("no DummyData/Input layer")


def verify_twin(variant):
    """Deploy net, random weights: pycaffe (CPU) and the PyTorch twin (CPU, eval) agree?"""
    try:
        caffe = caffe_env.import_caffe()
    except caffe_env.CaffeNotFound as exc:
        return {"checked": False, "why": str(exc)}
    caffe.set_mode_cpu()
    deploy = os.path.join(REPO, "prototxt", variant, "deploy.prototxt")
    _, message = check.parse(deploy)
    net = caffe.Net(deploy, caffe.TEST)
    rng = np.random.default_rng(0)
    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BatchNorm":  # a valid state: mean, variance > 0, factor 1
            blobs[0].data[...] = rng.normal(0, 0.1, blobs[0].data.shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].data.shape)
            blobs[2].data[...] = 1.0
            continue
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.05, blob.data.shape)
    x = rng.normal(0, 30, net.blobs["data"].data.shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    twin = torch_nets.load_caffe_weights(torch_nets.build(message, x.shape, "TEST"), net).eval()
    with torch.no_grad():
        got = twin(torch.from_numpy(x))
    # Every blob both nets name (in-place layers leave their last value in both), not
    # only the softmax, which saturates and would hide a wrong layer in the middle.
    worst, compared = 0.0, 0
    for blob, value in got.items():
        if blob not in net.blobs or blob == "data":
            continue
        expected = net.blobs[blob].data
        scale = float(np.abs(expected).max()) or 1.0
        worst = max(worst, float(np.abs(value.numpy() - expected).max()) / scale)
        compared += 1
    caffe_params = sum(b.data.size for name, blobs in net.params.items()
                       if net.layer_dict[name].type != "BatchNorm" for b in blobs)
    return {"checked": True, "blobs_compared": compared, "max_rel_diff": worst, "match": worst < 1e-4,
            "params_caffe": int(caffe_params), "params_torch": torch_nets.parameter_count(twin)}


def card_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated (default %s)" % DEFAULT_VARIANTS)
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per net and engine (default 20)")
    p.add_argument("--gpu", default="0", help="GPU id, or cpu to check the script without a GPU (default 0)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/gpu-<card>-<date>.json; "
                                               "with --gpu cpu: bench/results/cpu-check.json)")
    p.add_argument("--no-verify", action="store_true", help="time without checking the twins first (default: check)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    gpu = None if args.gpu == "cpu" else args.gpu
    if gpu is not None and not torch.cuda.is_available():
        print("bench_gpu.py: error: --gpu %s but PyTorch sees no CUDA device; use --gpu cpu" % gpu, file=sys.stderr)
        return 1
    device = torch.device("cuda:%s" % gpu if gpu is not None else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    card = card_name(device)
    today = datetime.date.today().isoformat()
    out = args.out or os.path.join(REPO, "bench", "results",
                                   "gpu-%s-%s.json" % (slug(card), today) if gpu is not None else "cpu-check.json")
    record = {"card": card, "date": today, "batch": args.batch, "iterations": args.iterations,
              "torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "caffe_build": _caffe_build(), "results": []}
    print("| variant | Caffe ms | PyTorch ms | Caffe / PyTorch | twin check |")
    print("|---|---:|---:|---:|---|")
    for variant in args.variants.split(","):
        verify = {"checked": False, "why": "--no-verify"} if args.no_verify else verify_twin(variant)
        row = {"variant": variant, "verify": verify}
        if verify.get("checked") and not verify["match"]:
            row["skipped"] = "twin differs from Caffe (max relative diff %.3g)" % verify["max_rel_diff"]
        else:
            model = timing_net(variant, args.batch)
            try:
                _, net = check.parse(model)
                row["torch_ms"], row["torch_params"] = torch_time(net, args.iterations, device)
                try:
                    row["caffe_ms"] = caffe_time(model, args.iterations, gpu=gpu)
                except RuntimeError as exc:  # recorded, so one failure still leaves the other numbers
                    row["skipped"] = "caffe time failed: %s" % str(exc).strip().splitlines()[-1][-200:]
            finally:
                os.unlink(model)
            if "caffe_ms" in row:
                row["ratio"] = row["caffe_ms"] / row["torch_ms"]
        record["results"].append(row)
        _print_row(row)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_open(out) as f:
        json.dump(record, f, indent=1)
    print("\n%s on %s, batch %d; goal: Caffe / PyTorch <= %.1f. Results: %s"
          % ("GPU" if gpu is not None else "CPU check", card, args.batch, GOAL_RATIO, out))
    return 0


def _print_row(row):
    v = row["verify"]
    twin = ("%d blobs equal (max rel. diff %.1e), params %d = %d"
            % (v["blobs_compared"], v["max_rel_diff"], v["params_caffe"], v["params_torch"])
            if v.get("checked") and v["match"] else row.get("skipped") or "not checked: " + v.get("why", ""))
    if "ratio" in row:
        print("| %s | %.1f | %.1f | %.2f | %s |"
              % (row["variant"], row["caffe_ms"], row["torch_ms"], row["ratio"], twin))
    else:
        torch_ms = "%.1f" % row["torch_ms"] if "torch_ms" in row else "-"
        print("| %s | - | %s | - | %s; %s |" % (row["variant"], torch_ms, twin, row.get("skipped", "")))
    sys.stdout.flush()


def _caffe_build():
    root = caffe_env.read_location().get("CAFFE_ROOT") or os.path.dirname(os.path.dirname(caffe_env.caffe_binary()))
    try:
        with open(os.path.join(root, ".tinycaffe-build")) as f:
            return f.readline().strip()
    except OSError:
        return "unknown (%s)" % root


if __name__ == "__main__":
    sys.exit(main())
