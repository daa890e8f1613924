"""tinycaffe/live.py: TensorBoard curves that are true (rates from the wall clock, one value per
step) and that never stop or hang training (a writer on a full disk)."""
import glob
import os
import subprocess
import sys

import pytest

from test_trust import mount_tmpfs, read_events  # noqa: F401 (a fixture)
from tinycaffe import live


def lines(iteration, rate="-4.2e+14"):
    return ["I1204 10:00:00.000000 1 solver.cpp:218] Iteration %d (%s iter/s, 0.1s/10 iters), loss = 2.3" % (
        iteration, rate),
            "I1204 10:00:00.000000 1 solver.cpp:237]     Train net output #0: loss = 2.3 (* 1 = 2.3 loss)"]


def test_images_per_second_comes_from_the_wall_clock_not_caffes_timer(tmp_path):
    curves = live.LiveCurves(str(tmp_path), images_per_iteration=32)
    for iteration, now in ((10, 100.0), (20, 102.0), (30, 103.0)):
        for line in lines(iteration):  # Caffe's own iter/s, garbage after a resume
            curves.feed(line, now=now)
    curves.close()
    (_, events), = read_events(tmp_path)
    rates = {step: value for tag, step, value in events if tag == "images_per_second"}
    assert rates == {20: 10 * 32 / 2.0, 30: 10 * 32 / 1.0}  # none at 10: this process has no earlier mark


@pytest.mark.parametrize("garbage", ["-nan", "nan", "-inf", "inf", "-1.07071e+16", "1875", "4.2e-05"])
def test_a_rate_line_counts_whatever_float_caffe_prints_in_it(tmp_path, garbage):
    """Caffe's iter/s divides by an uninitialised float after a restore: its text can be any float
    C++ prints (-nan on x86). The line still marks the time, so the next interval has its rate
    (a resumed run on CI once lost its first rate to a "-nan")."""
    curves = live.LiveCurves(str(tmp_path), images_per_iteration=32)
    for iteration, now, rate in ((60, 100.0, garbage), (70, 104.0, "47.39")):
        for line in lines(iteration, rate):
            curves.feed(line, now=now)
    curves.close()
    (_, events), = read_events(tmp_path)
    assert {step: value for tag, step, value in events if tag == "images_per_second"} == {70: 10 * 32 / 4.0}


def test_one_value_per_tag_and_step(tmp_path):
    curves = live.LiveCurves(str(tmp_path), images_per_iteration=1)
    test = ["I1204 10:00:00.000000 1 solver.cpp:347] Iteration 40, Testing net (#0)",
            "I1204 10:00:00.000000 1 solver.cpp:414]     Test net output #0: accuracy_top1 = 0.25"]
    for line in test + test:  # Caffe's test at 40, then a closing validation at the same iteration
        curves.feed(line)
    curves.close()
    (_, events), = read_events(tmp_path)
    assert [(tag, step) for tag, step, _ in events if tag.startswith("val/")] == [("val/accuracy_top1", 40)]


def test_two_writers_started_in_the_same_second_write_two_files(tmp_path):
    first = live.LiveCurves(str(tmp_path), 1)
    second = live.LiveCurves(str(tmp_path), 1, purge_step=10)
    first.close()
    second.close()
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2
    purges = [step for _, events in read_events(tmp_path) for tag, step, _ in events if tag == "<purge>"]
    assert purges == [10]


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from tinycaffe import live
warnings = []
curves = live.LiveCurves(sys.argv[2], 32, warn=warnings.append)
open(sys.argv[3], "wb").write(b"x" * 4 * 1024 * 1024)  # may stop short: the disk is full either way
""" + """
for i in range(200):
    curves.feed("I1204 10:00:00.000000 1 solver.cpp:414]     Test net output #0: loss = %d" % i)
    curves.feed("I1204 10:00:00.000000 1 solver.cpp:218] Iteration %d (1 iter/s, 1s/1 iters), loss = 1" % i)
curves.close()
print("done;", warnings)
"""


def test_a_writer_on_a_full_disk_never_stops_or_hangs_training(repo, tmp_path, mount_tmpfs):
    disk = mount_tmpfs("size=1m")
    script = CHILD.replace('open(sys.argv[3], "wb").write', "import contextlib\nwith contextlib.suppress(OSError): "
                           'open(sys.argv[3], "wb").write')
    out = subprocess.run([sys.executable, "-c", script, repo, str(disk), str(disk / "filler")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done; ['live curves in %s switched off, training goes on:" % disk in out.stdout
    assert "No space left on device" in out.stdout and "Traceback" not in out.stderr, (out.stdout, out.stderr)
