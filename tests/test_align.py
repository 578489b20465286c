"""Alignment as Apertus-Instruct was made: QRPO and DPO on preference pairs (the losses against their formulas,
prepare --preferences, the reference log-probabilities, every layout against one process, a short run that
learns), and the chat: generation with a KV cache against the plain path and transformers, chat.py."""
import contextlib
import decimal
import io
import json
import math
import os
import random
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import CONTROL, train_in_process

import checkpoint
import data
import prepare
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers")

# ----------------------------------------------------------------------------- the losses
def dpo_plain(lp, ref, n, beta, norm):
    b = [beta / n[y] if norm else beta for y in (0, 1)]
    margin = b[0] * (lp[0] - ref[0]) - b[1] * (lp[1] - ref[1])
    return math.log1p(math.exp(-margin)), margin

def qrpo_plain(lp, ref, n, rewards, ref_rewards, beta, norm, beta_max):
    decimal.getcontext().prec = 60
    losses = []
    for y in (0, 1):
        b = beta / n[y] if norm else beta
        b = min(b, beta_max) if beta_max > 0 else b
        quantile = sum(r <= rewards[y] for r in ref_rewards) / len(ref_rewards)
        B = decimal.Decimal(b)  # exp(1/b) overflows a float below b = 0.0014: 60 digits do not
        log_z = float((B * ((1 / B).exp() - 1)).ln())
        losses.append((quantile - b * log_z - b * (lp[y] - ref[y])) ** 2)
    return (losses[0] + losses[1]) / 2

@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("beta,beta_max", [(0.1, 0.1), (5.0, 0.1), (5.0, 0.0), (0.05, 1.0)])
def test_losses_are_the_formulas(norm, beta, beta_max):
    torch.manual_seed(0)
    P, n_ref = 64, 10
    lp, ref = -torch.rand(P, 2, dtype=torch.float64) * 50, -torch.rand(P, 2, dtype=torch.float64) * 50
    lengths = torch.randint(1, 300, (P, 2))
    rewards = torch.randint(0, 8, (P, 2)).double() / 4  # coarse: ties with the reference rewards happen
    ref_rewards = torch.randint(0, 8, (P, n_ref)).double() / 4
    counts = torch.randint(1, n_ref + 1, (P,))  # prompts with fewer reference completions: NaN-padded
    ref_rewards[torch.arange(n_ref) >= counts[:, None]] = math.nan
    losses, margins = train.dpo_loss(lp, ref, lengths, beta, norm)
    q_losses, q_margins, quantiles = train.qrpo_loss(lp, ref, lengths, rewards, ref_rewards, beta, norm, beta_max)
    for i in range(P):
        args = (lp[i].tolist(), ref[i].tolist(), lengths[i].tolist())
        want, want_margin = dpo_plain(*args, beta, norm)
        assert losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-14) and margins[i].item() == pytest.approx(want_margin)
        refs = ref_rewards[i, :counts[i]].tolist()
        assert q_losses[i].item() == pytest.approx(qrpo_plain(*args, rewards[i].tolist(), refs, beta, norm, beta_max), rel=1e-12)
        assert quantiles[i].tolist() == [sum(r <= rewards[i, y].item() for r in refs) / len(refs) for y in (0, 1)]

def test_log_z_is_exact_without_overflow_and_apertus_approximation_is_close():
    """log Z = log(b (exp(1/b) - 1)) overflows float64 below b = 0.0014; the exact form does not, and Apertus'
    b log Z ~ b log b + 1 is within 5e-6 of it below the clamp (b <= 0.1)."""
    lp = torch.zeros(1, 2, dtype=torch.float64)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    for b in (1.0, 0.3, 0.1, 0.05, 0.01, 1e-3, 1e-4):
        loss = train.qrpo_loss(lp, lp, torch.ones(1, 2), zero, zero[:, :1], b, beta_max=0)[0].item()
        exact = b * (math.log(b) + 1 / b + math.log1p(-math.exp(-1 / b)))  # b log Z, by hand
        assert math.isfinite(loss) and loss == pytest.approx((1 - exact) ** 2, rel=1e-12)
        if b <= 0.1:
            assert abs(exact - (b * math.log(b) + 1)) < 5e-6

