"""tiny-imagenet-200/ -> Caffe LMDBs (train/val/test), mean.binaryproto, labels.txt, manifest.json.

The contract is SPEC sections 1-3: Datums of raw uint8 BGR CxHxW, label = index
of the wnid in the *sorted* wnid list, zero-padded keys whose byte order is the
intended read order. Worker processes decode the images and write their own
chunks (LMDB serialises their write transactions); everything is built in a temporary sibling of OUT_DIR and renamed into
place only when complete, so an interrupted run never leaves a half LMDB there.
"""
import glob
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import struct
import time
from dataclasses import dataclass, field

import lmdb
import numpy as np
from PIL import Image

from . import __version__, devices
from .caffe_env import caffe_pb2
from .files import atomic_open, write_text

# ---------------------------------------------------------------- defaults
DEFAULT_SEED = 0  # train shuffle seed
DEFAULT_SIZE = 64  # output side; Tiny ImageNet images are already 64x64
DEFAULT_SPLITS = ("train", "val", "test")  # what to convert
RESIZE_FILTER = "BICUBIC"  # Pillow filter for the rare image of another size
TEST_LABEL = -1  # test images are unlabeled; -1 is never a class index
KEY_FORMAT = "%08d_%s"  # position + file name: byte order = read order, name recoverable
COMMIT_EVERY = 1000  # records per LMDB transaction
INITIAL_MAP_SIZE = 64 << 20  # bytes; doubled on MDB_MAP_FULL, so no fixed 1 TB map
CHUNK = 64  # images per task sent to a decode worker
# Pixels per dot product in pixel_stats: OpenBLAS runs a dot product of more than 10,000
# elements on its own threads, which in two decode workers on two cores fight each
# other (make_lmdb ran 4x slower); below that it stays on the calling thread.
DOT_BLOCK = 8192

WNID_RE = re.compile(r"^n\d{8}$")


class DataError(Exception):
    """Bad input: the message names the file (and line) and what was expected."""


class BadImage(DataError):
    pass


@dataclass
class Record:
    path: str  # absolute path of the JPEG
    name: str  # file name (what the key and the submission carry)
    label: int


@dataclass
class SplitResult:
    count: int = 0
    resized: int = 0
    modes: dict = field(default_factory=dict)  # source image mode -> count (L, CMYK, P, ...)
    skipped: list = field(default_factory=list)  # {"file", "reason"}
    per_class: dict = field(default_factory=dict)  # class index -> count
    token_sum: int = 0  # sum of file_token() of every source file, mod 2^64
    seconds: float = 0.0


# ---------------------------------------------------------------- reading the layout
def _require_file(path, what):
    if not os.path.isfile(path):
        raise DataError("%s: missing (expected %s)" % (path, what))


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise DataError("%s: missing directory (expected %s)" % (path, what))


def read_wnids(data_dir):
    """The class list from wnids.txt (never words.txt), validated; sorted order = class index."""
    path = os.path.join(data_dir, "wnids.txt")
    _require_file(path, "one wnid per line, e.g. n01443537")
    wnids = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            wnid = line.strip()
            if not wnid:
                continue
            if not WNID_RE.match(wnid):
                raise DataError("%s:%d: '%s' is not a wnid (expected n + 8 digits)" % (path, lineno, wnid))
            if wnid in wnids:
                raise DataError("%s:%d: duplicate wnid %s" % (path, lineno, wnid))
            wnids.append(wnid)
    if not wnids:
        raise DataError("%s: empty (expected one wnid per line)" % path)
    return sorted(wnids)


