#!/usr/bin/env python3
"""What the data path costs in training, and which OpenBLAS thread count trains faster.

For each variant and each thread count (OPENBLAS_NUM_THREADS = OMP_NUM_THREADS), in one run:
  (a) `caffe time`: forward-backward of the net with DummyData (compute only), images/s;
  (b) a short `caffe train` reading the real LMDB (Data layer, crop, mirror, mean), images/s
      between its first and last logged iteration (start-up excluded);
and prints b/a. Goal: b/a >= 0.95 (the data path costs at most 5%).

    .venv/bin/python bench/bench_train.py [--variants tiny,alexnet] [--lmdb-dir data/sample/lmdb]
                                          [--batch 64] [--iters 40] [--threads 1,2]
"""
import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from google.protobuf import text_format  # noqa: E402

from bench_nets import caffe_time  # noqa: E402
from tinycaffe import caffelog, check, gen  # noqa: E402
from tinycaffe.caffe_env import caffe_binary, caffe_pb2  # noqa: E402

DISPLAY = 5  # log every 5 iterations: enough points to time the steady state


def prepare(variant, lmdb_dir, batch, iters, folder):
    labels = os.path.join(lmdb_dir, "labels.txt")
    num_classes = sum(1 for line in open(labels) if line.strip())
    with open(os.path.join(lmdb_dir, "manifest.json")) as f:
        import json
        val = json.load(f)["splits"]["val"]["count"]
    cfg = gen.GenConfig(out=folder, lmdb_dir=lmdb_dir, batch_size=batch, mode="cpu", num_classes=num_classes,
                        val_size=val, max_iter=iters, test_interval=iters + 1)
    gen.generate([variant], cfg)
    solver_path = os.path.join(folder, variant, "solver.prototxt")
    s = caffe_pb2().SolverParameter()
    text_format.Merge(open(solver_path).read(), s)
    s.display = DISPLAY
    s.snapshot = 0
    s.snapshot_after_train = False
    s.snapshot_prefix = os.path.join(folder, "snap")
    open(solver_path, "w").write(text_format.MessageToString(s))
    _, net = check.parse(os.path.join(folder, variant, "train_val.prototxt"))
    timing = os.path.join(folder, variant, "time.prototxt")
    open(timing, "w").write(text_format.MessageToString(check.with_dummy_data(net, [])))
    return solver_path, timing


def thread_env(threads):
    # OMP_NUM_THREADS too: the CPU build runs its layers on OpenMP threads (patch 0011)
    return {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def env_for(threads):
    return dict(os.environ, **thread_env(threads), GLOG_logtostderr="1", GLOG_minloglevel="0")


def time_compute(model, iters, batch, threads):
    return batch / (caffe_time(model, iters, env=thread_env(threads)) / 1000.0)


def time_train(solver, batch, threads, folder):
    log = os.path.join(folder, "train.log")
    with open(log, "w") as f:
        subprocess.run([caffe_binary(), "train", "-solver", solver], stderr=f, check=True, env=env_for(threads))
    train, _ = caffelog.parse(log)
    first, last = train[1], train[-1]  # skip iteration 0 (first batch, allocations)
    return (last["NumIters"] - first["NumIters"]) * batch / (last["Seconds"] - first["Seconds"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="tiny", help="comma-separated variants (default tiny)")
    p.add_argument("--lmdb-dir", default=os.path.join(REPO, "data", "sample", "lmdb"),
                   help="LMDBs to train from (default data/sample/lmdb, written by scripts/quickstart.sh)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--iters", type=int, default=40, help="iterations per measurement (default 40)")
    p.add_argument("--threads", default="1,2", help="thread counts to compare, OPENBLAS_NUM_THREADS = OMP_NUM_THREADS (default 1,2)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.lmdb_dir, "manifest.json")):
        sys.exit("bench_train.py: error: %s has no LMDBs; run scripts/quickstart.sh or tools/make_lmdb.py" % args.lmdb_dir)
    print("%d cores, batch %d, %d iterations, LMDBs in %s" % (os.cpu_count(), args.batch, args.iters, args.lmdb_dir))
    print()
    print("| variant | threads | caffe time (compute only) | caffe train (LMDB) | train / compute |")
    print("|---|---:|---:|---:|---:|")
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as folder:
            solver, timing = prepare(variant, os.path.abspath(args.lmdb_dir), args.batch, args.iters, folder)
            for threads in args.threads.split(","):
                compute = time_compute(timing, args.iters, args.batch, threads)
                trained = time_train(solver, args.batch, threads, folder)
                print("| `%s` | %s | %.0f images/s | %.0f images/s | %.2f |"
                      % (variant, threads, compute, trained, trained / compute), flush=True)


if __name__ == "__main__":
    main()