# ----------------------------------------------------------------------------- the data
def chat_tokenizer(path):
    """A byte-level tokenizer.json with Apertus' special ids (the chat template's control tokens at 61..72), the
    256 bytes after them and no merges: 329 ids, so that a tiny model is tiny."""
    names = {0: "<unk>", 1: "<s>", 2: "</s>", **{61 + k: name for k, name in enumerate(CONTROL)}}
    specials = [names.get(i, f"<SPECIAL_{i}>") for i in range(73)]
    spell = prepare._gpt2_byte_spelling()
    spec = {"version": "1.0", "normalizer": None, "model": {"type": "BPE", "merges": [],
            "vocab": {s: i for i, s in enumerate(specials)} | {spell[b]: 73 + b for b in range(256)}},
            "added_tokens": [{"id": i, "content": s, "special": True} for i, s in enumerate(specials)],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r"\s+|\S+"}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return str(path)

def preference(i, rng, rewards=True):
    """A pair whose chosen completion follows a rule (letters a-m only) and the rejected not (n-z)."""
    def words(letters):
        return " ".join("".join(rng.choice(letters) for _ in range(4)) for _ in range(3))
    pair = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."}],
            "chosen": {"content": words("abcdefghijklm")}, "rejected": {"content": words("nopqrstuvwxyz")}}
    if rewards:
        pair["chosen"]["reward"], pair["rejected"]["reward"] = rng.uniform(0.5, 1), rng.uniform(0, 0.5)
        pair["ref_rewards"] = [rng.random() for _ in range(rng.randint(4, 10))]
    return pair

SEQ = 100
TINY = """[model]
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 8
vocab_size = 336
max_position_embeddings = 256
rope_theta = 10000.0
rope_scaling = false
[data]
seq_len = 100
val_fraction = 0.1
[train]
device = "cpu"
dtype = "float32"
optimizer = "adamw"
goldfish = false
sample_tokens = 0
log_interval = 1
warmup_steps = 1
"""
QRPO = ["--train.objective=qrpo", "--train.beta=5.0", "--train.length_normalize=true", "--train.beta_max=0.1"]
DPO = ["--train.objective=dpo", "--train.beta=0.1"]

@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """The tokenizer, 300 pairs prepared by the command line (with rewards), the config, a tiny HF model."""
    base = tmp_path_factory.mktemp("prefs")
    tok = chat_tokenizer(base / "tok")
    rng = random.Random(0)
    (base / "prefs.jsonl").write_text("".join(json.dumps(preference(i, rng)) + "\n" for i in range(300)))
    assert prepare.main(["--preferences", str(base / "prefs.jsonl"), "--tokenizer", tok, "--out", str(base / "prefs"),
                         "--seq-len", str(SEQ)]) == 0
    (base / "tiny.toml").write_text(TINY)
    cfg = transformers.ApertusConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, vocab_size=336, max_position_embeddings=256,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(base / "hf")
    shutil.copy(os.path.join(tok, "tokenizer.json"), base / "hf")
    return base

def run_args(prefs, out, *args):
    return [str(prefs / "tiny.toml"), f"--data.dataset={prefs / 'prefs'}", f"--data.tokenizer={prefs / 'tok'}",
            f"--train.out_dir={out}", *args]

def prepare_prefs(capsys, prefs, path, out, *args):
    """prepare.py --preferences in this process: (exit status, stdout, the lines of error)."""
    rc = prepare.main(["--preferences", str(path), "--tokenizer", str(prefs / "tok"), "--out", str(out), *args])
    cap = capsys.readouterr()
    return rc, cap.out, [line for line in cap.err.replace("\r", "\n").splitlines() if line.startswith("error:")]

