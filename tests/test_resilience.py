"""Faults injected into real runs (subprocesses of train.py): kill -9 at three moments, corrupt and
truncated checkpoints, a full disk, SIGUSR1 / SIGTERM, a hang. Each must cost at most one checkpoint
interval and end bit-identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import train_in_process
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["configs/tiny.toml", "--model.num_hidden_layers=2", "--train.global_batch_size=4", "--train.micro_batch_size=4",
        "--data.seq_len=64", "--train.max_steps=6", "--train.checkpoint_interval=2", "--train.log_interval=1",
        "--train.eval_interval=0", "--train.sample_tokens=0", "--train.keep_checkpoints=2"]

# Runs train.main with one fault planted; the fault is chosen by argv[1], the training args follow.
HARNESS = r"""
import errno, os, signal, sys, time
sys.path.insert(0, os.getcwd())
import checkpoint, train
fault, args = sys.argv[1], sys.argv[2:]
real_step, real_write, real_replace = train.train_step, checkpoint._write_bytes, os.replace
calls = {"step": 0, "write": 0}

def step_then(action):
    def train_step(*a, **k):
        out = real_step(*a, **k)
        calls["step"] += 1
        if calls["step"] == 3:
            action()
        return out
    return train_step

def writes_then(action, on_save):  # the on_save-th checkpoint, after its first bytes are written
    saves = {"n": 0, "file": None}
    def write(f, data):
        if saves["file"] is not f:
            saves["file"], saves["n"] = f, saves["n"] + 1
        real_write(f, data)
        if saves["n"] == on_save:
            action()
    return write

kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if fault == "kill-step":              # between checkpoints, in the middle of training
    train.train_step = step_then(kill)
elif fault == "kill-save":            # in the middle of writing the second checkpoint's file
    checkpoint._write_bytes = writes_then(kill, 2)
elif fault == "kill-commit":          # the second checkpoint written, its rename not done
    def replace(a, b):
        if a.endswith(".tmp") and "00000004" in a:
            kill()
        real_replace(a, b)
    checkpoint.os.replace = replace
