#!/usr/bin/env python3
"""Caffe on CPU and PyTorch on CPU side by side: the same nets, the same batch and the same
number of threads; ms per forward-backward and the ratio (goal: Caffe / PyTorch <= 1.0).

    python3 bench/bench_cpu.py [--variants tiny,alexnet,...] (default: all ten variants)
                               [--batch 64] [--iterations 3] [--rounds 3] [--threads N]
                               [--caffe NAME=CAFFE_BIN ...] [--layers] [--out FILE.json]

Caffe: `caffe time` (no -gpu) on prototxt/<variant>/train_val.prototxt with the Data layers
turned into DummyData of the same shape, TRAIN phase, OMP_NUM_THREADS = OPENBLAS_NUM_THREADS
= --threads; the figure is its "Average Forward-Backward" less its DummyData layer's forward
(a Gaussian refill of the batch every iteration, 3 ms of tiny's 43: PyTorch's twin gets one
fixed tensor; both figures are in the JSON). PyTorch: bench/torch_nets.py's twin of that very NetParameter, train mode,
forward + loss + backward, torch.set_num_threads(--threads). Before any timing each twin is
checked against pycaffe (bench/bench_gpu.py's verify_twin); a variant whose twin differs is
not timed. The rounds are interleaved (every build and PyTorch once per round, in turn) and
the median of the rounds is reported, so a noisy neighbour hits both sides alike.

--caffe NAME=BIN (repeatable) times several Caffe builds in the same run, e.g. the build
before a change against the build after it; the default is the active build. --layers adds
Caffe's per-layer table (caffe time's forward + backward per layer) and PyTorch's profiler
table for each variant: where the time goes.

PyTorch is a bench-only dependency: run with an interpreter that has it, or this script
makes $TINYCAFFE_HOME/bench/torch-venv (pip install $TORCH_SPEC, default torch==2.13.0, a
CPU build where the wheel is at hand; plus requirements.txt) and runs itself there.
scripts/setup.sh never installs it. Results go to bench/results/cpu-<date>.json.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_VARIANTS = ("tiny,alexnet,alexnet_small,alexnet_prelu,alexnet_prelu_bn,vgg_prelu_bn,resnet_tiny,resnet18,"
                    "resnet34,inception_small")  # every variant: each has a twin (issue 25)
DEFAULT_BATCH = 64        # the batch
DEFAULT_ITERATIONS = 3    # forward-backward passes per timing
DEFAULT_ROUNDS = 3        # interleaved repetitions; the median is reported
GOAL_RATIO = 1.0          # Caffe ms / PyTorch ms we aim to stay under
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")  # Caffe's side of --threads
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # the bench venv's PyTorch


def ensure_torch(argv, script=__file__):
    """Import torch, or re-run `script` (this one by default) in the bench venv that has it (made on
    first use)."""
    import importlib.util
    if importlib.util.find_spec("torch") is not None:
        return
    from tinycaffe import caffe_env
    venv = os.path.join(caffe_env.tinycaffe_home(), "bench", "torch-venv")
    python = os.path.join(venv, "bin", "python")
    if os.environ.get("TINYCAFFE_BENCH_VENV") == venv:
        sys.exit("%s: error: %s has no torch; remove it and run again" % (os.path.basename(script), venv))
    if not os.path.exists(python):
        print("[bench_cpu] making %s (%s + requirements.txt), once" % (venv, TORCH_SPEC), file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH_SPEC,
                        "-r", os.path.join(REPO, "requirements.txt")], check=True)
    # pycaffe comes from the .pth that setup.sh put into .venv: the same path here.
    pycaffe = caffe_env.read_location().get("PYCAFFE_DIR", "")
    env = dict(os.environ, TINYCAFFE_BENCH_VENV=venv,
               PYTHONPATH=os.pathsep.join(p for p in (pycaffe, os.environ.get("PYTHONPATH", "")) if p))
    os.execve(python, [python, os.path.abspath(script)] + list(argv), env)


def torch_step(net, shape):
    """A closure doing one forward + loss + backward of the twin, like `caffe time`."""
    import torch
    import torch_nets
    model = torch_nets.build(net, shape).train()
    loss_top = next(layer.top[0] for layer in net.layer if layer.type == "SoftmaxWithLoss")
    classes = next(layer.inner_product_param.num_output for layer in reversed(net.layer)
                   if layer.type == "InnerProduct")
    x = torch.randn(shape) * 50
    y = torch.randint(0, classes, (shape[0],))

    def step():
        model.zero_grad(set_to_none=True)
        model(x, y)[loss_top].backward()
    return step


def torch_time(step, iterations):
    step()  # warm-up: allocator, oneDNN primitives
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return (time.perf_counter() - start) / iterations * 1000


def torch_profile(step, iterations, rows=12):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def build_name(binary):
    """The build stamp of install_caffe.sh's prefix, or of a pack_caffe.sh bundle's MANIFEST."""
    root = os.path.dirname(os.path.dirname(binary))
    try:
        with open(os.path.join(root, ".tinycaffe-build")) as f:
            return f.readline().strip()
    except OSError:
        pass
    try:
        with open(os.path.join(root, "MANIFEST.txt")) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("build:")), "unknown")
    except OSError:
        return "unknown"


def parse_builds(specs):
    from tinycaffe import caffe_env
    if not specs:
        return [("caffe", caffe_env.caffe_binary())]
    builds = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not os.access(path, os.X_OK):
            raise SystemExit("bench_cpu.py: error: --caffe %s: expected NAME=PATH of an executable caffe binary"
                             % spec)
        builds.append((name, os.path.abspath(path)))
    return builds


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated (default %s)" % DEFAULT_VARIANTS)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="batch size (default %d)" % DEFAULT_BATCH)
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                   help="forward-backward passes per timing (default %d)" % DEFAULT_ITERATIONS)
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                   help="interleaved rounds, median reported (default %d)" % DEFAULT_ROUNDS)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both engines (default: the CPUs this process may use)")
    p.add_argument("--caffe", action="append", metavar="NAME=BIN",
                   help="a Caffe build to time (repeatable; default: the active build)")
    p.add_argument("--layers", action="store_true", help="print the per-layer / per-op tables (default off)")
    p.add_argument("--no-verify", action="store_true", help="skip the twin check (default: check)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/cpu-<date>.json)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    ensure_torch(argv)
    import torch
    from bench_gpu import _data_shape, verify_twin
    from bench_nets import caffe_time_layers, cpu_name, timing_net
    from tinycaffe import check, devices
    from tinycaffe.files import atomic_open
    threads = args.threads or devices.usable_cpus()
    torch.set_num_threads(threads)
    caffe_threads = dict.fromkeys(THREAD_VARIABLES, str(threads))
    builds = parse_builds(args.caffe)
    today = datetime.date.today().isoformat()
    out = args.out or os.path.join(REPO, "bench", "results", "cpu-%s.json" % today)
    record = {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": threads, "date": today, "batch": args.batch,
              "iterations": args.iterations, "rounds": args.rounds, "torch": torch.__version__,
              "torch_mkldnn": torch.backends.mkldnn.is_available(),
              "builds": {name: {"binary": b, "stamp": build_name(b)} for name, b in builds}, "results": []}
    print("CPU: %s, %d threads for both engines; batch %d, %d iterations x %d rounds (median)"
          % (record["cpu"], threads, args.batch, args.iterations, args.rounds))
    print()
    header = "| variant | PyTorch ms | " + " | ".join("Caffe `%s` ms | `%s` / PyTorch" % (n, n) for n, _ in builds)
    print(header + " |")
    print("|---|---:|" + "---:|---:|" * len(builds))
    for variant in args.variants.split(","):
        row = {"variant": variant}
        verify = {"checked": False, "why": "--no-verify"} if args.no_verify else verify_twin(variant)
        row["verify"] = verify
        if verify.get("checked") and not verify["match"]:
            row["skipped"] = "twin differs from Caffe (max relative diff %.3g)" % verify["max_rel_diff"]
            print("| %s | %s |" % (variant, row["skipped"]))
            record["results"].append(row)
            continue
        model = timing_net(variant, args.batch)
        try:
            _, net = check.parse(model)
            step = torch_step(net, _data_shape(net))
            times = {"torch": []}
            layers = {}
            inputs = [layer.name for layer in net.layer if layer.type == "DummyData"]
            for _ in range(args.rounds):
                times["torch"].append(torch_time(step, args.iterations))
                for name, binary in builds:
                    ms, layers[name] = caffe_time_layers(model, args.iterations, binary=binary, env=caffe_threads)
                    times.setdefault(name + " (caffe time)", []).append(ms)
                    times.setdefault(name, []).append(ms - sum(layers[name].get(k, 0.0) for k in inputs))
            if args.layers:
                row["torch_profile"] = torch_profile(step, args.iterations)
                row["caffe_layers"] = layers
        finally:
            os.unlink(model)
        row["torch_ms"] = statistics.median(times["torch"])
        row["rounds_ms"] = times
        cells = []
        for name, _ in builds:
            ms = statistics.median(times[name])
            row.setdefault("caffe_ms", {})[name] = ms
            row.setdefault("ratio", {})[name] = ms / row["torch_ms"]
            cells.append("%.1f | %.2f" % (ms, ms / row["torch_ms"]))
        print("| `%s` | %.1f | %s |" % (variant, row["torch_ms"], " | ".join(cells)), flush=True)
        record["results"].append(row)
    if args.layers:
        _print_layers(record, builds)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_open(out) as f:
        json.dump(record, f, indent=1)
    print("\ngoal: Caffe / PyTorch <= %.1f. Results: %s" % (GOAL_RATIO, out))
    return 0


def _print_layers(record, builds):
    for row in record["results"]:
        if "caffe_layers" not in row:
            continue
        print("\n### %s: Caffe, ms per layer (forward + backward), last round" % row["variant"])
        names = sorted(row["caffe_layers"][builds[0][0]], key=lambda k: -row["caffe_layers"][builds[0][0]][k])
        print("| layer | " + " | ".join("`%s`" % n for n, _ in builds) + " |")
        print("|---|" + "---:|" * len(builds))
        for layer in names:
            print("| %s | %s |" % (layer, " | ".join("%.1f" % row["caffe_layers"][n].get(layer, 0.0)
                                                   for n, _ in builds)))
        print("\n### %s: PyTorch profiler (self CPU time, %d iterations)\n```\n%s```"
              % (row["variant"], record["iterations"], row["torch_profile"]))


if __name__ == "__main__":
    sys.exit(main())
