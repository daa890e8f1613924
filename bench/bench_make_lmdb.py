#!/usr/bin/env python3
"""make_lmdb.py against the single-process floor, side by side in one run.

Generates a full-size replica of Tiny ImageNet (200 classes x 500 train, 10,000
val, 10,000 test; sample generator) once into a cache directory, then measures
  (a) tools/make_lmdb.py end to end (default workers), with its peak RSS, and
  (b) the floor: Pillow decode + Datum serialise + LMDB put in a plain loop,
and prints images/s for both and the ratio a/b. Goal: >= 1.6x on 2 cores,
peak RSS under 1 GiB.

    .venv/bin/python bench/bench_make_lmdb.py [--train-per-class 500] [--repeat 1]
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tinycaffe import caffe_env, data, sample_data  # noqa: E402


def replica(cache, train_per_class):
    """The cached replica dir for this size, generated once."""
    root = os.path.join(cache, "replica-%d" % train_per_class, "tiny-imagenet-200")
    if not os.path.isfile(os.path.join(root, "wnids.txt")):
        shutil.rmtree(os.path.dirname(root), ignore_errors=True)
        print("generating the replica once into %s ..." % root, flush=True)
        t0 = time.time()
        sample_data.generate(root, classes=200, train=train_per_class, val=50, test=50, seed=0)
        print("  %.0f s" % (time.time() - t0), flush=True)
    return root


def all_records(root):
    wnids = data.read_wnids(root)
    return data.list_train(root, wnids, 0) + data.list_val(root, wnids) + data.list_test(root)


def floor(records, scratch, size=64):
    """One process, no pool: decode, serialise, put. Returns images/s."""
    out = tempfile.mkdtemp(prefix="floor-", dir=scratch)
    t0 = time.time()
    writer = data.LmdbWriter(os.path.join(out, "lmdb"))
    for n, r in enumerate(records):
        chw, _, _ = data.decode_bgr_chw(r.path, size)
        writer.put((data.KEY_FORMAT % (n, r.name)).encode(), data.datum_bytes(chw, size, r.label))
    writer.close()
    seconds = time.time() - t0
    shutil.rmtree(out)
    return len(records) / seconds, seconds


def make_lmdb(root, scratch):
    """tools/make_lmdb.py as a user runs it. Returns (images/s, seconds, peak RSS MiB of any process)."""
    out = tempfile.mkdtemp(prefix="mk-", dir=scratch)
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(REPO, "tools/make_lmdb.py"), root, os.path.join(out, "lmdb"),
                    "--quiet"], check=True, stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    n = sum(data.lmdb_count(os.path.join(out, "lmdb", s + "_lmdb")) for s in ("train", "val", "test"))
    shutil.rmtree(out)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return n / seconds, seconds, peak_mib


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-per-class", type=int, default=500, help="train images per class (default 500: full size)")
    p.add_argument("--cache", default=os.path.join(caffe_env.tinycaffe_home(), "bench"),
                   help="where the replica is kept (default $TINYCAFFE_HOME/bench)")
    p.add_argument("--repeat", type=int, default=1, help="alternate a/b this many times (default 1)")
    p.add_argument("--scratch", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                   help="where both write their LMDBs (default /dev/shm: the converter's work, not the disk's "
                        "write speed, is measured; pass a disk folder to include it)")
    args = p.parse_args(argv)
    root = replica(args.cache, args.train_per_class)
    records = all_records(root)
    caffe_env.caffe_pb2()  # import outside the timed part of the floor, as make_lmdb's start-up is timed
    print("%d images, %d cores, LMDBs written under %s" % (len(records), os.cpu_count(), args.scratch), flush=True)
    for rep in range(args.repeat):
        a_rate, a_s, peak = make_lmdb(root, args.scratch)
        b_rate, b_s = floor(records, args.scratch)
        print("run %d: make_lmdb %.0f images/s (%.1f s, peak RSS %.0f MiB) | floor %.0f images/s (%.1f s) | ratio %.2fx"
              % (rep + 1, a_rate, a_s, peak, b_rate, b_s, a_rate / b_rate), flush=True)


if __name__ == "__main__":
    main()
