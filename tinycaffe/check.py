"""Check hand-edited prototxt before a GPU hour is wasted.

1. Parse with Caffe's caffe_pb2 + text_format: a typo is reported as FILE:LINE:COL.
2. Build the net with real Caffe on CPU, in a child process: Caffe reports shape
   errors through glog CHECKs that abort the process, so the child's log is read
   back and the failure is reported with the layer it happened in.
   Data layers are swapped for DummyData of the same shape, so no LMDB is needed.
3. Print a table per layer: output shape, parameters, forward MFLOPs per image.
4. For a train_val/deploy pair in one folder: layers whose names or parameter
   shapes differ (weights would not transfer).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

from google.protobuf import text_format

from . import fit, prechecks
from .caffe_env import caffe_pb2
from .files import PrototxtError, parse_prototxt

DATA_LAYER_TYPES = ("Data", "ImageData", "HDF5Data", "WindowData")
SOLVER_FIELDS = re.compile(r"^\s*(base_lr|lr_policy|net|train_net|test_net|max_iter|snapshot_prefix)\s*:", re.M)


class CheckError(Exception):
    pass


# ---------------------------------------------------------------- parsing
V1_LAYERS = re.compile(r"^\s*layers\s*\{", re.M)  # Caffe's V1 format: `layers { type: DATA ... }`


def parse(path):
    """-> ("net" | "solver", message). Raises CheckError naming FILE:LINE:COL. A V1-format net is
    upgraded first, as Caffe does when it reads one (its upgrade_net_proto_text tool)."""
    try:
        with open(path) as f:
            text = f.read()
        pb2 = caffe_pb2()
        kind = "solver" if SOLVER_FIELDS.search(text) and not re.search(r"^\s*layers?\s*\{", text, re.M) else "net"
        if kind == "net" and V1_LAYERS.search(text):
            text = upgraded_v1(path)
        message = parse_prototxt(path, text, pb2.SolverParameter() if kind == "solver" else pb2.NetParameter())
    except OSError as exc:
        raise CheckError("%s: cannot read (%s)" % (path, exc.strerror)) from exc
    except PrototxtError as exc:
        raise CheckError(str(exc)) from exc
    return kind, message


def upgraded_v1(path):
    """The text of a V1 net as Caffe's upgrade_net_proto_text writes it (the upgrade Caffe runs on
    reading one); CheckError with Caffe's message when it cannot be upgraded."""
    from .caffe_env import caffe_binary
    tool = os.path.join(os.path.dirname(caffe_binary()), "upgrade_net_proto_text")
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "upgraded.prototxt")
        proc = subprocess.run([tool, path, target], capture_output=True, text=True,
                              env=dict(os.environ, GLOG_logtostderr="1"))
        if proc.returncode != 0 or not os.path.isfile(target):
            _, message = explain_abort(proc.stderr)
            raise CheckError("%s: a V1-format net Caffe cannot upgrade: %s" % (path, message))
        with open(target) as f:
            return f.read()


def is_train_val(net):
    return any(layer.type in DATA_LAYER_TYPES for layer in net.layer)


# ---------------------------------------------------------------- building (child process)
def layer_input_shape(layer, base, fallback=None):
    """(C, H, W) a data layer's images have, and where that comes from: its LMDB's first record, its
    mean file, else fallback (a deploy net's Input, --input-shape); (None, None) when unknown."""
    shape = prechecks.readable_image_shape(fit.resolved_source(layer, base))
    if shape:
        return tuple(shape), None
    mean = fit.absolute(layer.transform_param.mean_file, base)
    if mean and os.path.isfile(mean):
        try:
            from . import data
            return tuple(data.read_mean(mean).shape), "its mean file %s" % mean
        except Exception:
            pass
    if fallback:
        return tuple(fallback[0]), fallback[1]
    return None, None


