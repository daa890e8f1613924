#!/usr/bin/env python3
"""Which CPU demo net learns the sample data best in the same CPU budget? The first variant
(default `tiny`, the quickstart's) trains --iters iterations; every other variant gets the
iterations that cost the same time, from `caffe time` measured side by side in this run.
All train through scripts/train.sh on the sample LMDBs (as the quickstart makes them) and
end with a validation; the table gives iterations, training seconds and val top-1/top-5.

    .venv/bin/python bench/bench_learn.py [--variants tiny,resnet_tiny] [--iters 600] [--seeds 0]
                                          [--augments flip] [--lmdb-dir data/sample/lmdb] [--out FILE.json]

With several --seeds (solver random_seed: fillers, crops, mirrors) each variant trains once
per seed and the table adds the mean: 200 val images make one run's margin a few images.
With several --augments (gen_prototxt's presets) each variant also trains once per preset,
with the same iterations and seeds, to compare augmentation.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from bench_nets import caffe_time, cpu_name, timing_net  # noqa: E402
from tinycaffe import augment, devices, gen, nets  # noqa: E402
from tinycaffe.files import write_text  # noqa: E402

TIME_ITERATIONS = 10  # caffe time iterations per variant for the per-iteration cost


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="tiny,resnet_tiny",
                   help="comma-separated; the first sets the budget (default tiny,resnet_tiny)")
    p.add_argument("--iters", type=int, default=600, help="iterations of the first variant (default 600)")
    p.add_argument("--seeds", default="0", help="comma-separated solver random seeds (default 0)")
    p.add_argument("--augments", default=augment.DEFAULT_PRESET,
                   help="comma-separated --augment presets, from: %s (default %s)"
                   % (", ".join(augment.PRESETS), augment.DEFAULT_PRESET))
    p.add_argument("--lmdb-dir", default=os.path.join(REPO, "data", "sample", "lmdb"),
                   help="the sample LMDBs, as scripts/quickstart.sh makes them (default data/sample/lmdb)")
    p.add_argument("--out", default=None,
                   help="JSON results (default bench/results/learn-<date>.json)")
    return p


def train(variant, iters, lmdb_dir, work, seed, augmentation=augment.DEFAULT_PRESET):
    """Generate the variant for the sample data, train it with train.sh; -> run.json's final numbers."""
    with open(os.path.join(lmdb_dir, "manifest.json")) as f:
        manifest = json.load(f)
    cfg = gen.GenConfig(out=os.path.join(work, "prototxt"), lmdb_dir=lmdb_dir, mode="cpu",
                        num_classes=manifest["num_classes"], val_size=manifest["splits"]["val"]["count"],
                        max_iter=iters, test_interval=max(iters // 3, 1), seed=seed, augment=augmentation)
    gen.generate([variant], cfg)
    runs_root = os.path.join(work, "runs")
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "train.sh"),
                          os.path.join(cfg.out, variant, "solver.prototxt"), "--gpu", "cpu", "--runs-root", runs_root],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit("bench_learn.py: training %s failed:\n%s" % (variant, out.stderr[-2000:]))
    run_dir = os.path.join(runs_root, variant, os.listdir(os.path.join(runs_root, variant))[0])
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)["final"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in nets.VARIANTS]
    if unknown or not names:
        return "bench_learn.py: unknown variant(s) %s (valid: %s)" % (",".join(unknown), ", ".join(nets.VARIANTS))
    if not os.path.isfile(os.path.join(args.lmdb_dir, "manifest.json")):
        return "bench_learn.py: %s has no LMDBs; run scripts/quickstart.sh (or tools/make_lmdb.py) first" % args.lmdb_dir
    ms = {v: caffe_time(timing_net(v, nets.variant(v).batch_size), TIME_ITERATIONS) for v in names}
    budget = args.iters * ms[names[0]]
    iterations = {v: max(int(round(budget / ms[v])), 3) for v in names}
    print("CPU: %s, %d CPUs usable; budget: %d iterations of %s = %.0f s of compute"
          % (cpu_name(), devices.usable_cpus(), args.iters, names[0], budget / 1000.0), flush=True)
    seeds = [int(x) for x in args.seeds.split(",") if x != ""]
    presets = [a for a in args.augments.split(",") if a]
    for a in presets:
        if a not in augment.PRESETS:
            return "bench_learn.py: unknown --augments preset '%s' (valid: %s)" % (a, ", ".join(augment.PRESETS))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for seed in seeds:
            for v, a in [(v, a) for v in names for a in presets]:
                final = train(v, iterations[v], args.lmdb_dir, os.path.join(work, "%s-%s-%d" % (v, a, seed)), seed, a)
                rows.append({"variant": v, "augment": a, "seed": seed, "batch": nets.variant(v).batch_size,
                             "ms_per_iteration": round(ms[v], 1), "iterations": iterations[v],
                             "train_seconds": final.get("wall_seconds"),
                             "val_top1": final.get("accuracy_top1"), "val_top5": final.get("accuracy_top5")})
    print("\n| variant | augment | seed | batch | ms per iteration | iterations | training s | val top-1 | val top-5 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| `%s` | %s | %d | %d | %.0f | %d | %.0f | %.1f%% | %.1f%% |"
              % (r["variant"], r["augment"], r["seed"], r["batch"], r["ms_per_iteration"], r["iterations"],
                 r["train_seconds"] or 0, 100 * r["val_top1"], 100 * r["val_top5"]))
    if len(seeds) > 1:
        for v, a in [(v, a) for v in names for a in presets]:
            mine = [r for r in rows if r["variant"] == v and r["augment"] == a]
            print("| `%s` | %s | mean of %d | | | | %.0f | %.1f%% | %.1f%% |"
                  % (v, a, len(mine), sum(r["train_seconds"] or 0 for r in mine) / len(mine),
                     100 * sum(r["val_top1"] for r in mine) / len(mine),
                     100 * sum(r["val_top5"] for r in mine) / len(mine)))
    out = args.out or os.path.join(REPO, "bench", "results", "learn-%s.json" % datetime.date.today().isoformat())
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_text(out, json.dumps({"cpu": cpu_name(), "budget_ms": budget, "lmdb_dir": args.lmdb_dir, "rows": rows},
                               indent=2) + "\n")
    print("\nresults: %s" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