def read_words(data_dir, wnids):
    """wnid -> words for our classes only (words.txt lists ~82,000 synsets)."""
    path = os.path.join(data_dir, "words.txt")
    _require_file(path, "wnid<TAB>words lines")
    wanted, words = set(wnids), {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            wnid, _, text = line.rstrip("\n").partition("\t")
            if wnid in wanted:
                words[wnid] = text.strip()
    return words


def _check_name(name, path, lineno, prefix):
    if "/" in name or "\\" in name or ".." in name or not name.startswith(prefix):
        raise DataError("%s:%d: bad file name '%s' (expected a plain %s*.JPEG name)" % (path, lineno, name, prefix))


def _numbered(names, prefix, where):
    """Sort file names like prefix_N.JPEG by N (test_2 before test_10)."""
    start, keyed = len(prefix), []
    for name in names:
        number = name[start:-5]
        if not (name.startswith(prefix) and name.endswith(".JPEG") and number.isdigit() and number.isascii()):
            raise DataError("%s: unexpected file '%s' (expected %sN.JPEG)" % (where, name, prefix))
        keyed.append((int(number), name))
    return [name for _, name in sorted(keyed)]


def list_train(data_dir, wnids, seed):
    records = []
    for label, wnid in enumerate(wnids):
        img_dir = os.path.join(data_dir, "train", wnid, "images")
        _require_dir(img_dir, "the train images of %s" % wnid)
        for name in _numbered(os.listdir(img_dir), wnid + "_", img_dir):
            records.append(Record(img_dir + os.sep + name, name, label))
    random.Random(seed).shuffle(records)
    return records


def list_val(data_dir, wnids):
    path = os.path.join(data_dir, "val", "val_annotations.txt")
    _require_file(path, "filename<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1 lines")
    img_dir = os.path.join(data_dir, "val", "images")
    _require_dir(img_dir, "the val images")
    index = {w: i for i, w in enumerate(wnids)}
    records, seen = [], set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 6:
                raise DataError("%s:%d: %d columns, expected 6 (filename wnid x0 y0 x1 y1)" % (path, lineno, len(cols)))
            name, wnid = cols[0], cols[1]
            _check_name(name, path, lineno, "val_")
            if wnid not in index:
                raise DataError("%s:%d: unknown wnid %s (not in wnids.txt)" % (path, lineno, wnid))
            if name in seen:
                raise DataError("%s:%d: %s listed twice" % (path, lineno, name))
            if not os.path.isfile(os.path.join(img_dir, name)):
                raise DataError("%s:%d: %s does not exist in %s" % (path, lineno, name, img_dir))
            seen.add(name)
            records.append(Record(os.path.join(img_dir, name), name, index[wnid]))
    return records


def list_test(data_dir):
    img_dir = os.path.join(data_dir, "test", "images")
    _require_dir(img_dir, "the test images")
    return [Record(os.path.join(img_dir, name), name, TEST_LABEL)
            for name in _numbered(os.listdir(img_dir), "test_", img_dir)]


# ---------------------------------------------------------------- decoding (in workers)
# What the fast path accepts before the first scan: one frame header of the Huffman kinds
# libjpeg decodes (baseline, extended, progressive); tables (DQT, DHT, DRI) and comments, which
# libjpeg checks as Pillow does; and three metadata segments Pillow's parser reads, each at
# least as long as its fixed part so that parser cannot fail on it. Any other segment (Adobe,
# JFXX, XMP, MPF, Photoshop, ...) sends the file through Image.open.
_JPEG_FRAMES = frozenset((0xC0, 0xC1, 0xC2))
_JPEG_TABLES = frozenset((0xDB, 0xC4, 0xDD, 0xFE))
_JPEG_METADATA = {0xE0: (b"JFIF\0", 14), 0xE1: (b"Exif\0\0", 6), 0xE2: (b"ICC_PROFILE\0", 14)}


def jpeg_frame(raw):
    """(width, height, components) of a plain 8-bit JPEG, read from its markers up to the first
    scan as libjpeg reads them; None for anything else (another format, fill bytes or junk
    between markers, a second frame, 12-bit, arithmetic coding, a cut-off header, a metadata
    segment other than a complete JFIF, Exif or ICC one)."""
    if raw[:2] != b"\xff\xd8":
        return None
    frame, pos, end = None, 2, len(raw)
    while pos + 4 <= end and raw[pos] == 0xFF:
        marker = raw[pos + 1]
        if marker == 0xDA:  # start of scan: the header is complete
            return frame
        length = struct.unpack_from(">H", raw, pos + 2)[0]  # counts its own two bytes
        if length < 2 or pos + 2 + length > end:
            return None
        if marker in _JPEG_FRAMES:
            if frame is not None or length < 8 or raw[pos + 4] != 8:
                return None
            height, width, components = struct.unpack_from(">HHB", raw, pos + 5)
            if length != 8 + 3 * components:
                return None
            frame = (width, height, components)
        elif marker in _JPEG_METADATA:
            tag, fixed = _JPEG_METADATA[marker]
            if length - 2 < fixed or raw[pos + 4:pos + 4 + len(tag)] != tag:
                return None
        elif marker not in _JPEG_TABLES:
            return None
        pos += 2 + length
    return None


def _decode_plain_jpeg(raw, size):
    """A plain size x size JPEG through Pillow's JPEG decoder directly: (pixels, mode), or None.

    Image.open would parse the header in Python first (~25 us of a 64x64 image's ~75). The
    decoder gets the whole file from its first byte with the arguments Image.open's tile
    gives it, so the pixels are the same; the frame's size, checked here, is the size
    libjpeg writes, so the image Pillow allocates fits it. Anything irregular returns None
    and goes through Image.open, which also names the problem.
    """
    frame = jpeg_frame(raw)
    if frame is None or frame[:2] != (size, size) or frame[2] not in (1, 3):
        return None
    mode = "RGB" if frame[2] == 3 else "L"
    try:
        return np.asarray(Image.frombytes(mode, (size, size), raw, "jpeg", mode, "")), mode
    except (OSError, ValueError):  # truncated or corrupt: Image.open's error says which
        return None


def read_file(path):
    """The whole file in one read(): Pillow then parses it from memory, not with ~40 small reads."""
    with open(path, "rb", buffering=0) as f:
        return f.read()


def read_rgb(path, size, raw=None):
    """An image file (its bytes, if already read) -> (uint8 HxWx3 RGB array, source mode, resized?).

    Raises BadImage. The file is read with one read() and decoded from memory: a plain JPEG
    of the wanted size straight by Pillow's JPEG decoder, anything else through Image.open.
    """
    try:
        if raw is None:
            raw = read_file(path)
        plain = _decode_plain_jpeg(raw, size)
        if plain is not None:
            pixels, mode = plain
            return _three_channels(pixels), mode, False
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # Pillow decodes lazily: truncation shows up here
            mode = im.mode
            img = im if mode in ("RGB", "L") else im.convert("RGB")  # CMYK, P, RGBA, ... -> RGB
            resized = img.size != (size, size)
            if resized:
                img = img.resize((size, size), getattr(Image.Resampling, RESIZE_FILTER))
            pixels = np.asarray(img)
    except Image.UnidentifiedImageError as exc:  # Pillow would name the BytesIO: name the file
        raise BadImage("%s: cannot decode (cannot identify image file %r)" % (path, path)) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage("%s: cannot decode (%s)" % (path, exc)) from exc
    return _three_channels(pixels), mode, resized


def _three_channels(pixels):
    if pixels.ndim == 2:  # grayscale: the one plane replicated into R, G and B
        return np.broadcast_to(pixels[:, :, None], pixels.shape + (3,))
    return pixels


def bgr_chw(rgb_hwc, out=None):
    """RGB ...xHxWx3 -> Caffe's BGR ...x3xHxW, contiguous (one image or a stack of them; into out if given)."""
    bgr = np.moveaxis(rgb_hwc[..., ::-1], -1, -3)
    if out is None:
        return np.ascontiguousarray(bgr)
    np.copyto(out, bgr)
    return out


def decode_bgr_chw(path, size):
    """Image file -> (uint8 bytes BGR CxHxW, source mode, resized?). Raises BadImage."""
    pixels, mode, resized = read_rgb(path, size)
    return bgr_chw(pixels).tobytes(), mode, resized


def datum_bytes(chw, size, label):
    d = caffe_pb2().Datum(channels=3, height=size, width=size, data=chw, label=label, encoded=False)
    return d.SerializeToString()


# ---------------------------------------------------------------- writing
def map_size_for(count, size):
    """LMDB map bytes for count Datums of size x size: each value takes whole overflow pages
    (a 12 KiB Datum -> 4 pages of 4 KiB), plus a page of tree per record and slack. The
    writers still grow the map if LMDB ever says it is full."""
    value_pages = (3 * size * size + 64) // 4096 + 1
    return max(INITIAL_MAP_SIZE, (count * (value_pages + 1)) * 4096 + INITIAL_MAP_SIZE)


class LmdbWriter:
    """Buffered puts in one process. Several processes may each hold one on the same
    LMDB: LMDB serialises their write transactions. The map grows when full, and a
    process whose map was grown by another adopts the new size."""

    def __init__(self, path, map_size=INITIAL_MAP_SIZE):
        # sync=False: no fsync per commit; close() syncs once. A crash mid-run loses the
        # temp dir anyway, so per-commit durability buys nothing.
        self.env = lmdb.open(path, map_size=map_size, subdir=True, meminit=False, sync=False, metasync=False)
        self.pending = []

    def put(self, key, value):
        self.pending.append((key, value))
        if len(self.pending) >= COMMIT_EVERY:
            self.flush()

    def flush(self):
        while self.pending:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value)
                self.pending = []
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # another process grew it: adopt its size

    def close(self):
        self.flush()
        self.env.sync(True)
        self.env.close()


