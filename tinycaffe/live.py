"""Live curves: a run's Caffe log lines become TensorBoard scalars while it trains.

`tensorboard --logdir runs` then compares runs (and sweep trials) as they go. The numbers
are the ones caffelog.parse reads from the same lines (train.csv, test.csv), written with
tensorboardX's SummaryWriter into the run directory:

    train/<output>     every "Train net output" line (train/loss: Caffe's loss at that iteration)
    val/<output>       every "Test net output" line (val/accuracy_top1, val/accuracy_top5, val/loss)
    lr                 every "Iteration N, lr = X" line
    images_per_second  images between two of Caffe's "Iteration N (... iter/s" lines seen by this
                       process over the wall time between their glog timestamps (Caffe's own iter/s
                       restarts with every pycaffe step() and divides by an uninitialised count
                       after a restore: seen at -4e14)
    events/diverged    1 at the iteration where the run diverged (and a text entry `events`)

Step = Caffe's iteration, one value per tag and step: a resumed run's writer purges the steps
at or after its resume point from the earlier segment (TensorBoard's purge_step), and a
second value for a (tag, step) already written in this process is dropped (a closing test at
an iteration Caffe already tested). Every writer has an event file of its own (pid + random
suffix: two writers started in the same second would share tensorboardX's default name).

The curves never stop training: a writer that fails (a full or read-only disk) is switched
off with one warning, and nothing is queued to a writer thread that is no longer there.
"""
import logging
import os
import re
import threading
import time
import uuid

from . import caffelog

RATE = re.compile(r"Iteration (\d+) \((%s) iter/s" % caffelog.NUMBER)


class LiveCurves:
    """Feed it every log line; it writes the scalars those lines carry. Never raises on a
    line it does not understand (a log is free text), nor on a writer that failed."""

    def __init__(self, log_dir, images_per_iteration, writer=None, purge_step=None, warn=None, aliases=None):
        self.warn, self.log_dir = warn or (lambda message: None), log_dir
        self.aliases = aliases or {}  # caffelog.accuracy_aliases: the names train.csv/test.csv use
        self.images_per_iteration = images_per_iteration
        self.iteration = 0
        self.written = set()  # (tag, step) pairs this writer holds
        self.last_rate_mark = None  # (iteration, monotonic seconds) of the previous rate line
        self.writer = writer
        if writer is None:
            try:
                from tensorboardX import SummaryWriter  # only runs that write curves need it
                self.writer = SummaryWriter(log_dir, flush_secs=10, purge_step=purge_step,
                                            filename_suffix=".%d.%s" % (os.getpid(), uuid.uuid4().hex[:8]))
            except OSError as exc:
                self._off(exc)

    def feed(self, line, now=None):
        m = caffelog.LR.search(line)
        if m:
            self._scalar("lr", caffelog.parse_float(m.group(2)), int(m.group(1)))
            return
        m = RATE.search(line)
        if m:
            self._rate(int(m.group(1)), _line_time(line) if now is None else now)
        m = caffelog.ITERATION.search(line)
        if m:
            self.iteration = int(m.group(1))
        m = caffelog.OUTPUT.search(line)
        if m:
            prefix = "train" if m.group(1) == "Train" else "val"
            name = self.aliases.get(m.group(2), m.group(2))
            self._scalar("%s/%s" % (prefix, name), caffelog.parse_float(m.group(3)), self.iteration)
            if prefix == "val":
                self.flush()  # a val number is what one waits for: show it at once

    def _rate(self, iteration, now):
        """images/s from the previous rate line of this process to this one (none across a midnight
        or a clock step back: a window of no length)."""
        previous, self.last_rate_mark = self.last_rate_mark, (iteration, now)
        if previous and iteration > previous[0] and now > previous[1]:
            self._scalar("images_per_second",
                         (iteration - previous[0]) * self.images_per_iteration / (now - previous[1]), iteration)

    def event(self, name, step, text):
        """A run event (a divergence) at its iteration: a scalar, and the words as text."""
        self._scalar("events/" + name, 1.0, step)
        if self._alive():
            self._call(self.writer.add_text, "events", text, step)
        self.flush()

    def _scalar(self, tag, value, step):
        if (tag, step) in self.written or not self._alive():
            return
        self.written.add((tag, step))
        self._call(self.writer.add_scalar, tag, value, step)  # NaN too: a diverged run shows it, as the CSVs do

    def flush(self):
        if self._alive():
            self._call(self.writer.flush)

    def close(self):
        if self._alive():
            self._call(self.writer.close)
        self.writer = None

    # ------------------------------------------------------------ a writer that failed
    def _call(self, method, *args):
        try:
            method(*args)
        except (OSError, ValueError) as exc:  # ValueError: a write to a file the writer closed
            self._off(exc)

    def _event_file_writer(self):
        return getattr(getattr(self.writer, "file_writer", None), "event_writer", None)

    def _alive(self):
        """The writer is there and its thread (which writes the file) still runs: tensorboardX's
        thread dies on a write error, and its bounded queue would then block the next add."""
        if self.writer is None:
            return False
        thread = getattr(self._event_file_writer(), "_worker", None)
        if thread is not None and not thread.is_alive():
            self._off(_thread_errors.pop(thread.ident, None)
                      or OSError("its writer thread stopped (a failed write: disk full or read-only?)"))
            return False
        return True

    def _off(self, exc):
        events = self._event_file_writer()
        if events is not None:
            events._closed = True  # its atexit close would flush to the failed file and wait on the dead thread
        self.writer = None
        self.warn("live curves in %s switched off, training goes on: %s" % (self.log_dir, exc))


def _line_time(line):
    """The wall-clock second a glog line was written (its own timestamp: exact, whatever the pipe's
    delay), or this process's clock for a line without one."""
    t = caffelog.TIME.match(line)
    return caffelog.seconds_of_day(t) if t else time.time() % 86400


# A NaN scalar is what a diverged run's curves must show; tensorboardX warns of each on the terminal.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

_thread_errors = {}  # thread ident -> the OSError that ended a writer thread


def _quiet_writer_errors(args, previous=threading.excepthook):
    """A tensorboardX writer thread that dies on a write error (ENOSPC, EROFS) is LiveCurves'
    business (one warning line), not a traceback in the middle of the training log."""
    if issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_EventLoggerThread":
        _thread_errors[args.thread.ident] = args.exc_value
        return
    previous(args)


threading.excepthook = _quiet_writer_errors
