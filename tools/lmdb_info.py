#!/usr/bin/env python3
"""Inspect a Caffe LMDB: count, first keys, Datum shape, label histogram, and a PNG
contact sheet of records decoded back to RGB so you can see colours and labels are right."""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image, ImageDraw  # noqa: E402

from tinycaffe import data  # noqa: E402
from tinycaffe.caffe_env import CaffeNotFound  # noqa: E402

DEFAULT_KEYS = 5  # first keys printed
DEFAULT_SHEET_N = 64  # records on the contact sheet
CAPTION = 12  # pixels under each tile for its label


EXAMPLES = """examples:
  %(prog)s data/lmdb/val_lmdb --keys 3 --sheet val_sheet.png   record count, shapes, first keys, a contact sheet"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lmdb", metavar="LMDB", help="e.g. data/lmdb/val_lmdb")
    p.add_argument("--keys", type=int, default=DEFAULT_KEYS, help="first keys to print (default %d)" % DEFAULT_KEYS)
    p.add_argument("--sheet", default=None, help="write a contact sheet PNG here (default: none)")
    p.add_argument("--n", type=int, default=DEFAULT_SHEET_N,
                   help="records on the contact sheet (default %d)" % DEFAULT_SHEET_N)
    p.add_argument("--labels", default=None,
                   help="labels.txt to caption tiles with wnids (default: LMDB's sibling labels.txt if present)")
    return p


def contact_sheet(records, labels, path):
    cols = 8
    side = records[0][1].shape[0]
    rows = (len(records) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (side + 2), rows * (side + CAPTION + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (label, rgb) in enumerate(records):
        x, y = (n % cols) * (side + 2), (n // cols) * (side + CAPTION + 2)
        sheet.paste(Image.fromarray(rgb, "RGB"), (x, y))
        caption = labels[label][0] if labels and 0 <= label < len(labels) else str(label)
        draw.text((x + 1, y + side), caption, fill="black")
    tmp = path + ".tmp.png"
    sheet.save(tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    labels_path = args.labels or os.path.join(os.path.dirname(os.path.abspath(args.lmdb)), "labels.txt")
    try:
        labels = data.read_labels(labels_path) if (args.labels or os.path.isfile(labels_path)) else None
        count = data.lmdb_count(args.lmdb)
        histogram, keys, shapes, tiles = collections.Counter(), [], set(), []
        for key, datum in data.iter_lmdb(args.lmdb):
            histogram[datum.label] += 1
            shapes.add((datum.channels, datum.height, datum.width, datum.encoded))
            if len(keys) < args.keys:
                keys.append(key)
            if args.sheet and len(tiles) < args.n:
                tiles.append((datum.label, data.datum_to_rgb(datum)))
    except (data.DataError, CaffeNotFound, OSError) as exc:
        print("lmdb_info.py: error: %s" % exc, file=sys.stderr)
        return 1
    if not count:
        print("lmdb_info.py: error: %s is empty (no records): make_lmdb.py writes every split it lists" % args.lmdb,
              file=sys.stderr)
        return 1
    print("%s: %d records" % (args.lmdb, count))
    print("first keys: %s" % ", ".join(keys))
    for c, h, w, enc in sorted(shapes):
        print("datum: channels=%d height=%d width=%d encoded=%s" % (c, h, w, enc))
    print("labels: %d distinct, range %d..%d" % (len(histogram), min(histogram), max(histogram)))
    for label, n in sorted(histogram.items()):
        name = labels[label][0] if labels and 0 <= label < len(labels) else ""
        print("  %4d %-10s %d" % (label, name, n))
    if args.sheet and tiles:
        contact_sheet(tiles, labels, args.sheet)
        print("contact sheet: %s (%d records, RGB)" % (args.sheet, len(tiles)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
