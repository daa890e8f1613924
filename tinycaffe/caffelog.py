"""Parse a Caffe training log (also one still being written) into train/test rows,
write them as CSVs with the columns of Caffe's tools/extra/parse_log.py, and draw curves."""
import csv
import datetime
import math
import os
import re

from .files import atomic_open

TIME = re.compile(r"^[IWEF](\d{4}|\d{8}) (\d\d):(\d\d):(\d\d)\.(\d+)")
ITERATION = re.compile(r"Iteration (\d+)")
# A float as C++ streams print it: 2.3, 1e-05, -1.07071e+16, inf, -inf, nan, -nan (x86's NaN
# has its sign bit set); the sign belongs to every form, or "-nan" would read as a bare "-".
NUMBER = r"[-+]?(?:nan|inf|\d*\.?\d+(?:[eE][-+]?\d+)?)"
LR = re.compile(r"Iteration (\d+), lr = (%s)" % NUMBER)
OUTPUT = re.compile(r"(Train|Test) net output #\d+: (\S+) = (%s)" % NUMBER)
ANNEAL = re.compile(r"tinycaffe: plateau anneal")
# The train tool's line for a child that resumes from a snapshot (train.py writes it before the child starts).
RESUMED_FROM = re.compile(r"\] tinycaffe: /.*?(?:-snapshot|--state) \S*_iter_(\d+)\.solverstate")


def seconds_of_day(match):
    """The time of day, in seconds, of a TIME match (a glog line's timestamp)."""
    h, m, s, frac = (int(match.group(i)) for i in (2, 3, 4, 5))
    return h * 3600 + m * 60 + s + frac / 10 ** len(match.group(5))


def _seconds(match, day_offset):
    return day_offset + seconds_of_day(match)