def with_dummy_data(net, warnings, base=None, fallback=None):
    """A copy of net whose Data layers are DummyData of the shape they would produce (relative
    sources read from base, default the current directory): the LMDB's, else the mean file's,
    else fallback's ((C, H, W), where it comes from); CheckError when none says."""
    pb2 = caffe_pb2()
    out = pb2.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.type not in DATA_LAYER_TYPES:
            continue
        source = fit.resolved_source(layer, base or os.getcwd())
        batch = layer.data_param.batch_size or layer.image_data_param.batch_size or 1
        shape, said = layer_input_shape(layer, base or os.getcwd(), fallback)
        if shape is None:
            raise CheckError("layer '%s': the input shape is unknown" % layer.name)
        if said:
            warnings.append("layer '%s': source %s is not readable; images taken as %s, from %s"
                            % (layer.name, source, "x".join(map(str, shape)), said))
        c, h, w = shape
        crop = layer.transform_param.crop_size
        if crop:
            h = w = crop
        tops = list(layer.top)
        include = list(layer.include)
        name = layer.name
        layer.Clear()
        layer.name, layer.type = name, "DummyData"
        layer.top.extend(tops)
        layer.include.extend(include)
        p = layer.dummy_data_param
        p.shape.add().dim.extend([batch, c, h, w])
        p.data_filler.add(type="gaussian", std=1.0)
        if len(tops) > 1:
            p.shape.add().dim.extend([batch])
            p.data_filler.add(type="constant", value=0)
    return out


def stage_sets(net):
    """The stage sets the TEST phase is built with: each distinct `stage` list of a TEST include rule
    (BVLC's mnist_autoencoder tests on "test-on-train" and "test-on-test"), else one without."""
    found = []
    for layer in net.layer:
        for rule in layer.include:
            stages = tuple(rule.stage)
            if rule.phase == caffe_pb2().TEST and stages and stages not in found:
                found.append(stages)
    return found or [()]


def inspect_net(path, phase_name, fallback=None, stages=()):
    """Runs in the child: build the net, return a per-layer table (list of dicts)."""
    import caffe
    caffe.set_mode_cpu()
    _, net_param = parse(path)
    warnings = []
    patched = with_dummy_data(net_param, warnings, fit.base_for(path), fallback)
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text_format.MessageToString(patched))
    try:
        net = caffe.Net(f.name, getattr(caffe, phase_name), stages=list(stages))
    finally:
        os.unlink(f.name)
    batch = None
    rows = []
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type == "Split":  # inserted by Caffe for blobs with several consumers, not the user's
            continue
        tops = net.top_names[name]
        shapes = [list(net.blobs[t].data.shape) for t in tops]
        if batch is None and shapes and shapes[0]:
            batch = shapes[0][0] or 1
        params = [list(b.data.shape) for b in net.params[name]] if name in net.params else []
        rows.append({"name": name, "type": layer.type, "tops": shapes, "params": params,
                     "flops": layer_flops(layer.type, shapes, params)})
    return {"layers": rows, "warnings": warnings, "batch": batch or 1}


def layer_flops(kind, top_shapes, params):
    """Forward FLOPs per image (a multiply-add counts 2) for the layers that dominate."""
    if not params or not top_shapes:
        return 0
    out_per_image = 1
    for d in top_shapes[0][1:]:
        out_per_image *= d
    w = params[0]
    if kind in ("Convolution", "Deconvolution") and len(w) == 4:
        return 2 * out_per_image * w[1] * w[2] * w[3]
    if kind == "InnerProduct" and len(w) == 2:
        return 2 * w[0] * w[1]
    return 0


FATAL = re.compile(r"^F\d{4,8} [\d:.]+\s+\d+ ([\w.]+:\d+)\] (.*)$")  # glog: Fyyyymmdd hh:mm:ss.us tid file:line] msg
CREATING = re.compile(r"Creating [Ll]ayer (\S+)")


def explain_abort(stderr):
    """From a Caffe child's log: (layer name or None, the CHECK message)."""
    layer, message = None, None
    for line in stderr.splitlines():
        m = CREATING.search(line)
        if m:
            layer = m.group(1)
        m = FATAL.match(line)
        if m:
            message = m.group(2).strip()
            break
    if message is None:
        tail = [line for line in stderr.strip().splitlines() if line.strip()]
        message = tail[-1] if tail else "Caffe exited without a message"
    return layer, message


