"""Device selection shared by every tool: --gpu ID|cpu, the same flag and the same errors."""
import subprocess
import sys

import pytest

from tinycaffe import runs

TOOLS_WITH_GPU = {"tools/train.py": True, "tools/evaluate.py": False,
                  "tools/make_submission.py": False, "tools/visualize.py": False}


@pytest.mark.parametrize("value, flavour, gpus, expected", [
    ("auto", "cpu", 0, None),
    ("auto", "cuda", 0, None),     # a CUDA build on a machine without a driver trains on the CPU
    ("auto", "cuda", 2, "0"),
    ("cpu", "cuda", 2, None),
    ("1", "cuda", 2, "1"),
    ("0,1", "cuda", 2, "0,1"),
    ("all", "cuda", 4, "all"),
])
def test_parse_gpu_accepts(value, flavour, gpus, expected):
    assert runs.parse_gpu(value, flavour, gpus=gpus) == expected


@pytest.mark.parametrize("value, flavour, gpus, several, message", [
    ("gpu0", "cuda", 1, True, "--gpu 'gpu0': expected an id (0), a list (0,1), all, or cpu"),
    ("0", "cpu", 1, True, "--gpu 0 asked for a GPU, but this Caffe is a CPU-only build"),
    ("0", "cuda", 0, True, "--gpu 0: CUDA sees no GPU here (no nvidia-smi, no GPU in `nvidia-smi -L`, or "
                           "CUDA_VISIBLE_DEVICES="),
    ("2", "cuda", 2, True, "--gpu 2: this machine has 2 GPUs (ids 0-1)"),
    ("0,1", "cuda", 2, False, "--gpu 0,1: this tool runs on one GPU; pass a single id (0) or cpu"),
    ("all", "cuda", 2, False, "--gpu all: this tool runs on one GPU"),
])
def test_parse_gpu_refuses_with_one_line(value, flavour, gpus, several, message):
    with pytest.raises(runs.RunError) as err:
        runs.parse_gpu(value, flavour, several=several, gpus=gpus)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("tool", sorted(TOOLS_WITH_GPU))
def test_every_device_tool_has_the_same_gpu_flag(repo, tool):
    out = subprocess.run([sys.executable, tool, "--help"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    flat = " ".join(out.stdout.split())
    several = ", a list (0,1), all," if TOOLS_WITH_GPU[tool] else ""
    assert ("--gpu GPU GPU id%s or cpu (default auto: GPU 0 on a CUDA build with a GPU, else cpu)" % several) in flat


@pytest.mark.parametrize("tool", ["tools/evaluate.py", "tools/make_submission.py", "tools/visualize.py"])
def test_device_tools_refuse_a_gpu_on_the_cpu_build(repo, tool, tmp_path):
    if runs.caffe_flavour() != "cpu":
        pytest.skip("the active Caffe is a CUDA build; this checks the CPU build's refusal")
    args = [sys.executable, tool, "--gpu", "0", "--out", str(tmp_path / "out")]
    if tool == "tools/make_submission.py":
        args += ["--model", "prototxt/tiny/deploy.prototxt", str(tmp_path / "w.caffemodel")]
    else:
        args += ["--deploy", "prototxt/tiny/deploy.prototxt", "--weights", str(tmp_path / "w.caffemodel")]
    out = subprocess.run(args, cwd=repo, capture_output=True, text=True)
    assert out.returncode != 0
    assert "--gpu 0 asked for a GPU, but this Caffe is a CPU-only build" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
