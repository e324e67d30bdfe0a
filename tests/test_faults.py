"""Faults that happen for real, on the real command line: ``kill -9`` of a real process in the
middle of training or of the activation-cache fill and ``fit --resume`` after it (the result
must equal an uninterrupted run's), two processes sharing one activation cache, damaged cache
shards, checkpoints and result files, and a full disk (a real 256 KiB tmpfs where mounting is
allowed, else skipped; the atomic writes are also tested with a simulated ENOSPC).

Every run is tiny (digits-sized data, small MLPs) and runs one intra-op thread. Killed and
concurrent runs are real processes (``python -m branchnet.cli``); uninterrupted references,
resumes and error checks run in this process (``branchnet.cli.main``) to save the ~8 s import.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from sklearn.datasets import load_digits

import branchnet.fileio as fileio
from branchnet import models
from branchnet.cache import ActivationCache, CachedActivations, CacheError
from branchnet.checkpoint import CheckpointError, load_checkpoint
from branchnet.fileio import read_json
from cli_helpers import run_cli, write_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
       "PYTHONWARNINGS": "default"}
# the CLI run as `python -m branchnet.cli`, with INFO logging on stderr (the cache's fill lines)
LOGGED_CLI = ("import logging, runpy, sys; logging.basicConfig(level=logging.INFO, "
              "format='%(name)s: %(message)s'); sys.argv[0] = 'branchnet'; "
              "runpy.run_module('branchnet.cli', run_name='__main__')")
WALL_CLOCK = {"seconds", "train_seconds", "update_seconds", "update_share",
              "epoch_seconds"}
HIERARCHY = {"round": ["0", "6", "8", "9"], "straight": ["1", "4", "7"], "curly": ["2", "3", "5"]}

MODEL = {"name": "fmodel", "seed": 0,
         "data": {"source": "digits", "val_fraction": 0.25, "test_fraction": 0.2,
                  "max_per_class": 60},
         "model": {"kind": "mlp", "sizes": ["auto", 32], "dropout": 0.1},
         "train": {"epochs": 14, "batch_size": 32, "lr": 0.01}, "progress": False}
VBRANCH = {"name": "fvb", "seed": 0,
           "data": {"source": "digits", "val_fraction": 0.2, "test_fraction": 0.3,
                    "max_per_class": 60},
           "model": {"kind": "mlp", "sizes": ["auto", 32], "branches": 3, "shared_frac": 0.5},
           "bagging": {"mode": "bootstrap", "frac": 1.0},
           "train": {"epochs": 14, "batch_size": 32, "lr": 0.01}, "progress": False}
PLASTIC = {"name": "fpl", "seed": 0, "task": "sparse",
           "data": {"source": "digits", "val_fraction": 0.2, "test_fraction": 0.3,
                    "max_per_class": 60},
           "model": {"kind": "mlp", "sizes": ["auto", 40]},
           "sparsity": {"rule": "rigl", "density": 0.2, "distribution": "uniform",
                        "delta_t": 3, "t_end": 0.75},
           "train": {"epochs": 14, "batch_size": 32, "lr": 0.01, "optimizer": "adam"},
           "progress": False}
CONFIGS = {"model": MODEL, "vbranch": VBRANCH, "plastic": PLASTIC}
PARENT = {"kind": "mlp", "sizes": [64, 384, 384]}


# ----------------------------------------------------------------------------- helpers


def start(args: list[str], logged: bool = False) -> subprocess.Popen[str]:
    """``python -m branchnet.cli ARGS`` in a new process (stdout, stderr piped)."""
    cmd = [sys.executable, "-c", LOGGED_CLI, *args] if logged else [
        sys.executable, "-m", "branchnet.cli", *args]
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], code: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, f"exit {proc.returncode}\n{out}\n{err}"
    return out, err


def run_folder(stdout: str) -> Path:
    return Path(re.search(r"^run folder: (\S+)", stdout, re.M).group(1))  # type: ignore[union-attr]


def kill_when(victims: dict[str, tuple[subprocess.Popen[str], Callable[[], Any]]]) -> dict[str, Any]:
    """Poll every victim's ``found()`` at once (every millisecond) and SIGKILL each process as
    soon as its own is truthy; returns those values. Fails if a process ends first."""
    hits: dict[str, Any] = {}
    deadline = time.monotonic() + 240
    while len(hits) < len(victims) and time.monotonic() < deadline:
        for name, (proc, found) in victims.items():
            if name in hits:
                continue
            hit = found()
            if hit:
                kill(proc)
                hits[name] = hit
            elif proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"{name} ended (exit {proc.returncode}) before it was killed\n"
                            f"{out}\n{err}")
        time.sleep(0.001)
    assert len(hits) == len(victims), f"timed out; killed only {sorted(hits)}"
    return hits


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def the_run(out: Path) -> Path | None:
    runs = [p for p in out.glob("*") if (p / "config.yaml").is_file()] if out.is_dir() else []
    return runs[0] if len(runs) == 1 else None


def deterministic(obj: Any, paths: dict[str, str]) -> Any:
    """``obj`` without wall-clock fields, with run-specific paths replaced by names."""
    if isinstance(obj, dict):
        return {k: deterministic(v, paths) for k, v in obj.items() if k not in WALL_CLOCK}
    if isinstance(obj, list):
        return [deterministic(v, paths) for v in obj]
    if isinstance(obj, str):
        for path, name in paths.items():
            obj = obj.replace(path, name)
    return obj


def metrics_of(run: Path, *others: Path) -> Any:
    return deterministic(read_json(run / "metrics.json"),
                         {str(run): "RUN", **{str(o): "OTHER" for o in others}})


def assert_same_result(run: Path, reference: Path) -> None:
    got, want = metrics_of(run, reference), metrics_of(reference, run)
    assert want.get("accuracy") is not None
    assert got == want


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- kill -9 mid-training


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


def cli(args: list[str]) -> str:
    """``branchnet ARGS`` in this process, with one intra-op thread like the child processes;
    must succeed; returns stdout."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run_cli(args)
    finally:
        torch.set_num_threads(before)
    assert code == 0, f"{out}\n{err}"
    return out