def build_in_child(path, phase_name, fallback=None, stages=()):
    """Build in a fresh interpreter; a glog abort there becomes a CheckError here."""
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    proc = subprocess.run([sys.executable, "-m", "tinycaffe.check", "--inspect", path, phase_name,
                           json.dumps(fallback), json.dumps(list(stages))], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        layer, message = explain_abort(proc.stderr)
        where = "layer '%s'" % layer if layer else "net"
        raise CheckError("%s (%s): %s: %s" % (path, phase_label(phase_name, stages), where, message))
    marker = proc.stdout.rfind("\n@@JSON@@")
    return json.loads(proc.stdout[marker + len("\n@@JSON@@"):])


# ---------------------------------------------------------------- reports
def format_table(path, phase, info):
    lines = ["%s [%s, batch %d]" % (path, phase, info["batch"]),
             "  %-18s %-16s %-22s %12s %10s" % ("layer", "type", "output", "params", "MFLOPs/img")]
    total_params = total_flops = 0
    for row in info["layers"]:
        n_params = sum(prod(p) for p in row["params"])
        total_params += n_params
        total_flops += row["flops"]
        out = " ".join("x".join(str(d) for d in s) for s in row["tops"])
        lines.append("  %-18s %-16s %-22s %12s %10s" % (row["name"], row["type"], out,
                                                       "{:,}".format(n_params) if n_params else "",
                                                       "%.1f" % (row["flops"] / 1e6) if row["flops"] else ""))
    lines.append("  total: {:,} parameters, {:.1f} MFLOPs per image (forward)".format(total_params, total_flops / 1e6))
    return "\n".join(lines), total_params, total_flops


def prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def compare_pair(train_val_path, tv_info, deploy_path, dp_info):
    """Problems where weights of train_val would not load into deploy."""
    tv = {r["name"]: r["params"] for r in tv_info["layers"] if r["params"]}
    dp = {r["name"]: r["params"] for r in dp_info["layers"] if r["params"]}
    problems = []  # train-only layers (GoogLeNet's auxiliary classifiers) are normal: Caffe loads the pair
    for name in sorted(set(dp) - set(tv)):
        problems.append("%s: layer '%s' has parameters but no layer of that name in %s (its weights stay random)"
                        % (deploy_path, name, train_val_path))
    for name in sorted(set(tv) & set(dp)):
        if tv[name] != dp[name]:
            problems.append("%s: layer '%s' parameter shapes %s differ from %s's %s"
                            % (deploy_path, name, dp[name], train_val_path, tv[name]))
    return problems


def train_only_layers(tv_info, dp_info):
    """Layers with parameters that the train_val net has and the deploy net does not."""
    deploy = {r["name"] for r in dp_info["layers"] if r["params"]}
    return sorted(r["name"] for r in tv_info["layers"] if r["params"] and r["name"] not in deploy)


def check_solver(path, message):
    """The solver's summary line, and the problems a run's pre-check finds in it and in the net it
    names (its data, fit and augmentation: the same list, prechecks.all_problems)."""
    problems, _, _ = prechecks.all_problems(message, path, fit.base_for(path), need_data=False)
    steps = ("stepvalue %s, gamma %g" % (",".join(map(str, message.stepvalue)), message.gamma)
             if message.lr_policy == "multistep" else "to min_lr %g" % getattr(message, "min_lr", 0)
             if message.lr_policy == "cosine" else "stepsize %d, gamma %g" % (message.stepsize, message.gamma))
    warmup = getattr(message, "warmup_iter", 0)
    summary = ("%s: solver %s, base_lr %g, lr_policy %s (%s%s), max_iter %d, %s mode"
               % (path, message.type or "SGD", message.base_lr, message.lr_policy, steps,
                  ", warmup %d" % warmup if warmup else "", message.max_iter,
                  "GPU" if message.solver_mode == 1 else "CPU"))
    return summary, problems


def input_fallback(path, parsed, input_shape=None):
    """What a net's data layers are taken to produce when their LMDB cannot be read: --input-shape,
    else the Input of a deploy net checked alongside in the same folder or of deploy.prototxt
    beside it -> ((C, H, W), where it comes from) or None."""
    if input_shape:
        return list(input_shape), "--input-shape"
    folder = os.path.dirname(os.path.abspath(path))
    candidates = [(p, m) for p, (kind, m) in ((p, v) for p, v in parsed.items() if not isinstance(v, CheckError))
                  if kind == "net" and not is_train_val(m) and os.path.dirname(os.path.abspath(p)) == folder]
    beside = os.path.join(folder, "deploy.prototxt")
    if not candidates and os.path.isfile(beside):
        try:
            candidates = [(beside, parse(beside)[1])]
        except CheckError:
            candidates = []
    for deploy, net in candidates:
        for layer in net.layer:
            if layer.type == "Input" and layer.input_param.shape and len(layer.input_param.shape[0].dim) == 4:
                return list(layer.input_param.shape[0].dim[1:]), "the Input of %s" % deploy
        if len(net.input_shape) and len(net.input_shape[0].dim) == 4:
            return list(net.input_shape[0].dim[1:]), "the input of %s" % deploy
    return None


def shapes_known(net, base, fallback):
    """Whether every data layer's input shape can be told (else the net is not built: no table)."""
    return all(layer_input_shape(layer, base, fallback)[0] for layer in net.layer if layer.type in DATA_LAYER_TYPES)


def check_files(paths, out=print, lmdb_dir=None, input_shape=None):
    """Check every file; print tables and problems; return the list of problems."""
    problems, nets, parsed = [], {}, {}
    for path in paths:  # all first: a net's input shape may come from a deploy net named after it
        try:
            parsed[path] = parse(path)
        except CheckError as exc:
            parsed[path] = exc
    for path in paths:
        if isinstance(parsed[path], CheckError):
            problems.append(str(parsed[path]))
            continue
        kind, message = parsed[path]
        if kind == "solver":
            summary, found = check_solver(path, message)
            out(summary)
            problems.extend(found)
            continue
        problems.extend(prechecks.net_problems(message, path, fit.base_for(path), need_data=False, lmdb_dir=lmdb_dir))
        fallback = input_fallback(path, parsed, input_shape)
        if not shapes_known(message, fit.base_for(path), fallback):
            out("%s: input shapes unknown (no readable LMDB or mean file, no deploy net beside it): not built, no "
                "totals; give --input-shape C,H,W, or check it with its deploy net" % path)
            continue
        builds = ([("TRAIN", ())] if is_train_val(message) else []) + [("TEST", s) for s in stage_sets(message)]
        notes = []
        for phase, stages in builds:
            try:
                info = build_in_child(path, phase, fallback, stages)
            except CheckError as exc:
                problems.append(str(exc))
                break
            table, _, _ = format_table(path, phase_label(phase, stages), info)
            out(table)
            notes.extend(w for w in info["warnings"] if w not in notes)
            if phase == "TEST" and path not in nets:
                nets[path] = (is_train_val(message), info)
        for note in notes:
            out("  note: " + note)
    # a net checked on its own and through its solver (which names it by its absolute path): said once
    cwd, seen, unique = os.getcwd() + os.sep, set(), []
    for problem in problems:
        if problem.replace(cwd, "") not in seen:
            seen.add(problem.replace(cwd, ""))
            unique.append(problem)
    problems = unique
    by_dir = {}
    for path, (tv, info) in nets.items():
        by_dir.setdefault(os.path.dirname(os.path.abspath(path)), {})["train_val" if tv else "deploy"] = (path, info)
    for pair in by_dir.values():
        if "train_val" in pair and "deploy" in pair:
            found = compare_pair(pair["train_val"][0], pair["train_val"][1], pair["deploy"][0], pair["deploy"][1])
            train_only = train_only_layers(pair["train_val"][1], pair["deploy"][1])
            if train_only:
                out("  note: layers with parameters in %s only (not used by the deploy net): %s"
                    % (pair["train_val"][0], ", ".join(train_only)))
            if not found:
                out("%s and %s: same layer names and parameter shapes" % (pair["train_val"][0], pair["deploy"][0]))
            problems.extend(found)
    return problems


def phase_label(phase, stages):
    return phase + "".join(", stage %s" % s for s in stages)


def _child_main(argv):
    path, phase, fallback, stages = argv
    info = inspect_net(path, phase, json.loads(fallback), json.loads(stages))
    sys.stdout.write("\n@@JSON@@" + json.dumps(info))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--inspect":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit("usage: python -m tinycaffe.check --inspect FILE PHASE (internal; use tools/gen_prototxt.py --check)")
