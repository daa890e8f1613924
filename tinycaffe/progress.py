"""The run's one live line on the terminal, fed with Caffe's log lines (both engines log the same).

    tiny  45%|████▌     | 270/600 [00:06<00:07] loss 1.82 | val top-1 0.412 | 4,310 img/s

On a terminal it is a tqdm bar redrawn in place. Elsewhere (a pipe, a Slurm log, a sweep
worker's file) a bar drawn with carriage returns would be one endless line, so it prints one
plain line per val test and, between tests, at most one every HEARTBEAT_SECONDS: a log that
is read later keeps a line per event, like Keras' verbose=2. Caffe's own warnings and errors
(glog W and E lines, rare) and plateau anneals are shown as they come; everything else is in
caffe.log.

images/s is measured from the glog timestamps of the loss lines (the child's own clock, as
live.py does), the time of the val tests left out; the ETA is the images left at that rate plus
the tests left at the last test's duration. Nothing here can stop a run (a line it cannot read
is skipped).
"""
import math
import os
import re
import sys
import time

from . import caffelog

HEARTBEAT_SECONDS = 60  # without a terminal: a progress line at least this often while training goes on
LOSS = re.compile(r"Iteration (\d+)(?: \(.*\))?, loss = (\S+)")
SHOWN = re.compile(r"^[WE]\d{4,8} ")  # glog warning and error lines (fatal ones end a run: its last line)


class ProgressLine:
    """Feed it every log line; close() it when the run ends. `start` is the iteration the run
    (re)starts from, `total` the solver's max_iter."""

    def __init__(self, label, total, start=0, images_per_iteration=0, aliases=None, stream=None, tty=None,
                 test_interval=0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.label, self.total, self.iteration = label, total, start
        self.images_per_iteration = images_per_iteration
        self.aliases = aliases or {}
        self.loss = self.top1 = None
        self.first_mark = None  # (iteration, seconds) of the first loss line: the rate's origin
        self.rate = None  # images/s of training, tests left out
        self.test_interval = test_interval
        self.testing_since = self.tested_until = None  # glog seconds of the current test's first and last line
        self.test_seconds = 0.0  # val tests since first_mark
        self.last_test_seconds = 0.0  # the last test's duration
        self.last_printed = time.monotonic()
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            # a terminal of no width or no height (a pty nobody sized: docker -t, script): tqdm would draw nothing
            columns, rows = _size(self.stream)
            sized = columns > 0 and rows > 0  # tqdm's dynamic size would read the zero back
            self.bar = tqdm(total=total, initial=start, desc=label, file=self.stream, dynamic_ncols=sized,
                            ncols=None if sized else columns or 100, nrows=None if sized else rows or 24,
                            leave=True, mininterval=0.5,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}]{postfix}")

    # ------------------------------------------------------------ input
    def feed(self, line):
        if (SHOWN.match(line) and "] tinycaffe: " not in line) or "] tinycaffe: plateau anneal" in line:
            self._note(line.rstrip("\n"))  # Caffe's warnings and errors are rare and meant for the user
            return
        m = LOSS.search(line)
        if m:
            self._loss(int(m.group(1)), caffelog.parse_float(m.group(2)), _seconds(line))
            return
        m = caffelog.OUTPUT.search(line)
        if m and m.group(1) == "Test":
            self.tested_until = _seconds(line)
            if self.aliases.get(m.group(2), m.group(2)) == "accuracy_top1":
                self.top1 = caffelog.parse_float(m.group(3))
                self._show(tested=True)
            return
        m = caffelog.ITERATION.search(line)
        if m and "Testing net" in line:
            self._end_test()
            self.testing_since = _seconds(line)
            self._advance(int(m.group(1)))

    def _end_test(self):
        """A test's lines are over (a loss line or the next test came): its duration counted."""
        if self.testing_since is not None and self.tested_until is not None and self.tested_until >= self.testing_since:
            self.last_test_seconds = self.tested_until - self.testing_since
            if self.first_mark is not None:
                self.test_seconds += self.last_test_seconds
        self.testing_since = self.tested_until = None

    def _loss(self, iteration, loss, seconds):
        self.loss = loss
        self._end_test()
        if self.first_mark is None or seconds is None or seconds < self.first_mark[1]:
            self.first_mark = (iteration, seconds)  # the first line, or a clock that went back (midnight)
            self.test_seconds = 0.0
        elif iteration > self.first_mark[0] and seconds - self.first_mark[1] > self.test_seconds:
            self.rate = (iteration - self.first_mark[0]) * self.images_per_iteration / (
                seconds - self.first_mark[1] - self.test_seconds)
        if self.bar is not None:
            self.bar.set_postfix_str(self.summary(), refresh=False)  # before the redraw _advance makes
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
        tests_left = (self.total // self.test_interval - self.iteration // self.test_interval
                      if self.test_interval else 0)
        return (max(self.total - self.iteration, 0) * self.images_per_iteration / self.rate
                + max(tests_left, 0) * self.last_test_seconds)

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

    def _note(self, text):
        """A line of its own above the progress line."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.set_postfix_str(self.summary(), refresh=False)
            self.bar.close()
            self.bar = None


def _size(stream):
    """(columns, rows) of the stream's terminal; 0 for what it does not say."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return size.columns, size.lines
    except (OSError, ValueError, AttributeError):
        return 0, 0


def _columns(stream):
    return _size(stream)[0]


def _seconds(line):
    t = caffelog.TIME.match(line)
    return caffelog.seconds_of_day(t) if t else None


def _clock(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)