def test_prepare_preferences_masks_the_completion_only_and_keeps_the_rewards(prefs, tmp_path, capsys):
    tok = prepare.get_tokenizer(str(prefs / "tok"))
    ids, masks = data.IndexedDataset(str(prefs / "prefs")), data.IndexedDataset(str(prefs / "prefs.mask"))
    rewards = data.IndexedDataset(str(prefs / "prefs.rewards"), values=True)
    assert len(ids) == 600 and len(rewards) == 300 and rewards.dtype == np.float64
    rng = random.Random(0)
    for i in range(300):
        pair = preference(i, rng)
        prompt, _ = prepare.chat_tokens(tok, pair["prompt"], generation_prompt=True)
        assert prompt[-1] == tok.special["<|assistant_start|>"]
        for k, y in enumerate(("chosen", "rejected")):
            completion = tok.encode(pair[y]["content"]) + [tok.special["<|assistant_end|>"]]
            seq, mask = ids.sequence(2 * i + k), masks.sequence(2 * i + k) != 0
            n = len(prompt) + len(completion)
            assert len(seq) == SEQ + 1 and seq[:n].tolist() == prompt + completion  # padded to seq_len + 1
            assert mask.tolist() == [False] * len(prompt) + [True] * len(completion) + [False] * (SEQ + 1 - n)
        want = [pair["chosen"]["reward"], pair["rejected"]["reward"], *pair["ref_rewards"]]
        assert rewards.sequence(i).tolist() == want
    # an assistant turn inside the prompt is context: no mask, not in |y|; a long pair is dropped and counted;
    # pairs without rewards prepare (for dpo), with an empty rewards sequence each
    multi = {"prompt": [{"role": "system", "content": "Hi."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "and?"}], "chosen": {"content": "yes"}, "rejected": {"content": "no"}}
    long = {**multi, "rejected": {"content": "x" * 200}}
    (tmp_path / "dpo.jsonl").write_text(json.dumps(multi) + "\n" + json.dumps(long) + "\n")
    rc, out, errors = prepare_prefs(capsys, prefs, tmp_path / "dpo.jsonl", tmp_path / "dpo", "--seq-len", str(SEQ))
    assert rc == 0 and not errors and "1 pairs" in out and "without rewards); 1 longer than 100 + 1 tokens dropped" in out
    mask = data.IndexedDataset(str(tmp_path / "dpo.mask")).sequence(0) != 0
    assert int(mask.sum()) == len(tok.encode("yes")) + 1
    assert len(data.IndexedDataset(str(tmp_path / "dpo"))) == 2
    assert data.IndexedDataset(str(tmp_path / "dpo.rewards"), values=True).sequence(0).size == 0

@pytest.mark.parametrize("line,message", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": {"content": "a"}}', 'bad.jsonl:2: a preference record'),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": {"content": "a", "reward": NaN}, '
     '"rejected": {"content": "b", "reward": 0}, "ref_rewards": [1]}', 'bad.jsonl:2: "chosen": "reward" must be a finite'),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": {"content": "a", "reward": 1}, '
     '"rejected": {"content": "b", "reward": 0}, "ref_rewards": [1, Infinity]}', 'bad.jsonl:2: "ref_rewards"[1] must be'),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": {"content": "a"}, "rejected": {"content": "b"}}',
     "bad.jsonl:2: has no rewards, line 1 has"),
    ('{"prompt": [{"role": "assistant", "content": "q"}], "chosen": {"content": "a"}, "rejected": {"content": "b"}}',
     "bad.jsonl:2: message 0: expected role 'user'"),
])
def test_a_bad_preference_line_is_one_line_of_error_naming_it(prefs, tmp_path, capsys, line, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(preference(0, random.Random(0))) + "\n" + line + "\n")
    rc, _, errors = prepare_prefs(capsys, prefs, tmp_path / "bad.jsonl", tmp_path / "bad")
    assert rc == 2 and len(errors) == 1 and message in errors[0], errors
    assert not os.path.exists(tmp_path / "bad.idx")