def checkpoint_in(out: Path, stage: str) -> Callable[[], Path | None]:
    def found() -> Path | None:
        run = the_run(out)
        return run if run and (run / stage / "checkpoints" / "last.safetensors").is_file() else None
    return found


@pytest.fixture(scope="module")
def killed_runs(tmp: Path) -> dict[str, Path]:
    """One run per fit command, started at the same time as real processes and each killed
    (SIGKILL) right after its first epoch checkpoint."""
    victims = {}
    for command, cfg in CONFIGS.items():
        path = write_config(tmp / f"{command}.yaml", cfg)
        victims[command] = start([command, "fit", str(path), "--out", str(tmp / f"{command}-kill")])
    runs = kill_when({command: (proc, checkpoint_in(tmp / f"{command}-kill", "work/model"))
                      for command, proc in victims.items()})
    copy_run(runs["model"], tmp / "model-killed-copy")
    return runs


def kill_and_resume(tmp: Path, killed_runs: dict[str, Path], command: str) -> tuple[Path, Path]:
    """The killed run of ``command`` resumed, and an uninterrupted run: (reference, resumed)."""
    cfg, run = CONFIGS[command], killed_runs[command]
    ckpt = run / "work" / "model" / "checkpoints"
    epoch = load_checkpoint(ckpt / "last.safetensors")["epoch"]
    assert epoch < cfg["train"]["epochs"] - 1, "killed mid-training"
    assert not (run / "work" / "model" / "result.json").exists()
    assert not (run / "metrics.json").exists()
    config_before = (run / "config.yaml").read_bytes()

    assert run_folder(cli([command, "fit", "--resume", str(run)])) == run
    reference = run_folder(cli([command, "fit", str(tmp / f"{command}.yaml"),
                                "--out", str(tmp / f"{command}-ref")]))
    assert_same_result(run, reference)
    assert (run / "config.yaml").read_bytes() == config_before
    assert (ckpt / "last.safetensors").is_file() and list(ckpt.glob("best-*.safetensors"))
    assert not list(ckpt.glob(".*.tmp")), "temporary files of the killed writes are removed"
    history = read_json(run / "work" / "model" / "result.json")["history"]
    assert [row["epoch"] for row in history] == list(range(cfg["train"]["epochs"]))
    return reference, run


