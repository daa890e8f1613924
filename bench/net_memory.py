#!/usr/bin/env python3
"""Memory a variant needs to train at a batch on a GPU, modelled from Caffe 1.0's own blob
shapes and layer code (no GPU needed), and checked against a real CPU run with --measure.

What Caffe holds while training (4 bytes a value):
- TRAIN net: every blob's data and diff, except the tops of the Split layers Caffe inserts
  for blobs read twice (they share their input's data; only their diffs are their own);
- TRAIN net layer buffers for in-place layers: BatchNorm keeps x_norm_ (data and diff) and
  temp_ (3 copies of its input, batch_norm_layer.cpp/.cu), an in-place Scale keeps temp_
  (1 copy, scale_layer.cpp/.cu);
- TEST net (batch solver.MAX_TEST_BATCH): blobs' data only (it never runs backward), Split
  tops nothing, BatchNorm 2 copies (x_norm_ and temp_ data), in-place Scale 1;
- parameters three times: data, diff, SGD momentum (the TEST net shares the TRAIN net's);
- cuDNN workspaces: each convolution of each net up to 8 MiB (Caffe's cap, kept by patch
  0004) for each of its CUDNN_STREAMS_PER_GROUP = 3 streams.
Not modelled: the CUDA context and cuDNN handles (a few hundred MiB), allocator slack.

--measure runs one forward + backward of the TRAIN net on the CPU at --measure-batch and
prints its resident memory growth beside the same model for the CPU (no cuDNN workspace,
plus the im2col buffer each convolution keeps there).

    .venv/bin/python bench/net_memory.py [--variants resnet18,resnet34,inception_small] [--batch 128]
                                         [--measure] [--measure-batch 16]
"""
import argparse
import os
import resource
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from bench_nets import timing_net  # noqa: E402
from tinycaffe import nets, solver  # noqa: E402
from tinycaffe.caffe_env import import_caffe  # noqa: E402

CUDNN_WORKSPACE = 8 << 20  # bytes per stream, Caffe's cap (cudnn_conv_layer.cpp)
CUDNN_STREAMS = 3  # CUDNN_STREAMS_PER_GROUP
GIB = float(1 << 30)


def _layers(net):
    return [(name, layer.type, list(net.bottom_names[name]), list(net.top_names[name]))
            for name, layer in zip(net._layer_names, net.layers)]


def activation_bytes(net, train):
    """Blobs plus the in-place layers' buffers, as described above (bytes)."""
    split_tops = {t for _, kind, _, tops in _layers(net) if kind == "Split" for t in tops}
    values = 0
    for name, blob in net.blobs.items():
        copies = (1 if train else 0) if name in split_tops else (2 if train else 1)
        values += copies * blob.count
    for _, kind, bottoms, tops in _layers(net):
        if kind == "BatchNorm":
            values += (3 if train else 2) * net.blobs[bottoms[0]].count
        elif kind == "Scale" and bottoms[:1] == tops[:1]:
            values += net.blobs[bottoms[0]].count
    return 4 * values


def conv_layers(net):
    return [(name, layer) for name, layer in zip(net._layer_names, net.layers) if layer.type == "Convolution"]


def im2col_bytes(net):
    """The CPU path's column buffer per convolution: (C/g x k x k) x (H_out x W_out) of one image."""
    total = 0
    for name, _ in conv_layers(net):
        weights = net.params[name][0].data.shape  # out, in/g, k, k
        top = net.blobs[net.top_names[name][0]].data.shape
        if weights[2:] != (1, 1):
            total += 4 * weights[1] * weights[2] * weights[3] * top[2] * top[3]
    return total


def model(caffe, variant, batch):
    train = caffe.Net(timing_net(variant, batch), caffe.TRAIN)
    test = caffe.Net(timing_net(variant, solver.MAX_TEST_BATCH), caffe.TEST)
    params = 3 * 4 * sum(b.count for p in train.params.values() for b in p)
    workspace = (len(conv_layers(train)) + len(conv_layers(test))) * CUDNN_STREAMS * CUDNN_WORKSPACE
    parts = {"train": activation_bytes(train, True), "test": activation_bytes(test, False), "params": params,
             "workspace": workspace}
    parts["total"] = sum(parts.values())
    return parts


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(caffe, variant, batch):
    """-> (measured RSS growth of one TRAIN forward + backward on the CPU, the CPU model)."""
    before = rss_bytes()
    net = caffe.Net(timing_net(variant, batch), caffe.TRAIN)
    net.forward()
    net.backward()
    grown = rss_bytes() - before
    cpu_model = activation_bytes(net, True) + 2 * 4 * sum(b.count for p in net.params.values() for b in p) \
        + im2col_bytes(net)
    return grown, cpu_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="resnet18,resnet34,inception_small",
                   help="comma-separated (default resnet18,resnet34,inception_small)")
    p.add_argument("--batch", type=int, default=128, help="train batch (default 128)")
    p.add_argument("--measure", action="store_true", help="also check the model on a CPU run (default: off)")
    p.add_argument("--measure-batch", type=int, default=16, help="batch of the CPU check (default 16)")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [v for v in names if v not in nets.VARIANTS]
    if unknown:
        return "net_memory.py: unknown variant(s) %s (valid: %s)" % (",".join(unknown), ", ".join(nets.VARIANTS))
    caffe = import_caffe()
    caffe.set_mode_cpu()
    print("| variant | batch | TRAIN net | TEST net (batch %d) | parameters x3 | cuDNN workspaces | total |"
          % solver.MAX_TEST_BATCH)
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in names:
        m = model(caffe, v, args.batch)
        print("| `%s` | %d | %.2f GiB | %.2f GiB | %.0f MiB | %.0f MiB | **%.1f GiB** |"
              % (v, args.batch, m["train"] / GIB, m["test"] / GIB, m["params"] / (1 << 20),
                 m["workspace"] / (1 << 20), m["total"] / GIB))
    if args.measure:
        print("\nCPU check, batch %d, one forward + backward of the TRAIN net:" % args.measure_batch)
        for v in names:
            grown, cpu_model = measure(caffe, v, args.measure_batch)
            print("  %s: resident memory grew %.0f MiB; the model says %.0f MiB (%.2fx)"
                  % (v, grown / (1 << 20), cpu_model / (1 << 20), grown / cpu_model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
