#!/usr/bin/env python3
"""Memory a variant needs to train at a batch, from Caffe's own blob shapes (no GPU needed):
the TRAIN net's blobs (data and diff), the TEST net's blobs (data only: it never runs
backward), the parameters three times (data, diff, SGD momentum) and cuDNN's workspaces
(Caffe caps each convolution's at 8 MiB). What a GPU must hold, before CUDA's own context.

    .venv/bin/python bench/net_memory.py [--variants resnet18,resnet34,inception_small] [--batch 128]
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from bench_nets import timing_net  # noqa: E402
from tinycaffe import nets, solver  # noqa: E402
from tinycaffe.caffe_env import import_caffe  # noqa: E402

CUDNN_WORKSPACE_MIB = 8  # Caffe's per-layer cap (cudnn_conv_layer.cpp), kept by patch 0004
GIB = float(1 << 30)


def need(caffe, variant, batch):
    train = caffe.Net(timing_net(variant, batch), caffe.TRAIN)
    test = caffe.Net(timing_net(variant, solver.MAX_TEST_BATCH), caffe.TEST)
    train_blobs = sum(b.count for b in train.blobs.values()) * 4 * 2
    test_blobs = sum(b.count for b in test.blobs.values()) * 4
    params = sum(b.count for p in train.params.values() for b in p) * 4 * 3
    convs = sum(1 for layer in train.layers if layer.type == "Convolution")
    workspace = convs * CUDNN_WORKSPACE_MIB * (1 << 20)
    return {"train": train_blobs, "test": test_blobs, "params": params, "workspace": workspace,
            "total": train_blobs + test_blobs + params + workspace}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="resnet18,resnet34,inception_small",
                   help="comma-separated (default resnet18,resnet34,inception_small)")
    p.add_argument("--batch", type=int, default=128, help="train batch (default 128)")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in nets.VARIANTS]
    if unknown:
        return "net_memory.py: unknown variant(s) %s (valid: %s)" % (",".join(unknown), ", ".join(nets.VARIANTS))
    caffe = import_caffe()
    caffe.set_mode_cpu()
    print("| variant | batch | TRAIN blobs (data + diff) | TEST blobs (batch %d) | parameters x3 | cuDNN workspace "
          "| total |" % solver.MAX_TEST_BATCH)
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in args.variants.split(","):
        m = need(caffe, v, args.batch)
        print("| `%s` | %d | %.2f GiB | %.2f GiB | %.0f MiB | %.0f MiB | **%.1f GiB** |"
              % (v, args.batch, m["train"] / GIB, m["test"] / GIB, m["params"] / (1 << 20),
                 m["workspace"] / (1 << 20), m["total"] / GIB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
