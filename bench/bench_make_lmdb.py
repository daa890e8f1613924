#!/usr/bin/env python3
"""make_lmdb.py against Caffe's own tools, side by side in one run.

On a full-size replica of Tiny ImageNet (200 classes x 500 train, 10,000 val, 10,000
test; the sample generator, made once into a cache directory) it times, in alternation:

  (a) tools/make_lmdb.py end to end, default workers: the three LMDBs, mean.binaryproto,
      the colour-PCA basis, labels.txt and manifest.json;
  (b) the anchor, what examples/imagenet/create_imagenet.sh and make_imagenet_mean.sh do:
      Caffe's convert_imageset for train (--shuffle), val (--shuffle) and test, then
      compute_image_mean on train. They come from the OpenCV build of our Caffe source
      (scripts/install_caffe.sh --opencv-tools; convert_imageset reads JPEGs only through
      OpenCV), single-threaded as they are. The list files are written before the clock
      starts, as the ImageNet lists ship with the dataset.

and prints images/s for both, the ratio a/b per round and the median (goal >= 1.3x with
the default workers on 2 cores). Then make_lmdb with --workers 1, 2 and all the CPUs
(how it scales), and where one worker's time goes per image (reading the file, the source
fingerprint, Pillow's decode, Caffe's planes, mean sums and PCA products, Datum serialise,
LMDB puts, the final fsync), so the next step
is visible. Both write to --scratch (default /dev/shm: the converters' work, not the
disk's write speed).

    .venv/bin/python bench/bench_make_lmdb.py [--repeat 3] [--train-per-class 500]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tinycaffe import caffe_env, data, devices, sample_data  # noqa: E402

ANCHOR_PREFIX = "caffe-1.0-cpu-opencv"  # what install_caffe.sh --opencv-tools builds
PROFILE_IMAGES = 5000  # images the per-stage profile decodes (one process)


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


def split_records(root):
    wnids = data.read_wnids(root)
    return {"train": data.list_train(root, wnids, 0), "val": data.list_val(root, wnids),
            "test": data.list_test(root)}


def anchor_tools(home):
    """convert_imageset and compute_image_mean of the OpenCV build, built once if missing."""
    bin_dir = os.path.join(home, ANCHOR_PREFIX, "bin")
    tools = [os.path.join(bin_dir, t) for t in ("convert_imageset", "compute_image_mean")]
    if not all(os.access(t, os.X_OK) for t in tools):
        print("building Caffe's tools with OpenCV once: scripts/install_caffe.sh --opencv-tools (about 4 min; as "
              "root it apt-installs Debian's libopencv-dev, about 200 packages) ...", flush=True)
        subprocess.run([os.path.join(REPO, "scripts/install_caffe.sh"), "--opencv-tools"], check=True)
    return tools


def write_lists(records, root, out):
    """create_imagenet.sh's inputs: per split a root folder and 'relative/path label' lines."""
    lists = {}
    for split, recs in records.items():
        folder = os.path.join(root, split)
        path = os.path.join(out, split + ".txt")
        with open(path, "w") as f:
            f.writelines("%s %d\n" % (os.path.relpath(r.path, folder), r.label) for r in recs)
        lists[split] = (folder + "/", path)
    return lists


