#!/usr/bin/env python3
"""`caffe time` on CPU for each variant at batch 64: ms per forward-backward and images/s,
plus parameters and forward MFLOPs per image, as a Markdown table for the README.

    .venv/bin/python bench/bench_nets.py [--variants all] [--batch 64] [--iterations 3]

The nets are the committed prototxt/<variant>/train_val.prototxt with the Data layers
swapped for DummyData of the same shape (no LMDB needed), TRAIN phase.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from google.protobuf import text_format  # noqa: E402

from tinycaffe import check, nets  # noqa: E402
from tinycaffe.caffe_env import caffe_binary  # noqa: E402


def timing_net(variant, batch):
    path = os.path.join(REPO, "prototxt", variant, "train_val.prototxt")
    _, net = check.parse(path)
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = batch
    # the LMDB's or mean file's shape where data/ has them, else what --check takes: the Input
    # of the deploy.prototxt beside it (a clone without the dataset can time the nets too)
    warnings = []
    patched = check.with_dummy_data(net, warnings, base=REPO, fallback=check.input_fallback(path, {}))
    for warning in warnings:
        print("%s: %s" % (variant, warning), file=sys.stderr)
    f = tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False)
    f.write(text_format.MessageToString(patched))
    f.close()
    return f.name


def caffe_time_layers(model, iterations, binary=None, gpu=None, env=None):
    """`caffe time` (the active build's binary unless given; -gpu when given; env added to this
    process's) -> (its Average Forward-Backward in ms, {layer: ms forward + backward})."""
    cmd = [binary or caffe_binary(), "time", "-model", model, "-iterations", str(iterations)]
    if gpu is not None:
        cmd += ["-gpu", gpu]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, **(env or {}), GLOG_minloglevel="0", GLOG_logtostderr="1"))
    m = re.search(r"Average Forward-Backward: ([\d.]+) ms", out.stderr)
    if out.returncode != 0 or not m:
        raise RuntimeError("caffe time failed for %s:\n%s" % (model, out.stderr[-2000:]))
    layers = {}
    for name, _, ms in re.findall(r"\]\s+(\S+)\s+(forward|backward): ([\d.]+) ms", out.stderr):
        layers[name] = layers.get(name, 0.0) + float(ms)
    return float(m.group(1)), layers


def caffe_time(model, iterations, **kw):
    """`caffe time`'s ms per forward-backward (caffe_time_layers' arguments)."""
    return caffe_time_layers(model, iterations, **kw)[0]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="all", help="all or comma-separated names (default all)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--iterations", type=int, default=3, help="caffe time iterations (default 3)")
    args = p.parse_args(argv)
    names = list(nets.VARIANTS) if args.variants == "all" else args.variants.split(",")
    print("CPU: %s, %d cores; batch %d, %d iterations, CPU mode" % (cpu_name(), os.cpu_count(), args.batch,
                                                                     args.iterations))
    print()
    print("| variant | parameters | MFLOPs/image (fwd) | ms per fwd+bwd (batch %d) | images/s | paper val top-1 |"
          % args.batch)
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        info = check.inspect_net(os.path.join(REPO, "prototxt", name, "deploy.prototxt"), "TEST")
        params = sum(check.prod(s) for row in info["layers"] for s in row["params"])
        mflops = sum(row["flops"] for row in info["layers"]) / 1e6
        model = timing_net(name, args.batch)
        try:
            ms = caffe_time(model, args.iterations)
        finally:
            os.unlink(model)
        print("| `%s` | %.1fM | %.0f | %.0f | %.0f | %s |" % (name, params / 1e6, mflops, ms,
                                                             args.batch / (ms / 1000.0), nets.VARIANTS[name].paper_top1),
              flush=True)


if __name__ == "__main__":
    main()
