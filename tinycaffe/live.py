"""Live curves: a run's Caffe log lines become TensorBoard scalars while it trains.

`tensorboard --logdir runs` then compares runs (and sweep trials) as they go. The numbers
are the ones caffelog.parse reads from the same lines (train.csv, test.csv), written with
tensorboardX's SummaryWriter into the run directory:

    train/<output>     every "Train net output" line (train/loss: Caffe's loss at that iteration)
    val/<output>       every "Test net output" line (val/accuracy_top1, val/accuracy_top5, val/loss)
    lr                 every "Iteration N, lr = X" line
    images_per_second  Caffe's "(X iter/s, ...)" times the images one iteration consumes (not at 0)

Step = Caffe's iteration. A resumed run appends a new event file to the same directory.
"""
import re

from . import caffelog

RATE = re.compile(r"Iteration (\d+) \(([-+.\deE]+|inf|nan) iter/s")


class LiveCurves:
    """Feed it every log line; it writes the scalars those lines carry. Never raises on a
    line it does not understand: a log is free text."""

    def __init__(self, log_dir, images_per_iteration, writer=None):
        if writer is None:
            from tensorboardX import SummaryWriter  # only runs that write curves need it
            writer = SummaryWriter(log_dir, flush_secs=10)
        self.writer = writer
        self.images_per_iteration = images_per_iteration
        self.iteration = 0

    def feed(self, line):
        m = caffelog.LR.search(line)
        if m:
            self._scalar("lr", caffelog.parse_float(m.group(2)), int(m.group(1)))
            return
        m = RATE.search(line)
        if m and int(m.group(1)) > 0:  # Caffe's rate at iteration 0 divides by an unset timer: noise
            rate = caffelog.parse_float(m.group(2))
            self._scalar("images_per_second", rate * self.images_per_iteration, int(m.group(1)))
        m = caffelog.ITERATION.search(line)
        if m:
            self.iteration = int(m.group(1))
        m = caffelog.OUTPUT.search(line)
        if m:
            prefix = "train" if m.group(1) == "Train" else "val"
            self._scalar("%s/%s" % (prefix, m.group(2)), caffelog.parse_float(m.group(3)), self.iteration)
            if prefix == "val":
                self.writer.flush()  # a val number is what one waits for: show it at once

    def _scalar(self, tag, value, step):
        self.writer.add_scalar(tag, value, step)  # NaN too: a diverged run shows it, as the CSVs do

    def close(self):
        self.writer.close()
