"""The run's one live line on the terminal, fed with Caffe's log lines (both engines log the same).

    tiny  45%|████▌     | 270/600 [00:06<00:07] loss 1.82 | val top-1 0.412 | 4,310 img/s

On a terminal it is a tqdm bar redrawn in place. Elsewhere (a pipe, a Slurm log, a sweep
worker's file) a bar drawn with carriage returns would be one endless line, so it prints one
plain line per val test and, between tests, at most one every HEARTBEAT_SECONDS: a log that
is read later keeps a line per event, like Keras' verbose=2. The full log is in caffe.log.

images/s is measured from the glog timestamps of the loss lines (the child's own clock, as
live.py does), ETA from that rate; nothing here can stop a run (a line it cannot read is skipped).
"""
import math
import os
import re
import sys
import time

from . import caffelog

HEARTBEAT_SECONDS = 60  # without a terminal: a progress line at least this often while training goes on
LOSS = re.compile(r"Iteration (\d+)(?: \(.*\))?, loss = (\S+)")


class ProgressLine:
    """Feed it every log line; close() it when the run ends. `start` is the iteration the run
    (re)starts from, `total` the solver's max_iter."""

    def __init__(self, label, total, start=0, images_per_iteration=0, aliases=None, stream=None, tty=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.label, self.total, self.iteration = label, total, start
        self.images_per_iteration = images_per_iteration
        self.aliases = aliases or {}
        self.loss = self.top1 = None
        self.first_mark = None  # (iteration, seconds) of the first loss line: the rate's origin
        self.rate = None  # images/s
        self.last_printed = time.monotonic()
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            sized = _columns(self.stream) > 0  # a terminal of no width (a pty nobody sized): tqdm would draw nothing
            self.bar = tqdm(total=total, initial=start, desc=label, file=self.stream, dynamic_ncols=sized,
                            ncols=None if sized else 100, leave=True, mininterval=0.5,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}]{postfix}")

    # ------------------------------------------------------------ input
    def feed(self, line):
        m = LOSS.search(line)
        if m:
            self._loss(int(m.group(1)), caffelog.parse_float(m.group(2)), _seconds(line))
            return
        m = caffelog.OUTPUT.search(line)
        if m and m.group(1) == "Test" and self.aliases.get(m.group(2), m.group(2)) == "accuracy_top1":
            self.top1 = caffelog.parse_float(m.group(3))
            self._show(tested=True)
            return
        m = caffelog.ITERATION.search(line)
        if m and "Testing net" in line:
            self._advance(int(m.group(1)))

    def _loss(self, iteration, loss, seconds):
        self.loss = loss
        if self.first_mark is None or seconds is None or seconds < self.first_mark[1]:
            self.first_mark = (iteration, seconds)  # the first line, or a clock that went back (midnight)
        elif iteration > self.first_mark[0] and seconds > self.first_mark[1]:
            self.rate = (iteration - self.first_mark[0]) * self.images_per_iteration / (seconds - self.first_mark[1])
        self._advance(iteration)
        self._show(tested=False)

    def _advance(self, iteration):
        if self.bar is not None and iteration > self.bar.n:
            self.bar.update(iteration - self.bar.n)
        self.iteration = max(self.iteration, iteration)

    # ------------------------------------------------------------ output
    def summary(self):
        """'loss 1.82 | val top-1 0.412 | 4,310 img/s' from what has been seen so far."""
        parts = []
        if self.loss is not None:
            parts.append("loss %.4g" % self.loss)
        if self.top1 is not None:
            parts.append("val top-1 %.4f" % self.top1)
        if self.rate:
            parts.append("{:,.0f} img/s".format(self.rate))
        return " | ".join(parts)

    def eta(self):
        """Seconds left at the measured rate, or None before there is one."""
        if not self.rate or not self.images_per_iteration:
            return None
        return max(self.total - self.iteration, 0) * self.images_per_iteration / self.rate

    def _show(self, tested):
        if self.bar is not None:
            self.bar.set_postfix_str(self.summary(), refresh=tested)
            return
        if not tested and time.monotonic() - self.last_printed < HEARTBEAT_SECONDS:
            return
        self.last_printed = time.monotonic()
        eta = self.eta()
        self.stream.write("[train] %s iter %d/%d | %s%s\n" % (
            self.label, self.iteration, self.total, self.summary(),
            " | ETA %s" % _clock(eta) if eta is not None else ""))
        self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.set_postfix_str(self.summary(), refresh=False)
            self.bar.close()
            self.bar = None


def _columns(stream):
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def _seconds(line):
    t = caffelog.TIME.match(line)
    return caffelog.seconds_of_day(t) if t else None


def _clock(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)
