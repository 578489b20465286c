"""Watching a run: TensorBoard and W&B get metrics.jsonl's scalars, plot.py draws the curves, and the
spike guard tells a bad batch (skipped for good) from a hardware fault (the step re-run and applied)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import train_in_process
from safetensors import safe_open

import data
import prepare
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["configs/tiny.toml", "--model.num_hidden_layers=2", "--data.seq_len=64", "--train.global_batch_size=8",
        "--train.micro_batch_size=4", "--train.log_interval=1", "--train.eval_interval=0", "--train.sample_tokens=0",
        "--train.warmup_steps=5", "--train.decay_steps=0", "--data.eval_batches=1", "--train.checkpoint_interval=0"]
GUARD = ["--train.spike_guard=true", "--train.spike_window=8", "--train.spike_sigma=6"]
POISONED = (20, 30)  # the steps whose batch holds garbage (their global batches are 19 and 29)
STEPS, RESUME_AT = 34, 24  # the resume's window must be restored to see step 30's spike: 30 - 24 < spike_window

def run(out_dir, *args, **kw):
    return train_in_process(*TINY, f"--train.out_dir={out_dir}", *args, threads=1, **kw)

def metrics(out_dir):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))}

def weights(out_dir, step):
    with safe_open(os.path.join(out_dir, f"ckpt-{step:08d}", "rank-00000.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("rng|")}

def make_corpora(base):
    """A clean source "web" (the start of the demo corpus) and a copy whose batches at POISONED hold a run of
    bytes the model never saw in every sample (only those samples' own tokens: a window shares its first
    token with the sample before it). Returns (clean prefix, poisoned prefix, {step: the samples poisoned})."""
    demo = data.IndexedDataset(prepare.demo_dataset("byte"))
    n = int(np.searchsorted(np.cumsum(demo.lengths(0, len(demo))), 300_000))  # 300K tokens: no epoch ends in a run
    clean, poisoned = os.path.join(base, "clean", "web"), os.path.join(base, "poisoned", "web")
    with data.IndexedDatasetWriter(clean, demo.dtype) as w:
        for d in range(n):
            w.add_document(demo.document(d))
    os.makedirs(os.path.dirname(poisoned))
    for ext in (".idx", ".bin"):
        shutil.copy(clean + ext, poisoned + ext)
    loader = data.DataLoader([(0, [("web", clean, 1.0)])], 64, 8, 8, seed=0, vocab_size=272)
    garbage = {s: loader.samples(s - 1)["web"] for s in POISONED}
    tokens = np.memmap(poisoned + ".bin", dtype=demo.dtype, mode="r+")
    rng = np.random.default_rng(0)
    for samples in garbage.values():
        for k in samples:
            tokens[k * 64 + 1:k * 64 + 64] = rng.integers(160, 256, 63)  # bytes of no UTF-8 text in Python's sources
    tokens.flush()
    return clean, poisoned, garbage

def without_update_at(steps):
    """train.train_step for a run whose data has no batch at these steps: the step number passes, no update."""
    real, calls = train.train_step, {"n": 0}

    def train_step(model, opt, *args, **kw):
        calls["n"] += 1
        if calls["n"] in steps:
            opt.skip_step()
            return float("nan"), float("nan"), 0.0, 0.0
        return real(model, opt, *args, **kw)
    return train_step

def faults(at_grads, at_forward):
    """Faults planted on the first try of a step, at the final norm: in step at_grads the gradient that flows back
    through it turns infinite (an exponent's bit flipped: the loss is right, every gradient below is not), in step
    at_forward its output is scaled by 4 (the loss and the gradients)."""
    real_step, real_fb, state = train.train_step, train.forward_backward, {"step": 0, "tries": 0}

    def train_step(*args, **kw):
        state["step"], state["tries"] = state["step"] + 1, 0
        return real_step(*args, **kw)

    def infinite_grad(module, args, out):
        out.register_hook(lambda g: g * float("inf"))

    def forward_backward(model, opt, batches, t, grid, train=True, **kw):
        state["tries"] += train
        fault = {at_grads: infinite_grad, at_forward: lambda m, a, o: o * 4}.get(state["step"])
        hook = model.model.norm.register_forward_hook(fault) if train and state["tries"] == 1 and fault else None
        try:
            return real_fb(model, opt, batches, t, grid, train, **kw)
        finally:
            if hook:
                hook.remove()
    return train_step, forward_backward

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """poisoned: the poisoned corpus under the guard, checkpoints at RESUME_AT and STEPS; reference: the clean
    corpus without the guard and without a batch at POISONED; resumed: poisoned's checkpoint at RESUME_AT, resumed."""
    base = tmp_path_factory.mktemp("spikes")
    clean, poisoned, garbage = make_corpora(base)
    out = run(base / "poisoned", f"--data.dataset={poisoned}", *GUARD, f"--train.max_steps={STEPS}",
              f"--train.checkpoint_interval={RESUME_AT}")
    assert out.returncode == 0, out.stderr[-3000:]
    mp = pytest.MonkeyPatch()
    mp.setattr(train, "train_step", without_update_at(POISONED))
    try:
        ref = run(base / "reference", f"--data.dataset={clean}", f"--train.max_steps={STEPS}")
    finally:
        mp.undo()
    assert ref.returncode == 0, ref.stderr[-3000:]
    os.makedirs(base / "resumed")
    shutil.copytree(base / "poisoned" / f"ckpt-{RESUME_AT:08d}", base / "resumed" / f"ckpt-{RESUME_AT:08d}")
    res = run(base / "resumed", f"--data.dataset={poisoned}", *GUARD, f"--train.max_steps={STEPS}")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    return dict(base=base, clean=clean, poisoned=poisoned, garbage=garbage, log=out.stdout, resumed_log=res.stdout)

def test_a_poisoned_batch_is_rerun_skipped_and_named_and_the_run_goes_on_as_without_it(runs):
    got, want = metrics(runs["base"] / "poisoned"), metrics(runs["base"] / "reference")
    for step in POISONED:
        r = got[step]
        assert r["spike"] == "data" and r["spike_loss"] == r["loss"] and r["loss"] > 5.5, r  # untrained: ln 272 = 5.6
        assert r["skipped_samples"] == {"web": runs["garbage"][step]}, r["skipped_samples"]
        assert f"step {step}: loss {r['loss']:.4f}" in runs["log"] and "the data, batch skipped for good" in runs["log"]
    assert sorted(s for s, r in got.items() if "spike" in r) == list(POISONED)  # no false alarm
    assert max(got[s]["loss"] for s in range(10, STEPS + 1) if s not in POISONED) < 4.5
    # every other step, and the weights at the end, as a run whose data had no batch at those steps
    for step in range(1, STEPS + 1):
        if step not in POISONED:
            assert got[step]["loss"] == want[step]["loss"], step
    a, b = weights(runs["base"] / "poisoned", STEPS), weights(runs["base"] / "reference", STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_a_resume_after_a_skip_keeps_the_guard_and_is_bit_identical(runs):
    meta = json.load(open(runs["base"] / "poisoned" / f"ckpt-{RESUME_AT:08d}" / "meta.json"))
    guard = meta["spike_guard"]
    assert guard["skipped"] == [{"step": POISONED[0], "samples": {"web": runs["garbage"][POISONED[0]]}}]
    straight = metrics(runs["base"] / "poisoned")
    applied = [s for s in range(1, RESUME_AT + 1) if s not in POISONED][-8:]
    assert guard["losses"] == [straight[s]["loss"] for s in applied]  # the window, exactly
    resumed = metrics(runs["base"] / "resumed")
    assert sorted(resumed) == list(range(RESUME_AT + 1, STEPS + 1)) and resumed[POISONED[1]]["spike"] == "data"
    for step in resumed:
        assert resumed[step]["loss"] == straight[step]["loss"], step
    a, b = weights(runs["base"] / "poisoned", STEPS), weights(runs["base"] / "resumed", STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = json.load(open(runs["base"] / "resumed" / f"ckpt-{STEPS:08d}" / "meta.json"))["spike_guard"]
    assert [s["step"] for s in final["skipped"]] == list(POISONED)

def test_the_guard_state_machine_case_by_case():
    """SpikeGuard's cases on made-up losses, driven as train_step drives it: suspicious() before each try's update,
    judge() after the step with its gradient norm (non-finite: no try was applied)."""
    loader = type("Loader", (), {"samples": lambda self, b: {"web": [b]}})()
    grid, nan = train.parallel.Grid(), float("nan")
    guard = train.SpikeGuard(train.TrainConfig(spike_window=4, spike_sigma=3.0), grid, stage_starts=[0, 10])

    def step(n, *tries, norm=1.0):
        return [guard.suspicious(x) for x in tries], guard.judge(n, norm, loader, grid)

    bad, fields = step(1, nan, nan, norm=nan)  # a non-finite loss, twice: the data
    assert bad == [True, True] and fields["spike"] == "data" and fields["skipped_samples"] == {"web": [0]}
    for n, x in enumerate([100.0, 3.2, 2.8, 3.0], start=2):  # under 4 losses in the window: only finiteness counts
        assert step(n, x) == ([False], {})
    assert guard.state["losses"] == [100.0, 3.2, 2.8, 3.0]
    for n, x in enumerate([3.0, 3.1, 2.9, 3.0], start=6):
        assert step(n, x) == ([False], {})
    w = torch.tensor([3.0, 3.1, 2.9, 3.0], dtype=torch.float64)
    bar = (w.mean() + 3 * w.std()).item()  # the unbiased std, as OLMo-core's torch.std_mean
    assert [guard.suspicious(bar), guard.suspicious(bar + 1e-9), guard.suspicious(float("inf"))] == [False, True, True]
    guard.tries = []
    # a spike that repeats: the data; the batch named, the window left as it was ... and emptied, step 10 ending stage 0
    assert step(10, 5.0, 5.0, norm=nan) == ([True, True], {"spike": "data", "spike_loss": 5.0, "skipped_samples": {"web": [9]}})
    assert guard.state["losses"] == [] and [s["step"] for s in guard.state["skipped"]] == [1, 10] and guard.faults == 0
    guard.state = dict(guard.state, losses=[3.0, 3.1, 2.9, 3.0])
    # a spike, then a normal loss: the hardware, the re-run applied and in the window
    assert step(11, 5.0, 3.05) == ([True, False], {"spike": "hardware", "spike_loss": 5.0})
    assert guard.state["losses"] == [3.1, 2.9, 3.0, 3.05] and guard.faults == 1
    # a non-finite loss, then a normal one (the Apertus-70B NaN): the hardware
    bad, fields = step(12, nan, 3.0)
    assert bad == [True, False] and fields["spike"] == "hardware" and guard.faults == 2
    # a normal loss whose gradients were not finite, then finite ones: the hardware (the backward's fault)
    assert step(13, 3.0, 3.0) == ([False, False], {"spike": "hardware", "spike_loss": 3.0}) and guard.faults == 3
    # a spike, then another spike: the hardware, and nothing applied
    window = guard.state["losses"]
    assert step(14, 9.0, 7.0, norm=nan) == ([True, True], {"spike": "hardware", "spike_loss": 9.0})
    assert guard.state["losses"] == window and guard.faults == 4 and len(guard.state["skipped"]) == 2

def test_one_time_faults_are_the_hardware_the_rerun_is_used_and_the_run_stops_after_max_faults(runs, tmp_path, monkeypatch):
    step_fn, fb_fn = faults(at_grads=12, at_forward=16)
    monkeypatch.setattr(train, "train_step", step_fn)
    monkeypatch.setattr(train, "forward_backward", fb_fn)
    out = run(tmp_path, f"--data.dataset={runs['clean']}", *GUARD, "--train.spike_max_faults=2",
              f"--train.max_steps={STEPS}")
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]  # the rest is the progress bar
    assert len(errors) == 1 and "2 hardware faults" in errors[0] and "node to drain" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    got, clean = metrics(tmp_path), metrics(runs["base"] / "reference")
    assert max(got) == 16  # stopped after the second fault, with the step's record written
    for step in range(1, 17):  # the faults' re-runs are the clean steps: the run is the reference run, bit for bit
        assert got[step]["loss"] == clean[step]["loss"], step
    assert got[12]["spike"] == "hardware" and got[12]["spike_loss"] == got[12]["loss"] and np.isfinite(got[12]["grad_norm"])
    assert got[16]["spike"] == "hardware" and got[16]["spike_loss"] > got[16]["loss"] + 1
    assert "a hardware fault (1 of 2), the re-run applied" in out.stdout
    assert sorted(s for s, r in got.items() if "spike" in r) == [12, 16]

HARNESS = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]
import train, test_watching
out, args = sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
step_fn, fb_fn = test_watching.faults(at_grads=12 if rank == 3 else -1, at_forward=-1)  # rank 3's GPU fails once
train.train_step, train.forward_backward = step_fn, fb_fn
judge = train.SpikeGuard.judge
def judged(self, step, *a):
    fields = judge(self, step, *a)
    with open(os.path.join(out, f"decisions-{rank}.jsonl"), "a") as f:
        f.write(json.dumps([step, fields.get("spike"), self.state["losses"][-1:]]) + "\n")
    return fields
train.SpikeGuard.judge = judged
sys.exit(train.main(args))
"""

def test_under_tp2_dp2_every_rank_takes_the_same_decisions(runs, tmp_path):
    (tmp_path / "harness.py").write_text(HARNESS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(tmp_path / "harness.py"),
           os.path.join(ROOT, "tests"), str(tmp_path), *TINY, f"--train.out_dir={tmp_path / 'run'}", "--parallel.tp=2",
           f"--data.dataset={runs['poisoned']}", *GUARD, f"--train.max_steps={STEPS}", "--parallel.bucket_size=60000"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    decisions = [open(tmp_path / f"decisions-{r}.jsonl").read() for r in range(4)]
    assert decisions[0] and all(d == decisions[0] for d in decisions)  # the verdicts and the windows, bit for bit
    spikes = {s: kind for s, kind, _ in map(json.loads, decisions[0].splitlines()) if kind}
    assert spikes == {12: "hardware", POISONED[0]: "data", POISONED[1]: "data"}
    got = metrics(tmp_path / "run")  # (the losses drift from one process's: the layout sums in another order)
    assert {s: r["spike"] for s, r in got.items() if "spike" in r} == spikes
    assert got[POISONED[0]]["skipped_samples"] == {"web": runs["garbage"][POISONED[0]]}

# ----------------------------------------------------------------------------- tracking and plots
def scalars(record):
    return {k: v for k, v in record.items() if type(v) in (int, float) and k != "step"}

def test_tensorboard_holds_every_scalar_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the extra `track` (pip install -e \".[track]\") is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = run(tmp_path, "--train.max_steps=4", "--train.tensorboard=true", "--train.checkpoint_interval=2")
    assert out.returncode == 0, out.stderr[-3000:]
    want = metrics(tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {k for r in want.values() for k in scalars(r)}, tags  # the same names, val_loss/<source> too
    for tag in tags:
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx({s: r[tag] for s, r in want.items() if tag in r}, rel=1e-6), tag  # float32

def test_wandb_offline_logs_the_same_and_a_restart_resumes_the_same_run(tmp_path):
    """Two launches of train.py in their own processes (a process that ends is what flushes W&B's offline writer;
    in one process the service may still hold the records)."""
    pytest.importorskip("wandb", reason="the extra `track` (pip install -e \".[track]\") is not installed")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    for steps in (2, 4):  # a restart: the run resumes from the checkpoint at step 2
        out = subprocess.run([sys.executable, "train.py", *TINY, f"--train.out_dir={tmp_path}", f"--train.max_steps={steps}",
                              "--train.wandb_project=nanoapertus-test"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    run_id = open(tmp_path / "wandb_id").read()
    launches = sorted(d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-"))
    assert len(launches) == 2 and all(d.endswith(f"-{run_id}") for d in launches), launches
    for launch, steps in zip(launches, ((1, 2), (3, 4))):  # the history records hold each name and value as JSON text
        logged = open(tmp_path / "wandb" / launch / f"run-{run_id}.wandb", "rb").read()
        for step in steps:
            for k, v in scalars(metrics(tmp_path)[step]).items():  # (W&B writes 6189.0 as 6189)
                texts = {json.dumps(v), json.dumps(int(v)) if float(v).is_integer() else json.dumps(v)}
                assert k.encode() in logged and any(s.encode() in logged for s in texts), (launch, step, k, v)

def test_a_missing_tracking_package_is_one_line_before_any_step(tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.chdir(ROOT)
    assert train.main([*TINY, f"--train.out_dir={tmp_path}", "--train.max_steps=2", "--train.wandb_project=x"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == 'error: train.wandb_project needs the wandb package: pip install -e ".[track]"', err
    assert not os.path.exists(tmp_path / "metrics.jsonl") or not open(tmp_path / "metrics.jsonl").read()

def test_plot_draws_the_curves_of_runs(runs, tmp_path):
    pytest.importorskip("matplotlib", reason="the extra `plot` (pip install -e \".[plot]\") is not installed")
    from matplotlib.image import imread
    import plot
    out = tmp_path / "curves.png"
    assert plot.main([str(runs["base"] / "poisoned"), str(runs["base"] / "reference"), "--out", str(out)]) == 0
    png = imread(out)
    assert png.shape[:2] == (850, 1600), png.shape
    assert len(np.unique(png.reshape(-1, png.shape[-1]), axis=0)) > 50  # lines of two colours, text: not blank
    white = (png[..., :3] > 0.99).all(-1).mean()
    assert 0.5 < white < 0.97, white
    assert plot.main([str(runs["base"] / "poisoned" / "metrics.jsonl"), "--x", "tokens", "--out", str(tmp_path / "t.png")]) == 0
    assert plot.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "n.png")]) == 2

def test_plot_without_matplotlib_is_one_line(monkeypatch, capsys):
    import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it now fails
    assert plot.main(["out/run"]) == 2
    assert capsys.readouterr().err == 'error: plot.py needs matplotlib: pip install -e ".[plot]"\n'

def test_the_guard_is_on_in_the_8b_and_70b_configs_only():
    for name, on in (("apertus-8b", True), ("apertus-70b", True), ("tiny", False), ("apertus-8b-sft", False)):
        assert train.load_config(os.path.join(ROOT, "configs", f"{name}.toml"))["train"].spike_guard == on, name
