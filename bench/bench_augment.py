#!/usr/bin/env python3
"""Images/s of the TRAIN Data layer alone, --augment none vs the other presets, on one core.

Caffe transforms in the Data layer's single prefetch thread, so that thread is what a GPU
waits for if augmentation is slow. This pins the process (both threads) to one core, writes
an LMDB of 64x64 sample-data images and its mean, and for each preset builds the TRAIN Data
layer exactly as gen_prototxt writes it (crop 60, mean file, batch 256, the preset's fields).
Rounds interleave the presets (a different one first each round); each timing drains the
prefetched batches, times --batches batches, then lets that net's prefetch thread refill its
queue before the next preset is timed (on one core it would otherwise steal the next one's time). Prints the median images/s per preset and its ratio to `none`; writes
JSON to bench/results/. Goal (issue 12): `full` above 20,000 images/s on one core.

    .venv/bin/python bench/bench_augment.py [--rounds 5] [--batches 20] [--cpu 0]
"""
import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from google.protobuf import json_format, text_format  # noqa: E402

from tinycaffe import augment, caffe_env, data, sample_data  # noqa: E402
from tinycaffe.files import atomic_open  # noqa: E402

PREFETCH = 4  # Caffe 1.0's prefetch queue: batches ready before the timed ones


def build_lmdb(folder, count):
    """count sample-data images (BGR CxHxW Datums) + their mean.binaryproto."""
    table = sample_data.class_table(200)
    path = os.path.join(folder, "train_lmdb")
    writer = data.LmdbWriter(path)
    total = np.zeros((3, 64, 64), np.float64)
    for i in range(count):
        img, _ = sample_data.render(table[i % len(table)], random.Random(i))
        chw = np.asarray(img, np.uint8)[:, :, ::-1].transpose(2, 0, 1).copy()
        total += chw
        writer.put(b"%08d" % i, data.datum_bytes(chw.tobytes(), 64, i % len(table)))
    writer.close()
    mean = os.path.join(folder, "mean.binaryproto")
    with open(mean, "wb") as f:
        f.write(data.mean_blob_bytes(total / count))
    return path, mean


def data_net(folder, name, source, mean, transform, batch):
    pb2 = caffe_env.caffe_pb2()
    net = pb2.NetParameter(name=name)
    layer = net.layer.add(name="data", type="Data", top=["data", "label"])
    layer.data_param.source = source
    layer.data_param.backend = pb2.DataParameter.LMDB
    layer.data_param.batch_size = batch
    json_format.ParseDict(dict(crop_size=60, mean_file=mean, **transform), layer.transform_param)
    path = os.path.join(folder, name + ".prototxt")
    with open(path, "w") as f:
        f.write(text_format.MessageToString(net))
    return path


def timed(net, batches, batch):
    """images/s of `batches` batches, after the batches prefetched before; then waits until this
    net's prefetch thread has refilled its queue, so that its work never runs in the next timing."""
    for _ in range(PREFETCH):
        net.forward()  # the queue filled while the other nets ran: not this round's work
    t0 = time.perf_counter()
    for _ in range(batches):
        net.forward()
    rate = batches * batch / (time.perf_counter() - t0)
    time.sleep(2.0 * PREFETCH * batch / rate)  # twice the time the refill takes at this rate
    return rate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per preset and round (default 20)")
    p.add_argument("--batch-size", type=int, default=256, help="batch (default 256)")
    p.add_argument("--images", type=int, default=2048, help="images in the LMDB (default 2048)")
    p.add_argument("--cpu", type=int, default=0, help="the core to pin to (default 0)")
    p.add_argument("--presets", default="none,flip,colour,scale,full",
                   help="comma-separated presets (default none,flip,colour,scale,full)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/augment-DATE.json)")
    args = p.parse_args(argv)
    presets = args.presets.split(",")
    for name in presets:
        augment.preset(name)
    os.sched_setaffinity(0, {args.cpu})  # the prefetch threads inherit it
    caffe = caffe_env.import_caffe()
    caffe.set_mode_cpu()
    caffe.set_random_seed(1)
    rates = {name: [] for name in presets}
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as folder:
        source, mean = build_lmdb(folder, args.images)
        basis = {"eigval": [60.0, 15.0, 5.0], "eigvec": [[0.58, -0.7, 0.41], [0.58, 0.0, -0.82], [0.58, 0.7, 0.41]]}
        nets = {name: caffe.Net(data_net(folder, name, source, mean, augment.train_transform(name, basis),
                                         args.batch_size), caffe.TRAIN) for name in presets}
        for r in range(args.rounds):
            for name in presets[r % len(presets):] + presets[:r % len(presets)]:  # a new first one each round
                rates[name].append(timed(nets[name], args.batches, args.batch_size))
            print("round %d: %s" % (r + 1, ", ".join("%s %.0f" % (n, rates[n][-1]) for n in presets)), flush=True)
        del nets
    base = statistics.median(rates[presets[0]])
    print("\nTRAIN Data layer, one core, crop 60 of 64x64, batch %d, mean file (median of %d rounds):"
          % (args.batch_size, args.rounds))
    result = {"date": datetime.date.today().isoformat(), "cpu": args.cpu, "batch": args.batch_size,
              "rounds": args.rounds, "batches": args.batches, "images_per_second": {}, "ratio_to_" + presets[0]: {}}
    for name in presets:
        median = statistics.median(rates[name])
        result["images_per_second"][name] = round(median)
        result["ratio_to_" + presets[0]][name] = round(median / base, 3)
        print("  %-7s %9.0f images/s   %.2fx of %s" % (name, median, median / base, presets[0]))
    out = args.out or os.path.join(REPO, "bench", "results", "augment-%s.json" % result["date"])
    with atomic_open(out) as f:
        json.dump(dict(result, rounds_images_per_second=rates), f, indent=2)
    print("wrote " + os.path.relpath(out, REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