_WRITERS = {}  # lmdb path -> LmdbWriter of this process (a worker keeps one per split)


def _writer(path, map_size):
    if path not in _WRITERS:
        _WRITERS[path] = LmdbWriter(path, map_size)
    return _WRITERS[path]


def _close_writers():
    while _WRITERS:
        _WRITERS.popitem()[1].close()


_JOB = {}  # the split being written; set before the pool forks, so workers inherit it


def _stat_size(path):
    """The byte size the source fingerprint uses for a file that could not be read (-1: none)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


_BUFFERS = {}  # name -> uint8 array a worker reuses from range to range (no page faults per range)


def _worker_buffer(name, shape):
    buf = _BUFFERS.get(name)
    if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:]:
        buf = _BUFFERS[name] = np.empty(shape, np.uint8)
    return buf[:shape[0]]


def _convert_range(bounds):
    """Worker task: decode records[start:stop] of the current job and write them to its LMDB.

    Returns a small summary (counts, errors, pixel sum uint32 CxHxW); the pixels
    never cross a process boundary, and the parent does no per-image work. The range is
    decoded first and turned into Caffe's planes in one numpy pass, then written.
    """
    start, stop = bounds
    records, size, split = _JOB["records"], _JOB["size"], _JOB["split"]
    rgb = _worker_buffer("rgb", (stop - start, size, size, 3))
    decoded = []  # record indices, in the order of rgb's rows
    modes, per_class, errors, resized_count, tokens = {}, {}, [], 0, 0
    for i in range(start, stop):
        r = records[i]
        try:
            raw = read_file(r.path)
        except OSError as exc:  # a directory, no permission, gone: named as Image.open named it
            tokens += file_token(split, r.name, _stat_size(r.path))
            errors.append((i, "%s: cannot decode (%s)" % (r.path, exc)))
            continue
        tokens += file_token(split, r.name, len(raw))
        try:
            rgb[len(decoded)], mode, resized = read_rgb(r.path, size, raw)
        except BadImage as exc:
            errors.append((i, str(exc)))
            continue
        decoded.append(i)
        if mode != "RGB":
            modes[mode] = modes.get(mode, 0) + 1
        resized_count += resized
        per_class[r.label] = per_class.get(r.label, 0) + 1
    count = len(decoded)
    planes = bgr_chw(rgb[:count], _worker_buffer("planes", (count, 3, size, size))).reshape(count, 3 * size * size)
    writer = _writer(_JOB["lmdb_path"], _JOB["map_size"])
    for i, chw in zip(decoded, planes):
        r = records[i]
        writer.put((KEY_FORMAT % (i, r.name)).encode("ascii"), datum_bytes(chw.tobytes(), size, r.label))
    writer.flush()  # the range is committed before it is reported done
    pixel_sum, products = pixel_stats(planes, _JOB["products"])
    return {"n": stop - start, "errors": errors, "modes": modes, "per_class": per_class, "tokens": tokens,
            "resized": resized_count, "pixel_sum": pixel_sum.reshape(3, size, size), "pixel_products": products}


def pixel_stats(planes, products=True):
    """For images as rows of BGR CxHxW uint8: the per-position pixel sum (uint32) and, if asked,
    the colour products sum of x x^T over every pixel (3x3 float64; None if not asked).

    The products are exact: integer terms below 2^16, sums below 2^53 for any range of
    fewer than 2^20 images of 64x64. They are six dot products per block of at most
    DOT_BLOCK pixels (whole images side by side, or pieces of one large image), converted
    to float64 a block at a time so it stays in cache: about 12 us an image at 64x64,
    against 25 for one small matrix product per image.
    """
    pixel_sum = planes.sum(0, dtype=np.uint32)
    if not products:
        return pixel_sum, None
    per_image = planes.shape[1] // 3
    channels = planes.reshape(planes.shape[0], 3, per_image)
    images_per_block = max(1, DOT_BLOCK // max(per_image, 1))
    pixels_per_block = min(per_image, DOT_BLOCK)
    block = np.empty((3, images_per_block * pixels_per_block), np.float64)
    xxt = np.zeros((3, 3), np.float64)
    for first in range(0, channels.shape[0], images_per_block):
        group = channels[first:first + images_per_block]
        for start in range(0, per_image, pixels_per_block):
            part = group[:, :, start:start + pixels_per_block]
            used = block[:, :part.shape[0] * part.shape[2]]
            np.copyto(used.reshape(3, part.shape[0], part.shape[2]), part.transpose(1, 0, 2))
            for a in range(3):
                for b in range(a, 3):
                    xxt[a, b] += used[a] @ used[b]
    return pixel_sum, xxt + np.triu(xxt, 1).T  # the loops fill the upper triangle only


def _merge(total, part):
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def write_split(records, lmdb_path, size, workers, mean_sum=None, skip_bad=False, progress=None, split="",
                products=None):
    """Decode records and write them in `workers` processes; returns a SplitResult.

    Keys are fixed by the record order (a skipped image leaves a gap, never a
    reordering). mean_sum, if given, is a float64 CxHxW array the pixels are added to;
    products, if given, a float64 3x3 array the pixels' outer products x x^T are added to.
    """
    result = SplitResult()
    map_size = map_size_for(len(records), size)
    LmdbWriter(lmdb_path, map_size).close()  # create it, so an empty split is a valid LMDB too
    _JOB.update(records=records, lmdb_path=lmdb_path, map_size=map_size, size=size, split=split,
                products=products is not None)
    ranges = [(s, min(s + CHUNK, len(records))) for s in range(0, len(records), CHUNK)]
    t0 = time.time()
    # fork: the workers inherit _JOB (the record list) instead of receiving it pickled.
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_convert_range, ranges) if pool else map(_convert_range, ranges)
        for part in results:
            for i, error in part["errors"]:
                if not skip_bad:
                    raise BadImage(error)
                result.skipped.append({"file": records[i].path, "reason": error.split(": ", 1)[-1]})
            result.count += part["n"] - len(part["errors"])
            _merge(result.modes, part["modes"])
            _merge(result.per_class, part["per_class"])
            result.resized += part["resized"]
            result.token_sum = (result.token_sum + part["tokens"]) % (1 << 64)
            if mean_sum is not None:
                mean_sum += part["pixel_sum"]
            if products is not None:
                products += part["pixel_products"]
            if progress:
                progress(part["n"])
    finally:
        if pool:
            pool.terminate()
            pool.join()
        _close_writers()
        _JOB.clear()
    # Workers committed with sync=False; one fsync here makes everything they wrote durable.
    LmdbWriter(lmdb_path, map_size).close()
    result.seconds = time.time() - t0
    return result


def pca_basis(channel_sums, products, pixels):
    """The train pixels' colour PCA, for PCA lighting (AlexNet section 4.1), from sums over all pixels.

    eigval: the standard deviation along each principal axis (square roots of the 3x3
    covariance's eigenvalues), largest first, in pixel units; eigvec: the axes as the
    columns of a 3x3 matrix whose rows are the channels B, G, R (the Datums' order).
    """
    mean = np.asarray(channel_sums, np.float64) / pixels
    covariance = products / pixels - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0, None), vectors[:, order]
    vectors *= np.where(vectors.sum(0) < 0, -1.0, 1.0)  # a fixed sign: each axis points towards brighter
    return {"eigval": [round(float(v), 6) for v in np.sqrt(values)],
            "eigvec": [[round(float(v), 6) for v in row] for row in vectors],
            "pixels": int(pixels)}


def mean_blob_bytes(mean_chw):
    """BlobProto 1x3xHxW, the legacy num/channels/height/width fields, as compute_image_mean writes."""
    c, h, w = mean_chw.shape
    blob = caffe_pb2().BlobProto(num=1, channels=c, height=h, width=w)
    blob.data.extend(mean_chw.astype(np.float32).ravel().tolist())
    return blob.SerializeToString()


def read_mean(path):
    """mean.binaryproto -> float32 array CxHxW."""
    blob = caffe_pb2().BlobProto()
    with open(path, "rb") as f:
        blob.ParseFromString(f.read())
    if blob.HasField("shape"):
        dims = list(blob.shape.dim)
    else:
        dims = [blob.num, blob.channels, blob.height, blob.width]
    return np.asarray(blob.data, np.float32).reshape(dims[-3:])


def file_token(split, name, size):
    """64-bit hash of one source file's identity: split, file name and byte size."""
    return int.from_bytes(hashlib.blake2b(("%s/%s %d" % (split, name, size)).encode(), digest_size=8).digest(), "little")


def source_fingerprint(token_sums):
    """sha256 over each split's (count, sum of file tokens mod 2^64): the same files give
    the same fingerprint whatever the order they were read in (and whatever the seed)."""
    h = hashlib.sha256()
    for split in sorted(token_sums):
        count, total = token_sums[split]
        h.update(("%s %d %016x\n" % (split, count, total)).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- the whole job
def _remove_stale_temps(out_dir):
    """Temp siblings left by a killed run (their pid is gone) are garbage."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    for path in glob.glob(os.path.join(parent, ".%s.tmp-*" % base)) + glob.glob(os.path.join(parent, ".%s.old-*" % base)):
        try:
            pid = int(path.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _install(tmp_dir, out_dir, force):
    """Rename the finished tree into place; with --force the old one goes only now."""
    if os.path.exists(out_dir):
        if not force:
            raise DataError("%s: exists; use --force to replace it" % out_dir)
        parent, base = os.path.split(os.path.abspath(out_dir))
        old = os.path.join(parent, ".%s.old-%d" % (base, os.getpid()))
        os.rename(out_dir, old)
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp_dir, out_dir)


def default_workers():
    """Decode processes: one per CPU this process may run on (its affinity, not the core count)."""
    return devices.usable_cpus()


def make_lmdbs(data_dir, out_dir, workers=None, seed=DEFAULT_SEED, force=False, skip_bad=False,
               splits=DEFAULT_SPLITS, size=DEFAULT_SIZE, progress_factory=None):
    """Convert data_dir into out_dir; returns the manifest dict.

    progress_factory(split, total) returns a callable(n) or None.
    """
    workers = workers or default_workers()
    unknown = [s for s in splits if s not in DEFAULT_SPLITS]
    if unknown or not splits:
        raise DataError("--splits: unknown %s (valid: %s)" % (",".join(unknown) or "(none)", ",".join(DEFAULT_SPLITS)))
    if size < 1:
        raise DataError("--size must be >= 1, got %d" % size)
    if os.path.exists(out_dir) and not force:
        raise DataError("%s: exists; use --force to replace it (it is left untouched)" % out_dir)
    if not os.path.isdir(data_dir):
        raise DataError("%s: not a directory (expected the tiny-imagenet-200 folder)" % data_dir)

    t_start = time.time()
    wnids = read_wnids(data_dir)
    words = read_words(data_dir, wnids)
    listers = {"train": lambda: list_train(data_dir, wnids, seed), "val": lambda: list_val(data_dir, wnids),
               "test": lambda: list_test(data_dir)}
    records = {s: listers[s]() for s in DEFAULT_SPLITS if s in splits}  # all listed before any work

    _remove_stale_temps(out_dir)
    parent, base = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, ".%s.tmp-%d" % (base, os.getpid()))
    os.makedirs(tmp_dir)
    try:
        manifest = _convert(records, wnids, words, tmp_dir, workers, seed, skip_bad, size, splits,
                            progress_factory, data_dir)
        manifest["elapsed_seconds"] = round(time.time() - t_start, 3)
        total = sum(v["count"] for v in manifest["splits"].values())
        manifest["images_per_second"] = round(total / max(manifest["elapsed_seconds"], 1e-9), 1)
        write_text(os.path.join(tmp_dir, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
        _install(tmp_dir, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _convert(records, wnids, words, tmp_dir, workers, seed, skip_bad, size, splits, progress_factory, data_dir):
    manifest = {
        "tinycaffe_version": __version__,
        "source": os.path.abspath(data_dir),
        "source_fingerprint": None,  # filled in once every file has been read
        "seed": seed,
        "settings": {"size": size, "workers": workers, "splits": list(splits), "skip_bad": skip_bad,
                     "resize_filter": RESIZE_FILTER, "key_format": KEY_FORMAT, "test_label": TEST_LABEL,
                     "channel_order": "BGR", "layout": "CxHxW uint8, encoded=false"},
        "num_classes": len(wnids),
        "splits": {},
        "skipped": [],
    }
    write_text(os.path.join(tmp_dir, "labels.txt"), "".join("%s %s\n" % (w, words.get(w, "")) for w in wnids))
    missing_words = [w for w in wnids if w not in words]
    if missing_words:
        manifest["wnids_without_words"] = missing_words
    token_sums = {}
    for split, recs in records.items():
        mean_sum = np.zeros((3, size, size), np.float64) if split == "train" else None
        products = np.zeros((3, 3), np.float64) if split == "train" else None
        progress = progress_factory(split, len(recs)) if progress_factory else None
        res = write_split(recs, os.path.join(tmp_dir, split + "_lmdb"), size, workers, mean_sum, skip_bad, progress,
                          split, products)
        token_sums[split] = (len(recs), res.token_sum)
        manifest["splits"][split] = {
            "count": res.count, "resized": res.resized, "non_rgb_modes": res.modes,
            "skipped": len(res.skipped), "seconds": round(res.seconds, 3),
            "per_class": {wnids[k]: v for k, v in sorted(res.per_class.items())} if split != "test" else {},
        }
        manifest["skipped"].extend(dict(s, split=split) for s in res.skipped)
        if mean_sum is not None and res.count:
            mean = mean_sum / res.count
            with atomic_open(os.path.join(tmp_dir, "mean.binaryproto"), "wb") as f:
                f.write(mean_blob_bytes(mean))
            manifest["mean_bgr"] = [round(float(v), 4) for v in mean.reshape(3, -1).mean(1)]
            manifest["pca_bgr"] = pca_basis(mean_sum.reshape(3, -1).sum(1), products, res.count * size * size)
    manifest["source_fingerprint"] = source_fingerprint(token_sums)
    return manifest


# ---------------------------------------------------------------- reading back
def require_lmdb(path):
    if not os.path.isdir(path):
        raise DataError("%s: no such LMDB directory (expected make_lmdb.py's train_lmdb, val_lmdb or test_lmdb)"
                        % path)
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise DataError("%s: not an LMDB (no data.mdb)" % path)


def _open_readonly(path, **kwargs):
    require_lmdb(path)
    try:
        return lmdb.open(path, readonly=True, lock=False, **kwargs)
    except lmdb.Error as exc:
        raise DataError("%s: not a readable LMDB (%s)" % (path, str(exc).split(": ")[-1])) from exc


def iter_lmdb(path, limit=None):
    """Yield (key str, Datum) in key order, read-only."""
    env = _open_readonly(path, readahead=False)
    try:
        with env.begin() as txn:
            for n, (key, value) in enumerate(txn.cursor()):
                if limit is not None and n >= limit:
                    break
                datum = caffe_pb2().Datum()
                datum.ParseFromString(value)
                yield key.decode("ascii", "replace"), datum
    finally:
        env.close()


def lmdb_count(path):
    env = _open_readonly(path)
    try:
        return env.stat()["entries"]
    finally:
        env.close()


def datum_to_rgb(datum):
    """A raw BGR CxHxW Datum back to an HxWx3 RGB uint8 array (for eyes and tests)."""
    if datum.encoded:
        raise DataError("encoded Datum: this toolkit writes raw ones (encoded=false)")
    chw = np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
    return np.ascontiguousarray(chw[::-1].transpose(1, 2, 0))


def read_labels(path):
    """labels.txt -> list of (wnid, words), index = class."""
    _require_file(path, "labels.txt as written by make_lmdb.py")
    with open(path) as f:
        return [tuple((line.rstrip("\n").split(" ", 1) + [""])[:2]) for line in f if line.strip()]