@pytest.fixture(scope="module")
def model_runs(tmp: Path, killed_runs: dict[str, Path]) -> tuple[Path, Path]:
    return kill_and_resume(tmp, killed_runs, "model")


def test_model_kill_mid_training_then_resume(model_runs: tuple[Path, Path]) -> None:
    _, resumed = model_runs  # compared with the reference in kill_and_resume
    assert (resumed / "model" / "weights.safetensors").is_file()


@pytest.mark.parametrize("command", ["vbranch", "plastic"])
def test_kill_mid_training_then_resume_equals_an_uninterrupted_run(
    tmp: Path, killed_runs: dict[str, Path], command: str
) -> None:
    kill_and_resume(tmp, killed_runs, command)


# ----------------------------------------------------------------------------- the tree


@pytest.fixture(scope="module")
def tree_setup(tmp: Path) -> dict[str, Any]:
    """A tree config with a pretrained parent and a 36,000-row digits-like .npz (so that the
    activation-cache fill takes long enough to be caught); two real processes of it, one
    killed during the cache fill, one while its second branch trains; an uninterrupted run."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    reps = 20
    x = np.repeat(digits.data.astype(np.float32), reps, axis=0)
    x += rng.normal(0, 1.0, x.shape).astype(np.float32)
    y = np.repeat(digits.target, reps)
    np.savez(tmp / "bigdigits.npz", x=x, y=y, classes=np.array([str(i) for i in range(10)]))
    torch.manual_seed(0)
    parent = models.build({**PARENT, "num_classes": 10})
    save_file({k: v.contiguous() for k, v in parent.state_dict().items()},
              str(tmp / "parent.safetensors"))
    cfg = {"name": "ftree", "seed": 0,
           "data": {"source": str(tmp / "bigdigits.npz"), "val_fraction": 0.3,
                    "test_fraction": 0.1},
           "hierarchy": HIERARCHY,
           "parent": {"model": PARENT, "tap": "hidden.1",
                      "weights": str(tmp / "parent.safetensors")},
           "tree": {"head": {"hidden": 16, "dropout": 0.0}, "cache_dir": str(tmp / "cache-ref"),
                    "head_train": {"epochs": 3, "batch_size": 256, "lr": 0.01,
                                   "patience": None}},
           "calibration": {"method": "coverage", "coverage": 0.8},
           "progress": False}
    path = write_config(tmp / "ftree.yaml", cfg)
    fill = start(["tree", "fit", str(path), "--out", str(tmp / "tree-fill"),
                  "--set", f"tree.cache_dir={tmp / 'cache-fill'}"])
    train = start(["tree", "fit", str(path), "--out", str(tmp / "tree-kill"),
                   "--set", f"tree.cache_dir={tmp / 'cache-kill'}"])
    cache_dir = tmp / "cache-fill"

    def second_node_checkpoint() -> Path | None:
        run = the_run(tmp / "tree-kill")
        nodes = sorted((run / "work" / "nodes").glob("*")) if run else []
        hit = len(nodes) > 1 and (nodes[1] / "checkpoints" / "last.safetensors").is_file()
        return run if hit else None

    hits = kill_when({
        "fill": (fill, lambda: cache_dir.is_dir() and list(cache_dir.glob(".tmp-*"))),
        "train": (train, second_node_checkpoint)})
    fill_tmp, killed = hits["fill"][0], hits["train"]
    reference = run_folder(cli(["tree", "fit", str(path), "--out", str(tmp / "tree-ref")]))
    return {"config": path, "reference": reference, "cache": tmp / "cache-ref",
            "fill_run": the_run(tmp / "tree-fill"), "fill_tmp": fill_tmp,
            "fill_cache": cache_dir, "killed": killed}


def read_json_yaml(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "config.yaml").read_text())


def tree_cache_of(run: Path) -> ActivationCache:
    return ActivationCache(read_json_yaml(run)["tree"]["cache_dir"])


def test_tree_kill_mid_training_then_resume(tree_setup: dict[str, Any]) -> None:
    run = tree_setup["killed"]
    nodes = sorted((run / "work" / "nodes").glob("*"))
    assert not (nodes[1] / "result.json").exists(), "killed while the second branch trained"
    finished_stage = snapshot(nodes[0])  # the first branch finished before the kill
    assert "result.json" in finished_stage
    config_before = (run / "config.yaml").read_bytes()

    cli(["tree", "fit", "--resume", str(run)])
    assert_same_result(run, tree_setup["reference"])
    assert (run / "config.yaml").read_bytes() == config_before
    assert snapshot(nodes[0]) == finished_stage, "the finished branch is kept, not retrained"
    assert all(v is None for v in tree_cache_of(run).verify().values())


def test_tree_kill_during_cache_fill_then_resume(tree_setup: dict[str, Any],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    run, tmp_folder = tree_setup["fill_run"], tree_setup["fill_tmp"]
    cache = ActivationCache(tree_setup["fill_cache"])
    assert run is not None
    assert tmp_folder.is_dir() and cache.entries() == [], "killed during the first fill"

    with caplog.at_level(logging.INFO, logger="branchnet.cache"):
        cli(["tree", "fit", "--resume", str(run)])
    assert not tmp_folder.exists(), "the killed fill's folder is removed"
    assert f"removing {tmp_folder}" in caplog.text
    report = cache.verify(full=True)
    assert len(report) == 2 and all(v is None for v in report.values()), report  # train, val
    reference = ActivationCache(tree_setup["cache"])
    for e in cache.entries():  # bit-identical to the uninterrupted run's entries
        assert torch.equal(CachedActivations(e.path).as_tensor(),
                           reference.open(e.key).as_tensor())
    assert_same_result(run, tree_setup["reference"])


def test_two_processes_share_one_cache(tmp: Path, tree_setup: dict[str, Any]) -> None:
    cache_dir = tmp / "cache-shared"
    args = ["tree", "fit", str(tree_setup["config"]), "--set", f"tree.cache_dir={cache_dir}"]
    procs = [start([*args, "--out", str(tmp / f"shared-{i}")], logged=True) for i in range(2)]
    results = [finish(p) for p in procs]
    runs = [run_folder(out) for out, _ in results]
    assert runs[0] != runs[1] and runs[0].parent != runs[1].parent
    cache = ActivationCache(cache_dir)
    keys = [e.key for e in cache.entries()]
    assert len(keys) == 2 and all(v is None for v in cache.verify().values())
    for key in keys:  # every entry computed by exactly one of the two processes
        computed = [err.count(f"computing activation cache entry {cache.path(key)} ")
                    for _, err in results]
        assert sorted(computed) == [0, 1], (key, computed, results)
    assert not list(cache_dir.glob(".tmp-*"))
    for run in runs:
        assert_same_result(run, tree_setup["reference"])


# ----------------------------------------------------------------------------- damaged files


def one_line_error(err: str, file: Path) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("branchnet: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(file) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def killed_model_run(tmp: Path, killed_runs: dict[str, Path]) -> Path:
    """A pristine copy of the killed ``model fit`` run (copied before any resume)."""
    return tmp / "model-killed-copy"




@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_epoch_checkpoint_on_resume(killed_model_run: Path, tmp_path: Path,
                                            damage: str) -> None:
    run = copy_run(killed_model_run, tmp_path / "run")
    last = run / "work/model/checkpoints/last.safetensors"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[:16] = b"\xff" * 16  # the safetensors header length
    last.write_bytes(bytes(data))
    code, _, err = run_cli(["model", "fit", "--resume", str(run)])
    assert code == 2
    line = one_line_error(err, last)
    assert "cannot resume" in line and "delete the folder" in line
    assert last.read_bytes() == bytes(data), "the damaged file is left for the user to inspect"


def test_damaged_result_json_on_resume(model_runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(model_runs[0], tmp_path / "run")
    (run / "metrics.json").unlink()  # unfinished as a whole, but the training stage finished
    result = run / "work/model/result.json"
    result.write_text(result.read_text()[:40])
    code, _, err = run_cli(["model", "fit", "--resume", str(run)])
    assert code == 2
    assert "is damaged" in one_line_error(err, result)


def test_damaged_cache_shard_rebuilt_on_resume(tree_setup: dict[str, Any], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    ref = tree_setup["reference"]
    run = copy_run(ref, tmp_path / "run")
    cache_dir = tmp_path / "cache"
    shutil.copytree(tree_setup["cache"], cache_dir)
    cfg = read_json_yaml(run)
    cfg["tree"]["cache_dir"] = str(cache_dir)
    write_config(run / "config.yaml", cfg)
    (run / "metrics.json").unlink()
    cache = ActivationCache(cache_dir)
    entry = cache.entries()[0]
    shard = entry.path / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the activations: only the hash tells
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=re.escape(str(shard))):
        CachedActivations(entry.path).verify()
    # resume: the damaged entry is rebuilt with a warning naming the file
    with pytest.warns(RuntimeWarning, match="computing it again") as warned, \
            caplog.at_level(logging.INFO, logger="branchnet.cache"):
        cli(["tree", "fit", "--resume", str(run)])
    assert any(str(shard) in str(w.message) for w in warned)
    assert caplog.text.count("computing activation cache entry") == 1, caplog.text
    assert all(v is None for v in cache.verify().values())
    assert_same_result(run, ref)
    # opening a damaged entry directly is a one-line CacheError naming the file
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CacheError) as e:
        cache.open(entry.key)
    assert str(shard) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_full_disk_is_a_clear_error_and_keeps_earlier_files(tiny_disk: Path, tmp: Path,
                                                            one_thread: None) -> None:
    """A 256 KiB tmpfs as the run folder's disk: the model checkpoints fill it."""
    cfg = {**MODEL, "model": {"kind": "mlp", "sizes": ["auto", 256], "dropout": 0.1},
           "train": {**MODEL["train"], "epochs": 3}}
    path = write_config(tmp / "full.yaml", cfg)
    code, _, err = run_cli(["model", "fit", str(path), "--out", str(tiny_disk)])
    assert code == 2, err
    line = one_line_error(err, tiny_disk)
    assert "No space left on device" in line
    run = the_run(tiny_disk)
    assert run is not None
    read_json_yaml(run)  # config.yaml, written before the disk filled, is intact
    ckpt = run / "work/model/checkpoints"
    assert not list(ckpt.glob(".*.tmp")), "no temporary file outlives the failed write"
    for f in ckpt.glob("*.safetensors"):
        load_checkpoint(f)  # every checkpoint that exists is complete


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.json"
    fileio.write_json(target, {"accuracy": 0.5})

    def full(self: Path, *args: Any, **kw: Any) -> None:
        Path.write_bytes(self, b'{"accur')  # part of the bytes, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        fileio.write_json(target, {"accuracy": 0.9})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert read_json(target) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import branchnet.checkpoint as checkpoint

    target = tmp_path / "last.safetensors"
    checkpoint.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, target)

    def full(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        checkpoint.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, target)
    assert load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nothing"))):
        load_checkpoint(tmp_path / "nothing")
