"""Supervised fine-tuning on conversations: prepare --chat packs them with loss masks, training puts loss
on the assistant only, and a short run learns the assistant's turns and not the user's."""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers")
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]

def conversation(i, rng):
    """A user asking about item i in random words (unpredictable); the assistant's answer follows a rule."""
    noise = " ".join("".join(rng.choice("bcdfghklmnprstvz") for _ in range(5)) for _ in range(6))
    return {"messages": [{"role": "user", "content": f"{noise} item {i}?"},
                         {"role": "assistant", "content": f"Item {i} is {COLORS[i % 8]}."}]}

@pytest.fixture(scope="module")
def sft_setup(apertus_json, tmp_path_factory):
    base = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    with open(base / "chats.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps(conversation(i, rng)) + "\n")
    cfg = transformers.ApertusConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=131072, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(base / "hf")
    shutil.copy(apertus_json, base / "hf" / "tokenizer.json")
    # the conversations, packed once by the command line, for both tests
    out = subprocess.run([sys.executable, "prepare.py", "--chat", str(base / "chats.jsonl"),
                          "--tokenizer", str(base / "hf"), "--out", str(base / "chats"), "--seq-len", "127"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return base

def prepare_chat(capsys, *args):
    """prepare.py --chat in this process: (exit status, stdout, stderr)."""
    rc = prepare.main(["--chat", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err

def test_prepare_chat_packs_whole_conversations_with_their_masks(sft_setup, tmp_path, capsys):
    tok = prepare.get_tokenizer(str(sft_setup / "hf"))
    ids_ds, mask_ds = data.IndexedDataset(str(sft_setup / "chats")), data.IndexedDataset(str(sft_setup / "chats.mask"))
    rng, k = random.Random(0), 0
    want = [prepare.chat_tokens(tok, conversation(i, rng)["messages"]) for i in range(400)]
    for s in range(len(ids_ds)):
        seq, m = ids_ds.sequence(s), mask_ds.sequence(s)
        assert len(seq) == 128
        pos = 0
        while k < len(want) and pos + len(want[k][0]) <= 128 and seq[pos] == 1:  # whole conversations, each <s>...
            assert seq[pos:pos + len(want[k][0])].tolist() == want[k][0]
            assert (m[pos:pos + len(want[k][0])] != 0).tolist() == want[k][1]
            pos, k = pos + len(want[k][0]), k + 1
        assert not m[pos:].any()  # the padding never counts
    assert k == 400
    # an over-long conversation is dropped and counted; a malformed line is one line naming it
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps(conversation(1, rng)) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "x " * 500}, {"role": "assistant", "content": "y"}]}) + "\n")
    rc, out, _ = prepare_chat(capsys, long, "--tokenizer", sft_setup / "hf", "--out", tmp_path / "long", "--seq-len", 127)
    assert rc == 0 and "1 longer than that dropped" in out
    for bad, message in (('{"messages": [{"role": "bot", "content": "hi"}]}', "bad.jsonl:2:"),
                         ("{not json", "bad.jsonl:2: not valid JSON"),
                         ('{"messages": [{"role": "user"}]}', "bad.jsonl:2: message 0 has no content")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(conversation(1, rng)) + "\n" + bad + "\n")
        rc, _, err = prepare_chat(capsys, tmp_path / "bad.jsonl", "--tokenizer", sft_setup / "hf", "--out", tmp_path / "bad")
        errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
        assert not os.path.exists(tmp_path / "bad.bin")

def role_losses(model_dir, tok, rng_seed=1, n=40):
    """Mean cross-entropy of a model on held-out conversations' assistant tokens and user tokens."""
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng, sums = random.Random(rng_seed), {"assistant": [], "user": []}
    for i in range(10_000, 10_000 + n):
        conv = conversation(i, rng)
        ids, mask = prepare.chat_tokens(tok, conv["messages"])
        user = tok.encode(conv["messages"][0]["content"])
        start = ids.index(tok.special["<|user_start|>"]) + 1
        user_mask = [False] * len(ids)
        user_mask[start:start + len(user)] = [True] * len(user)
        x = torch.tensor([ids])
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(m(x).logits[0, :-1], x[0, 1:], reduction="none")
        for role, mk in (("assistant", mask), ("user", user_mask)):
            sums[role].append(ce[torch.tensor(mk[1:])].mean().item())
    return {k: float(np.mean(v)) for k, v in sums.items()}

def test_sft_learns_the_assistant_and_not_the_user(sft_setup, tmp_path):
    hf = sft_setup / "hf"
    text = open(os.path.join(ROOT, "configs/apertus-8b-sft.toml")).read()
    (tmp_path / "sft.toml").write_text(text)
    out = subprocess.run([sys.executable, "train.py", str(tmp_path / "sft.toml"), f"--train.init_from={hf}",
                          f"--data.dataset={sft_setup / 'chats'}", f"--data.tokenizer={hf}", "--data.seq_len=127",
                          "--data.val_fraction=0.05", "--train.device=cpu", "--train.compile=false",
                          "--train.activation_checkpointing=false", "--train.global_batch_size=4",
                          "--train.micro_batch_size=4", "--train.max_steps=30", "--train.warmup_steps=3",
                          "--train.decay_steps=8", "--train.lr=3e-3", "--train.min_lr=3e-4", "--train.eval_interval=30",
                          "--train.log_interval=1", "--train.checkpoint_interval=0", f"--train.out_dir={tmp_path / 'run'}",
                          "--parallel.tp=1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    tok = prepare.get_tokenizer(str(hf))
    before, after = role_losses(hf, tok), role_losses(tmp_path / "run" / "hf", tok)
    assert after["assistant"] < 0.5 * before["assistant"], (before, after)  # learned the answers
    assert after["user"] > 0.8 * before["user"], (before, after)            # not the random questions