def parse_float(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse(path, aliases=None):
    """-> (train_rows, test_rows): lists of dicts with NumIters, Seconds, LearningRate, <outputs>.
    After a resume from snapshot N (the train tool's command line), rows at N or later from
    before it are dropped: each iteration's numbers are those of the run as it went on.
    aliases: {output name: the name to use} (accuracy_aliases: a net's Accuracy tops by top_k)."""
    aliases = aliases or {}
    train, test, lrs = {}, {}, {}
    start = prev = None
    day = 0.0
    iteration, last_lr, iteration_seconds = 0, math.nan, None
    with open(path, errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the last line of a log still being written
            t = TIME.match(line)
            seconds = None
            if t:
                seconds = _seconds(t, day)
                if prev is not None and seconds < prev - 1:  # midnight
                    day += 86400
                    seconds += 86400
                prev = seconds
                start = seconds if start is None else start
            m = RESUMED_FROM.search(line)
            if m and "--test-only" not in line:
                _forget_from(int(m.group(1)), train, test, lrs)
                continue
            m = LR.search(line)
            if m:
                lrs[int(m.group(1))] = last_lr = parse_float(m.group(2))
                continue
            m = ITERATION.search(line)
            if m:
                # Rows take the time of their "Iteration N" line, as Caffe's parse_log.py does.
                iteration, iteration_seconds = int(m.group(1)), seconds
            m = OUTPUT.search(line)
            if m:
                rows = train if m.group(1) == "Train" else test
                row = rows.setdefault(iteration, {"NumIters": iteration,
                                                  "Seconds": round(iteration_seconds - start, 3)
                                                  if iteration_seconds is not None else "",
                                                  "LearningRate": last_lr})
                row[aliases.get(m.group(2), m.group(2))] = parse_float(m.group(3))
    # A train row's LR is the one Caffe printed for that iteration (it comes after the outputs).
    # A test row keeps the LR in force when the test ran, as Caffe's parse_log.py does.
    for it, row in train.items():
        if it in lrs:
            row["LearningRate"] = lrs[it]
    return [train[k] for k in sorted(train)], [test[k] for k in sorted(test)]


def accuracy_aliases(net):
    """{top name: accuracy_top<k>} for a NetParameter's Accuracy layers, found by type and top_k,
    not by name: BVLC's cifar10_quick calls its top-1 output `accuracy`. Names that already say
    their k, and a second layer of the same k, keep their own."""
    aliases, taken = {}, set()
    for layer in net.layer:
        if layer.type != "Accuracy" or not layer.top:
            continue
        canonical = "accuracy_top%d" % (layer.accuracy_param.top_k or 1)
        if layer.top[0] != canonical and canonical not in taken and \
                canonical not in [t for other in net.layer for t in other.top]:
            aliases[layer.top[0]] = canonical
        taken.add(canonical)
    return aliases


def _forget_from(iteration, *tables):
    """A resume from the snapshot at `iteration`: what the log said from there on belongs to a
    stretch of the run that no longer happened (a resume from an older snapshot, after a
    divergence or a change of max_iter); the resumed child says it again (TensorBoard's purge_step)."""
    for table in tables:
        for key in [k for k in table if k >= iteration]:
            del table[key]


def write_csv(rows, path):
    keys = ["NumIters", "Seconds", "LearningRate"]
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow(row)


def plot(train, test, path, title=""):
    """curves.png: train loss, val top-1/top-5 and the learning rate against iterations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    its = [r["NumIters"] for r in train]
    axes[0].plot(its, [r.get("loss", math.nan) for r in train], lw=1, label="train loss")
    if test and "loss" in test[0]:
        axes[0].plot([r["NumIters"] for r in test], [r["loss"] for r in test], "o-", lw=1, ms=3, label="val loss")
    axes[0].set_ylabel("loss")
    for key, style in (("accuracy_top1", "o-"), ("accuracy_top5", "s--")):
        if test and key in test[0]:
            axes[1].plot([r["NumIters"] for r in test], [r.get(key, math.nan) for r in test], style, lw=1, ms=3,
                         label="val " + key.replace("accuracy_", ""))
    axes[1].set_ylabel("val accuracy")
    axes[1].set_ylim(0, 1)
    for ax, where in ((axes[0], "upper right"), (axes[1], "lower right")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where)
    lr_points = sorted({(r["NumIters"], r["LearningRate"]) for r in train + test
                        if isinstance(r["LearningRate"], float) and r["LearningRate"] > 0})
    if lr_points:
        axes[2].step([p[0] for p in lr_points], [p[1] for p in lr_points], where="post")
        axes[2].set_yscale("log")
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(log_path, out_dir, title="", aliases=None):
    """train.csv, test.csv and curves.png for a log; returns (train rows, test rows). aliases: the
    net's accuracy outputs by top_k (accuracy_aliases), as a run's own CSVs name them."""
    train, test = parse(log_path, aliases)
    return write_rows(train, test, out_dir, title)


def write_rows(train, test, out_dir, title="", events=()):
    """train.csv, test.csv and curves.png from parsed rows; -> (train rows with the events, test rows).
    events: rows the log's outputs do not carry (a divergence: {"NumIters", "loss", "event"}), added
    to train.csv at their iteration (where a row of that iteration exists, its columns are filled in)."""
    by_iteration = {r["NumIters"]: dict(r) for r in train}
    for event in events:
        row = by_iteration.setdefault(event["NumIters"], {"NumIters": event["NumIters"], "Seconds": "",
                                                          "LearningRate": math.nan})
        row.update({k: v for k, v in event.items() if k not in row or k == "event"})
    train = [by_iteration[k] for k in sorted(by_iteration)]
    os.makedirs(out_dir, exist_ok=True)
    write_csv(train, os.path.join(out_dir, "train.csv"))
    write_csv(test, os.path.join(out_dir, "test.csv"))
    plot(train, test, os.path.join(out_dir, "curves.png"), title)
    return train, test


GLOG_PROBLEM = re.compile(r"^([FE])\d{4,8} [\d:.]+\s+\d+ ([^\]]+)\] (.*)")
CHILD_STARTED = re.compile(r"\] tinycaffe: /\S+")  # the train tool's line with the command of a child it starts
PYTHON_ERROR = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(: .*)?$")


def failure_cause(path):
    """Why the Caffe process of a log stopped, in its own words, or None: its last fatal glog line
    (a failed CHECK: "Check failed: ... (data_layer.cpp:45)"), else its last error line, else the
    last line of a Python traceback (the pycaffe worker), said after the last child started (the
    train tool's command line). tinycaffe's own lines are not causes."""
    fatal = error = python = None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if CHILD_STARTED.search(line):  # a resume appends to the log: only this child's words count
                    fatal = error = python = None
                    continue
                m = GLOG_PROBLEM.match(line)
                if m and m.group(2).strip() != "tinycaffe":
                    words = "%s (%s)" % (m.group(3).strip(), m.group(2).strip().split()[-1])
                    if m.group(1) == "F":
                        fatal = words
                    else:
                        error = words
                elif PYTHON_ERROR.match(line.strip()):
                    python = line.strip()
    except OSError:
        return None
    return fatal or python or error


def glog_line(message, level="I", where="tinycaffe"):
    """A line in glog's format, so that our own lines sit in caffe.log like Caffe's."""
    t = datetime.datetime.now()
    return "%s%s %s %d %s] %s\n" % (level, t.strftime("%Y%m%d"), t.strftime("%H:%M:%S.%f"), os.getpid(), where,
                                     message)
