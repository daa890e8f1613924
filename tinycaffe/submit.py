"""The scoreboard's submission file (SPEC section 3): one `test_N.JPEG wnid` line per test image,
every image exactly once, sorted by N, ending with a newline. Written atomically, validated first."""
import os
import re

from . import data

NAME_RE = re.compile(r"^test_(\d+)\.JPEG$")


class SubmissionError(Exception):
    pass


def name_of_key(key):
    """LMDB key `%08d_test_N.JPEG` -> `test_N.JPEG`."""
    return key.split("_", 1)[1]


def expected_names(test_lmdb):
    """Every image name in the test LMDB, from its keys."""
    env_names = [name_of_key(k) for k, _ in data.iter_lmdb(test_lmdb)]
    if not env_names:
        raise SubmissionError("%s: empty test LMDB" % test_lmdb)
    return env_names


def validate_lines(lines, names, wnids, path="submission"):
    """Problems as 'path:LINE: message' (empty when the file is good)."""
    problems, seen = [], {}
    wanted, known = set(names), set(wnids)
    last = -1
    for no, line in enumerate(lines, 1):
        parts = line.rstrip("\n").split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            problems.append("%s:%d: malformed line %r (expected 'test_N.JPEG wnid')" % (path, no, line.rstrip("\n")))
            continue
        name, wnid = parts
        m = NAME_RE.match(name)
        if not m:
            problems.append("%s:%d: '%s' is not a test image name (expected test_N.JPEG)" % (path, no, name))
            continue
        if name in seen:
            problems.append("%s:%d: %s again (first on line %d)" % (path, no, name, seen[name]))
            continue
        seen[name] = no
        if name not in wanted:
            problems.append("%s:%d: %s is not in the test set" % (path, no, name))
        if wnid not in known:
            problems.append("%s:%d: unknown wnid %s (not in labels.txt)" % (path, no, wnid))
        if int(m.group(1)) < last:
            problems.append("%s:%d: %s out of order (lines must be sorted by N)" % (path, no, name))
        last = int(m.group(1))
    missing = sorted(wanted - set(seen), key=lambda n: int(NAME_RE.match(n).group(1)))
    if missing:
        problems.append("%s:%d: %d test images missing, first %s" % (path, len(lines) + 1, len(missing), missing[0]))
    if len(lines) != len(names) and not missing:
        problems.append("%s: %d lines but the test set has %d images" % (path, len(lines), len(names)))
    return problems


def validate_file(path, names, wnids):
    with open(path) as f:
        text = f.read()
    problems = validate_lines(text.splitlines(True), names, wnids, path)
    if text and not text.endswith("\n"):
        problems.append("%s: no newline at the end" % path)
    return problems


def write(path, names, wnids_predicted, all_wnids):
    """Write sorted lines to a temporary name, validate them, then rename into place."""
    order = sorted(range(len(names)), key=lambda i: int(NAME_RE.match(names[i]).group(1)))
    lines = ["%s %s\n" % (names[i], wnids_predicted[i]) for i in order]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    problems = validate_file(tmp, names, all_wnids)
    if problems:
        os.unlink(tmp)
        raise SubmissionError("the written file does not validate: " + problems[0])
    os.replace(tmp, path)
    return len(lines)