def run_anchor(tools, lists, scratch):
    """Caffe's tools as create_imagenet.sh + make_imagenet_mean.sh run them. Returns (seconds, per-step s)."""
    convert, mean = tools
    out = tempfile.mkdtemp(prefix="anchor-", dir=scratch)
    steps = {}
    t0 = time.time()
    for split, (folder, listfile) in lists.items():
        t = time.time()
        shuffle = ["--shuffle"] if split in ("train", "val") else []  # as create_imagenet.sh
        subprocess.run([convert] + shuffle + [folder, listfile, os.path.join(out, split + "_lmdb")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        steps["convert_imageset " + split] = time.time() - t
    t = time.time()
    subprocess.run([mean, os.path.join(out, "train_lmdb"), os.path.join(out, "mean.binaryproto")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps["compute_image_mean train"] = time.time() - t
    seconds = time.time() - t0
    anchor_mean = data.read_mean(os.path.join(out, "mean.binaryproto"))
    shutil.rmtree(out)
    return seconds, steps, anchor_mean


def run_make_lmdb(root, scratch, workers=None):
    """tools/make_lmdb.py as a user runs it. Returns (seconds, manifest, mean, peak RSS MiB of its largest process)."""
    out = tempfile.mkdtemp(prefix="mk-", dir=scratch)
    cmd = [sys.executable, os.path.join(REPO, "tools/make_lmdb.py"), root, os.path.join(out, "lmdb"), "--quiet"]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this run's own rusage: its peak RSS, not the anchor's
    seconds = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    with open(os.path.join(out, "lmdb", "manifest.json")) as f:
        manifest = json.load(f)
    mean = data.read_mean(os.path.join(out, "lmdb", "mean.binaryproto"))
    shutil.rmtree(out)
    return seconds, manifest, mean, usage.ru_maxrss / 1024.0


def profile_stages(records, scratch, size=64):
    """One process, a worker's steps timed apart, range by range as the workers run them, on the
    first PROFILE_IMAGES train images: us per image."""
    recs = records[:PROFILE_IMAGES]
    stages = ("read the file", "source fingerprint", "decode (Pillow)", "to Caffe's BGR planes",
              "mean sums + PCA products", "Datum serialise", "LMDB puts (committed per range)")
    seconds = dict.fromkeys(stages + ("final fsync + close",), 0.0)
    out = tempfile.mkdtemp(prefix="prof-", dir=scratch)
    writer = data.LmdbWriter(os.path.join(out, "lmdb"), data.map_size_for(len(recs), size))
    rgb = np.empty((data.CHUNK, size, size, 3), np.uint8)
    planes = np.empty((data.CHUNK, 3, size, size), np.uint8)
    for start in range(0, len(recs), data.CHUNK):
        part = recs[start:start + data.CHUNK]
        n = len(part)
        clock = [time.perf_counter()]
        raws = [data.read_file(r.path) for r in part]
        clock.append(time.perf_counter())
        for r, raw in zip(part, raws):
            data.file_token("train", r.name, len(raw))
        clock.append(time.perf_counter())
        for k, (r, raw) in enumerate(zip(part, raws)):
            rgb[k] = data.read_rgb(r.path, size, raw)[0]
        clock.append(time.perf_counter())
        flat = data.bgr_chw(rgb[:n], planes[:n]).reshape(n, -1)
        clock.append(time.perf_counter())
        data.pixel_stats(flat)
        clock.append(time.perf_counter())
        values = [data.datum_bytes(chw.tobytes(), size, r.label) for r, chw in zip(part, flat)]
        clock.append(time.perf_counter())
        for i, value in enumerate(values):
            writer.put(b"%08d" % (start + i), value)
        writer.flush()
        clock.append(time.perf_counter())
        for name, t0, t1 in zip(stages, clock, clock[1:]):
            seconds[name] += t1 - t0
    t0 = time.perf_counter()
    writer.close()
    seconds["final fsync + close"] = time.perf_counter() - t0
    shutil.rmtree(out)
    return {name: s / len(recs) * 1e6 for name, s in seconds.items()}


def ratio_line(rnd, a_s, b_s, total, peak):
    return ("round %d: make_lmdb %.0f images/s (%.1f s, peak RSS %.0f MiB) | Caffe's tools %.0f images/s (%.1f s)"
            " | ratio %.2fx" % (rnd, total / a_s, a_s, peak, total / b_s, b_s, b_s / a_s))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-per-class", type=int, default=500, help="train images per class (default 500: full size)")
    p.add_argument("--cache", default=os.path.join(caffe_env.tinycaffe_home(), "bench"),
                   help="where the replica is kept (default $TINYCAFFE_HOME/bench)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of a then b; the median is the figure (default 3)")
    p.add_argument("--scratch", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                   help="where both write their LMDBs (default /dev/shm: the converters' work, not the disk's "
                        "write speed, is measured; pass a disk folder to include it)")
    p.add_argument("--json", default=None, help="also write the figures to this file (default: none)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = replica(args.cache, args.train_per_class)
    tools = anchor_tools(caffe_env.tinycaffe_home())
    records = split_records(root)
    total = sum(len(r) for r in records.values())
    list_dir = tempfile.mkdtemp(prefix="lists-", dir=args.scratch)
    lists = write_lists(records, root, list_dir)
    cpus = devices.usable_cpus()
    print("%d images, %d usable CPUs, LMDBs written under %s; anchor %s" % (total, cpus, args.scratch,
                                                                          os.path.dirname(tools[0])), flush=True)
    rounds = []
    for rnd in range(1, args.repeat + 1):
        a_s, manifest, mean, peak = run_make_lmdb(root, args.scratch)
        b_s, steps, anchor_mean = run_anchor(tools, lists, args.scratch)
        rounds.append({"make_lmdb_s": a_s, "anchor_s": b_s, "anchor_steps": steps, "ratio": b_s / a_s,
                       "workers": manifest["settings"]["workers"], "peak_rss_mib": peak,
                       "mean_max_abs_diff": float(np.abs(mean - anchor_mean).max())})
        print(ratio_line(rnd, a_s, b_s, total, peak), flush=True)
    shutil.rmtree(list_dir)
    print("  Caffe's steps (last round): " + ", ".join("%s %.1f s" % kv for kv in steps.items()))
    print("  the two mean.binaryproto differ by at most %.4f (OpenCV's and Pillow's JPEG decoders)"
          % rounds[-1]["mean_max_abs_diff"])
    median = statistics.median(r["ratio"] for r in rounds)
    print("median ratio over %d rounds: %.2fx (goal >= 1.3x)" % (len(rounds), median), flush=True)

    scaling = {}
    for workers in sorted({1, 2, cpus}):
        seconds = run_make_lmdb(root, args.scratch, workers)[0]
        scaling[workers] = total / seconds
        print("make_lmdb --workers %d: %.0f images/s (%.2fx one worker)" % (workers, scaling[workers],
                                                                          scaling[workers] / scaling[1]), flush=True)
    stages = profile_stages(records["train"], args.scratch)
    print("one worker, per image (first %d train images):" % PROFILE_IMAGES)
    whole = sum(stages.values())
    for name, us in stages.items():
        print("  %-32s %6.1f us  %4.1f %%" % (name, us, 100.0 * us / whole))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": total, "cpus": cpus, "rounds": rounds, "median_ratio": median,
                       "scaling_images_per_s": scaling, "stages_us_per_image": stages}, f, indent=2)


if __name__ == "__main__":
    main()