# ----------------------------------------------------------------------------- training
def losses(out, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if key in r}

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _layouts_worker(rank, world, ports, runs):
    """One process of several train.py runs in a row (each its own process group): the workers start once."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    for port, args in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = train.main(args)
        assert rc == 0, (rank, args, out.getvalue()[-3000:])

PARITY = ["--train.max_steps=5", "--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.lr=1e-2",
          "--train.checkpoint_interval=3", "--train.eval_interval=5", "--data.eval_batches=1"]
LAYOUTS = {"dpo": {"tp2pp2": ["--parallel.tp=2", "--parallel.pp=2"], "pp2dp2": ["--parallel.pp=2"]},
           "qrpo": {"tp2pp2": ["--parallel.tp=2", "--parallel.pp=2"], "tp2dp2": ["--parallel.tp=2"],
                    "cp2dp2": ["--parallel.cp=2"]}}  # context parallelism: a row's log-probability summed over CP

@pytest.fixture(scope="module")
def parity(prefs):
    """dpo and qrpo from init_from for 5 steps on one process, and on 4 processes under layouts that give each
    objective tp = 2, pp = 2 and dp = 2, and qrpo cp = 2 (one set of workers for the five runs)."""
    base, objectives = prefs / "parity", {"dpo": DPO, "qrpo": QRPO}
    for name, obj in objectives.items():
        out = train_in_process(*run_args(prefs, base / name / "single", *PARITY, *obj, f"--train.init_from={prefs / 'hf'}"),
                               threads=1)
        assert out.returncode == 0, out.stderr[-3000:]
    runs = [run_args(prefs, base / name / layout, *PARITY, *objectives[name], *extra, f"--train.init_from={prefs / 'hf'}")
            for name, layouts in LAYOUTS.items() for layout, extra in layouts.items()]
    mp.spawn(_layouts_worker, args=(4, [free_port() for _ in runs], runs), nprocs=4, join=True)
    return base

@pytest.mark.parametrize("objective,layout", [(o, lay) for o, layouts in LAYOUTS.items() for lay in layouts])
def test_every_layout_gives_the_single_process_losses(parity, objective, layout):
    """The training loss within 1e-5 (relative), the margins and the validation metrics within 1e-5 (absolute:
    a validation loss near 0 is the square of a difference of log-probabilities summed in fp32)."""
    for key in ("loss", "margin", "accuracy", "val_loss", "val_margin") + (("quantile_reward",) if objective == "qrpo" else ()):
        want, got = losses(parity / objective / "single", key), losses(parity / objective / layout, key)
        assert sorted(got) == sorted(want) and want, (key, got)
        for step, value in got.items():
            scale = abs(want[step]) if key == "loss" else 1
            assert abs(value - want[step]) <= 1e-5 * scale, (key, step, value, want[step])

def test_a_resume_reuses_the_reference_under_another_layout_with_init_from_gone(parity, prefs, tmp_path):
    """The qrpo run of tp=2 x dp=2 resumed on one process from its step 3, init_from gone: the reference
    log-probabilities are read, not recomputed (the losses of steps 4 and 5 are the straight run's); a
    longer run than the reference was made for stops at its first pair without one, in one line."""
    source = parity / "qrpo" / "tp2dp2"
    shutil.copytree(source / "ckpt-00000003", tmp_path / "ckpt-00000003")
    shutil.copy(source / "reference_logps.npz", tmp_path)
    before = (tmp_path / "reference_logps.npz").read_bytes()
    out = train_in_process(*run_args(prefs, tmp_path, *PARITY, *QRPO, f"--train.init_from={tmp_path / 'gone'}",
                                     "--train.max_steps=20"), threads=1)
    assert out.returncode == 2 and "reference log-probabilities" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: a pair has no reference log-probability: a run longer than begun needs a new out_dir"]
    assert (tmp_path / "reference_logps.npz").read_bytes() == before
    want, got = losses(parity / "qrpo" / "single"), losses(tmp_path)
    assert sorted(got)[:2] == [4, 5]
    for step in (4, 5):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])

@pytest.mark.parametrize("objective", ["qrpo", "dpo"])
def test_a_short_run_learns_the_preferences(prefs, tmp_path, objective):
    """From a random tiny model: at step 1 the policy is the reference (margin 0, accuracy 0.5: ties count
    half); after 30 steps the held-out pairs' implied reward margin is positive and the accuracy >= 0.8."""
    obj = QRPO if objective == "qrpo" else DPO
    out = train_in_process(*run_args(prefs, tmp_path, *obj, "--train.max_steps=30", "--train.global_batch_size=8",
                                     "--train.micro_batch_size=8", "--train.lr=3e-3", "--train.eval_interval=30",
                                     "--data.eval_batches=4", "--train.checkpoint_interval=0"), threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    assert rows[1]["margin"] == 0 and rows[1]["accuracy"] == 0.5
    assert rows[30]["val_margin"] > 0 and rows[30]["val_accuracy"] >= 0.8, rows[30]
    assert rows[30]["val_loss"] < rows[1]["loss"]
    if objective == "qrpo":  # the data's: chosen above 0.5, rejected below
        assert 0.2 < rows[30]["quantile_reward"] < 0.8 and "quantile_reward" in rows[1]
    else:
        assert "quantile_reward" not in rows[30]

def test_objectives_refuse_the_wrong_data_in_one_line_and_dpo_needs_no_rewards(prefs, tmp_path):
    out = train_in_process(*run_args(prefs, tmp_path / "lm", "--train.max_steps=1"))
    assert out.returncode == 2 and "prefs.idx: preference pairs (train.objective dpo, qrpo)" in out.stderr
    rng = random.Random(0)
    (tmp_path / "norewards.jsonl").write_text("".join(json.dumps(preference(i, rng, rewards=False)) + "\n" for i in range(20)))
    assert prepare.main(["--preferences", str(tmp_path / "norewards.jsonl"), "--tokenizer", str(prefs / "tok"),
                         "--out", str(tmp_path / "norewards"), "--seq-len", str(SEQ)]) == 0
    args = run_args(prefs, tmp_path / "q", *QRPO, "--train.max_steps=1", f"--data.dataset={tmp_path / 'norewards'}")
    out = train_in_process(*args)
    assert out.returncode == 2 and 'train.objective = "qrpo" needs rewards and ref_rewards' in out.stderr
    out = train_in_process(*run_args(prefs, tmp_path / "d", *DPO, "--train.max_steps=2", "--train.global_batch_size=2",
                                     "--train.micro_batch_size=2", f"--data.dataset={tmp_path / 'norewards'}"))
    assert out.returncode == 0 and sorted(losses(tmp_path / "d")) == [1, 2], out.stderr[-2000:]  # dpo needs none

def test_qrpo_configs_are_apertus_and_the_8b_plan_fits_one_4_gpu_h100_node(prefs):
    import plan
    for size, lr in (("8b", 5e-7), ("70b", 1e-7)):
        t = train.load_config(os.path.join(ROOT, f"configs/apertus-{size}-qrpo.toml"))["train"]
        assert (t.objective, t.beta, t.length_normalize, t.beta_max, t.lr) == ("qrpo", 5.0, True, 0.1, lr)
        assert (t.optimizer, t.beta3, t.alpha, t.ademamix_warmup) == ("ademamix", 0.99, 8.0, t.max_steps)
    cfg = plan.load(os.path.join(ROOT, "configs/apertus-8b-qrpo.toml"), [])
    layout = plan.plan_layout(cfg)
    assert layout["gpus"] == 4 and cfg["train"].activation_checkpointing
    assert layout["stages"][True, 0][1] < plan.FIT * 80e9
    # a micro-batch of one pair holds two sequences: the activations of a micro-batch of two for lm
    pair, two = [*QRPO, "--train.micro_batch_size=1"], ["--train.micro_batch_size=2"]
    acts = [next(v for k, v in plan.memory_plan(train.load_config(str(prefs / "tiny.toml"), args), 1, 1)[0].items()
                 if k.startswith("activations")) for args in (pair, two)]
    assert acts[0] == acts[1] > 0

# ----------------------------------------------------------------------------- generation and chat
def test_generate_with_the_kv_cache_is_the_plain_path_and_transformers_greedy(tmp_path):
    from test_model import SHAPES, hf_model
    ref = hf_model(SHAPES["gqa-llama3"])
    ref.save_pretrained(tmp_path / "hf")
    ours = checkpoint.load_hf(tmp_path / "hf").eval()
    idx = torch.randint(4, 256, (2, 9))
    cached, plain = ours.generate(idx, 24, temperature=0), ours.generate(idx, 24, temperature=0, cache=False)
    want = ref.generate(idx, do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    assert cached.tolist() == plain.tolist() == want.tolist()
    # a cache continued by several tokens at once (a chat's next turn): the logits of the whole sequence
    with torch.no_grad():
        cache, full = {}, ours(cached)
        ours(cached[:, :20], cache=cache)
        assert torch.allclose(ours(cached[:, 20:27], cache=cache)[:, -1], full[:, 26], atol=1e-5)

def test_chat_answers_a_prompt_as_transformers_would(apertus_json, tmp_path, capsys):
    import chat
    cfg = transformers.ApertusConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, vocab_size=131072, max_position_embeddings=512)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(apertus_json, tmp_path / "hf" / "tokenizer.json")
    assert chat.main([str(tmp_path / "hf"), "--prompt", "Grüezi! What is 2 + 2?", "--temperature", "0",
                      "--max-new-tokens", "16", "--date", prepare.CHAT_DATE]) == 0
    got = capsys.readouterr().out
    tok = prepare.get_tokenizer(str(tmp_path / "hf"))
    ids, _ = prepare.chat_tokens(tok, [{"role": "user", "content": "Grüezi! What is 2 + 2?"}], generation_prompt=True)
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    end = tok.special["<|assistant_end|>"]
    assert got == tok.decode(new[:new.index(end)] if end in new else new) + "\n"
    assert chat.main([str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error:")