elif fault == "disk-full":            # every write of the second checkpoint fails
    def full(f, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
    checkpoint._write_bytes = writes_then(lambda: None, 99)
    saves = {"n": 0}
    def write(f, data):
        if getattr(f, "_counted", False) is False:
            f._counted = True
            saves["n"] += 1
        if saves["n"] == 2:
            full(f, data)
        real_write(f, data)
    checkpoint._write_bytes = write
elif fault in ("SIGUSR1", "SIGTERM"):  # the signal arrives during step 3
    train.train_step = step_then(lambda: os.kill(os.getpid(), getattr(signal, fault)))
elif fault == "hang":                 # step 3 never ends
    train.train_step = step_then(lambda: time.sleep(3600))
elif fault == "hang-first":           # step 1 never ends
    def train_step(*a, **k):
        print(f"hang begins {time.time()}", file=sys.stderr, flush=True)
        time.sleep(3600)
    train.train_step = train_step
sys.exit(train.main(args))
"""

def run(out_dir, *args, fault="none", timeout=300):
    if fault == "none":  # nothing planted: train.main in this process, one thread as the subprocesses
        return train_in_process(*TINY, f"--train.out_dir={out_dir}", *args, threads=1)
    return subprocess.run([sys.executable, "-c", HARNESS, fault, *TINY, f"--train.out_dir={out_dir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})

def final_state(out_dir, step=6):
    with safe_open(os.path.join(out_dir, f"ckpt-{step:08d}", "rank-00000.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("rng|")}

def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    r = run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out

@pytest.mark.parametrize("fault,mode", [("kill-step", "sync"), ("kill-save", "sync"), ("kill-save", "async"),
                                        ("kill-commit", "async")])
def test_kill_9_then_resume_is_bit_identical(straight, tmp_path, fault, mode):
    flag = f"--train.async_checkpoint={'true' if mode == 'async' else 'false'}"
    r = run(tmp_path, flag, fault=fault)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    # killed in step 3, or in the middle of the step-4 save: nothing of step 4 was committed
    assert committed(tmp_path) == ["ckpt-00000002"]
    r = run(tmp_path, flag)
    assert r.returncode == 0 and "ckpt-00000002 at step 2" in r.stdout and "unusable" not in r.stdout, r.stderr[-3000:]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # the unfinished save was cleaned up
    assert_same(final_state(tmp_path), final_state(straight))

def committed(out_dir):
    return sorted(n for n in os.listdir(out_dir) if n.startswith("ckpt-") and not n.endswith(".tmp"))

def test_a_new_checkpoint_is_kept_beside_a_newer_bad_one(straight, tmp_path):
    """keep_checkpoints = 1 and the only checkpoint corrupt: the run starts over, and the checkpoint it
    commits must not be pruned in favour of the newer, bad one (which stays until the run rewrites it:
    a checkpoint that was only unreadable for a moment is never deleted)."""
    assert run(tmp_path, "--train.max_steps=4", "--train.keep_checkpoints=1").returncode == 0
    file = tmp_path / "ckpt-00000004" / "rank-00000.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    r = run(tmp_path, "--train.keep_checkpoints=1", fault="kill-step")
    assert "no usable checkpoint" in r.stdout, r.stdout[-2000:]
    assert committed(tmp_path) == ["ckpt-00000002", "ckpt-00000004"]
    r = run(tmp_path, "--train.keep_checkpoints=1")
    assert r.returncode == 0 and "ckpt-00000002 at step 2" in r.stdout, r.stderr[-3000:]
    assert committed(tmp_path) == ["ckpt-00000006"]  # ckpt-4 rewritten at step 4, then pruned
    assert_same(final_state(tmp_path), final_state(straight))

@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_bad_newest_checkpoint_is_named_and_skipped(straight, tmp_path, damage):
    assert run(tmp_path, "--train.max_steps=4").returncode == 0
    file = tmp_path / "ckpt-00000004" / "rank-00000.safetensors"
    raw = bytearray(file.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    else:
        raw[len(raw) // 2] ^= 0x01  # one bit of one tensor
    file.write_bytes(bytes(raw))
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if "unusable" in line]
    assert len(lines) == 1 and "ckpt-00000004" in lines[0], r.stdout
    assert ("truncated" if damage == "truncate" else "CRC-32") in lines[0]
    assert "resumed from" in r.stdout and "ckpt-00000002 at step 2" in r.stdout
    assert_same(final_state(tmp_path), final_state(straight))

def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(straight, tmp_path):
    r = run(tmp_path, fault="disk-full")
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in r.stderr
    assert "saved checkpoint at step 4" not in r.stdout  # a failed save is never called saved
    assert committed(tmp_path) == ["ckpt-00000002"]
    r = run(tmp_path / "retry", "--train.on_save_error=retry", fault="disk-full")
    assert r.returncode == 0 and "retrying at the next interval" in r.stdout, r.stderr[-3000:]
    assert committed(tmp_path / "retry") == ["ckpt-00000002", "ckpt-00000006"]
    assert not [n for n in os.listdir(tmp_path / "retry") if n.endswith(".tmp")]  # the failed one was cleaned up
    assert_same(final_state(tmp_path / "retry"), final_state(straight))

@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_a_signal_saves_the_step_reached_and_exits_0(straight, tmp_path, sig):
    r = run(tmp_path, fault=sig)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith(f"saved checkpoint at step 3 after {sig}")
    assert os.path.exists(tmp_path / "ckpt-00000003" / "meta.json")
    r = run(tmp_path)
    assert r.returncode == 0 and "at step 3" in r.stdout, r.stderr[-3000:]
    assert_same(final_state(tmp_path), final_state(straight))

@pytest.mark.parametrize("fault", ["hang", "hang-first"])
def test_a_hung_step_is_stopped_by_the_watchdog_with_every_stack(tmp_path, fault):
    r = run(tmp_path, "--train.hang_timeout_s=5", fault=fault, timeout=120)
    assert r.returncode == 1
    assert "Timeout" in r.stderr and "most recent call first" in r.stderr and "train_step" in r.stderr
    if fault == "hang-first":  # a hang in the very first step is caught, within the timeout
        began = float(r.stderr.split("hang begins ")[1].split()[0])
        assert time.time() - began < 5 + 15, time.time() - began

def test_no_watchdog_is_left_armed_after_a_run_that_exports(tmp_path, monkeypatch):
    """The watchdog watches the loop only: after the last export nothing may kill a process that lives on."""
    import train
    armed = []
    monkeypatch.setattr(train.faulthandler, "dump_traceback_later", lambda *a, **k: armed.append(True))
    monkeypatch.setattr(train.faulthandler, "cancel_dump_traceback_later", lambda: armed.append(False))
    r = run(tmp_path, "--train.hang_timeout_s=600", "--train.export_hf=true", "--train.export_hf_every=4")
    assert r.returncode == 0 and r.stdout.count("exported") == 2, r.stderr[-3000:]
    assert armed.count(True) > 6 and armed[-1] is False

def test_async_and_sync_saves_write_identical_files(straight, tmp_path):
    r = run(tmp_path, "--train.async_checkpoint=true")
    assert r.returncode == 0, r.stderr[-3000:]
    for step in (4, 6):
        a = (tmp_path / f"ckpt-{step:08d}" / "rank-00000.safetensors").read_bytes()
        b = (straight / f"ckpt-{step:08d}" / "rank-00000.safetensors").read_bytes()
        assert a == b
        meta = json.load(open(tmp_path / f"ckpt-{step:08d}" / "meta.json"))
        assert meta["files"]["rank-00000.safetensors"]["bytes"] == len(a)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["checkpoint_block_s"] >= 0 for r in rows if r["step"] % 2 == 0)

def test_an_async_save_writes_its_own_step_not_what_the_loop_does_next(tmp_path, monkeypatch):
    """The writer thread is held back while the loop changes every tensor of the optimizer state: the
    file must still hold the state of the step that was saved, byte for byte as a synchronous save."""
    import checkpoint
    import parallel
    import train
    cfg = train.load_config(os.path.join(ROOT, TINY[0]), TINY[1:4])
    grid = parallel.Grid()
    model = train.build(cfg, grid, grid.device)
    opt = parallel.DistributedOptimizer(model, grid, train.make_optimizer(cfg["train"]))
    checkpoint.Saver(str(tmp_path / "sync"), grid).save(1, opt, {})
    gate, real = threading.Event(), checkpoint._write_bytes
    monkeypatch.setattr(checkpoint, "_write_bytes", lambda f, data: gate.wait(60) and real(f, data))
    saver = checkpoint.Saver(str(tmp_path / "async"), grid, async_save=True)
    saver.save(1, opt, {})
    for _, named in opt.state()[0]:  # the next steps, while the writer waits
        for t in named.values():
            t.add_(1.0)
    gate.set()
    saver.wait()
    assert saver.error is None
    a, b = (tmp_path / d / "ckpt-00000001" / "rank-00000.safetensors" for d in ("async", "sync"))
    assert a.read_bytes() == b.read_bytes()
