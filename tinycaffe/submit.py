"""The scoreboard's submission file (SPEC section 3): one `test_N.JPEG wnid` line per test image,
every image exactly once, sorted by N, ending with a newline. Written atomically, validated first."""
import json
import os
import re

from . import data, fit

NAME_RE = re.compile(r"^test_(\d+)\.JPEG$")


class SubmissionError(Exception):
    pass


def name_of_key(key):
    """LMDB key `%08d_test_N.JPEG` -> `test_N.JPEG`."""
    return key.split("_", 1)[1]


def lmdb_names(test_lmdb):
    """The image names in the test LMDB, from its keys."""
    return [name_of_key(k) for k, _ in data.iter_lmdb(test_lmdb)]


def expected_names(test_lmdb):
    """Every image of the test split as make_lmdb.py listed it (its manifest.json beside the LMDB):
    the LMDB's records plus the files it skipped (--skip-bad), sorted by N. A skipped image is
    still on the scoreboard's list, so a file without it is incomplete."""
    manifest_path = os.path.join(fit.dataset_dir(test_lmdb), "manifest.json")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except OSError:
        raise SubmissionError("%s: missing (make_lmdb.py writes it beside the LMDBs; it lists the whole test split, "
                              "skipped images included)" % manifest_path) from None
    except ValueError as exc:
        raise SubmissionError("%s: not JSON (%s)" % (manifest_path, exc)) from exc
    names = lmdb_names(test_lmdb)
    test = manifest.get("splits", {}).get("test")
    if test is None:
        raise SubmissionError("%s: no test split (make_lmdb.py was run with --splits without test)" % manifest_path)
    if test.get("count") != len(names):
        raise SubmissionError("%s has %d records but %s says %s: LMDB and manifest come from different runs"
                              % (test_lmdb, len(names), manifest_path, test.get("count")))
    skipped = [os.path.basename(s["file"]) for s in manifest.get("skipped", []) if s.get("split") == "test"]
    everything = set(names) | set(skipped)
    if not everything:
        raise SubmissionError("%s: empty test LMDB" % test_lmdb)
    return sorted(everything, key=_number)


def missing_names(expected, test_lmdb):
    """The expected names that have no record in the LMDB, sorted by N."""
    present = set(lmdb_names(test_lmdb))
    return [n for n in expected if n not in present]


def _number(name):
    m = NAME_RE.match(name)
    return int(m.group(1)) if m else -1


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
    missing = sorted(wanted - set(seen), key=_number)
    if missing:
        problems.append("%s: %d test images missing" % (path, len(missing)))
        problems.extend("%s: missing %s" % (path, name) for name in missing)
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
    order = sorted(range(len(names)), key=lambda i: _number(names[i]))
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
