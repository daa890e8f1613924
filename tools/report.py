#!/usr/bin/env python3
"""A Markdown table of all runs under a folder (runs/ by default; at any depth, so a sweep's
trial folders too): variant, status, iterations, wall time, best val top-1/top-5 and the
paper's figure for that variant."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinycaffe import nets, repo_path, runs  # noqa: E402


EXAMPLES = """examples:
  %(prog)s                       every run under runs/
  %(prog)s sweeps/sample         the trials of a sweep (sweeps/<name>/trial_<n>/)"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default=repo_path(runs.DEFAULT_RUNS),
                   help="folder searched at any depth for run directories (default: the repo's %s, where "
                        "train.sh writes them)" % runs.DEFAULT_RUNS)
    return p


def _pct(value):
    return "%.1f%%" % (100 * value) if isinstance(value, (int, float)) else "—"


def run_files(root):
    """Every run.json below root, at any depth; symlinked folders are not followed (no loops)."""
    return sorted(os.path.join(folder, "run.json") for folder, _, names in os.walk(root) if "run.json" in names)


def table(root):
    lines = ["| run | variant | status | iterations | wall time | best val top-1 | best val top-5 | paper top-1 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for path in run_files(root):
        with open(path) as f:
            r = json.load(f)
        final = r.get("final", {})
        wall = final.get("wall_seconds")
        lines.append("| %s | `%s` | %s | %s | %s | %s | %s | %s |" % (
            os.path.relpath(os.path.dirname(path), root), r.get("variant"), r.get("status"),
            final.get("iterations", "—"), "%.0f s" % wall if isinstance(wall, (int, float)) else "—",
            _pct(final.get("best_accuracy_top1")), _pct(final.get("best_accuracy_top5")),
            nets.VARIANTS[r["variant"]].paper_top1 if r.get("variant") in nets.VARIANTS else "—"))
    return lines


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.root):
        print("report.py: error: %s: no such folder" % args.root, file=sys.stderr)
        return 1
    lines = table(args.root)
    print("\n".join(lines))
    return 0 if len(lines) > 2 else 1


if __name__ == "__main__":
    sys.exit(main())
