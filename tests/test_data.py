"""data.py: shard files, prepare, the tokenizers, the DataLoader's order and its data-parallel property."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
from data import DataError, DataLoader, get_tokenizer, prepare, read_shard, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Grüezi mitenand! 你好, мир. <s> is text here. 🙂\n"


def tekken_path():
    spec = importlib.util.find_spec("mistral_common")
    path = spec and os.path.join(spec.submodule_search_locations[0], "data", "tekken_240718.json")
    if not path or not os.path.exists(path):
        pytest.skip("mistral-common (which ships tekken_240718.json) is not installed")
    return path


def corpus(tmp_path):
    """A directory tree of text files plus a .jsonl file: 12 + 30 documents."""
    docs = tmp_path / "docs"
    (docs / "sub" / "deeper").mkdir(parents=True)
    (docs / ".git").mkdir()
    (docs / ".git" / "HEAD").write_text("hidden files are skipped")
    texts = [f"document {i}: {TEXT * (i + 1)}" for i in range(12)]
    for i, t in enumerate(texts):
        (docs / ("sub" if i % 3 == 1 else "sub/deeper" if i % 3 == 2 else ".") / f"f{i:02d}.txt").write_text(t)
    lines = [f"line {i} " + TEXT * (i % 4) for i in range(30)]
    with open(tmp_path / "more.jsonl", "w") as f:
        for i, t in enumerate(lines):
            f.write(json.dumps({"text": t, "id": i}) + "\n" + ("\n" if i == 7 else ""))  # blank lines are skipped
    return [str(docs), str(tmp_path / "more.jsonl")], texts + lines


def split_documents(tokens):
    """Cut a token stream at BOS into documents, checking the BOS ... EOS frame of each."""
    starts = np.flatnonzero(tokens == data.BOS_ID).tolist() + [len(tokens)]
    assert starts[0] == 0
    docs = [tokens[a:b] for a, b in zip(starts, starts[1:])]
    assert all(d[-1] == data.EOS_ID and (d[1:-1] >= 4).all() for d in docs)
    return docs


def stream(path, split):
    return np.concatenate([read_shard(os.path.join(path, n)) for n in sorted(os.listdir(path))
                           if n.startswith(split + "_")])


# ---- shards


@pytest.mark.parametrize("dtype,high", [(np.uint16, 2**16), (np.uint32, 2**32)])
def test_shard_round_trip(tmp_path, dtype, high):
    tokens = np.random.default_rng(0).integers(0, high, size=1001, dtype=np.uint64).astype(dtype)
    write_shard(tmp_path / "a.bin", tokens)
    back = read_shard(tmp_path / "a.bin")
    assert isinstance(back, np.memmap) and back.dtype == dtype and np.array_equal(back, tokens)
    assert os.path.getsize(tmp_path / "a.bin") == 32 + tokens.nbytes
    write_shard(tmp_path / "empty.bin", np.empty(0, dtype))
    assert read_shard(tmp_path / "empty.bin").size == 0


def test_bad_shards(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=f"{path}: truncated shard: header says 100 tokens, file holds 95"):
        read_shard(path)
    path.write_bytes(raw + b"xx")
    with pytest.raises(DataError, match="corrupt shard: header says 100 tokens, file holds 101"):
        read_shard(path)
    for bad in (b"NOTASHRD" + raw[8:], raw[:20], b"", raw[:8] + b"\x07" + raw[9:], raw[:12] + b"\x03" + raw[13:]):
        path.write_bytes(bad)
        with pytest.raises(DataError, match=str(path)):
            read_shard(path)
    with pytest.raises(DataError, match="missing.bin"):
        read_shard(tmp_path / "missing.bin")


# ---- tokenizers


def test_byte_tokenizer():
    tok = get_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.name) == (260, 1, 2, 3, "byte")
    ids = tok.encode(TEXT)
    assert ids == [b + 4 for b in TEXT.encode("utf-8")]
    assert tok.encode_document(TEXT) == [1] + ids + [2]
    assert tok.decode(tok.encode_document(TEXT)) == TEXT
    assert tok.decode(torch.tensor([0, 1, 2, 3, 4 + 72, 265, 4 + 105])) == "Hi"  # specials and padding ids dropped
    assert tok.decode([4 + 0xC3]) == "\ufffd"  # half a UTF-8 character


def test_tekken_tokenizer():
    path = tekken_path()
    tok = get_tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.name) == (131072, 1, 2, "tekken_240718")
    ids = tok.encode(TEXT)
    assert min(ids) >= 1000 and max(ids) < 131072 and len(ids) < len(TEXT.encode())
    assert tok.decode(tok.encode_document(TEXT)) == TEXT
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # the reference implementation

    assert Tekkenizer.from_file(path).encode(TEXT, bos=True, eos=True) == tok.encode_document(TEXT)


def test_bad_tokenizer(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        get_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('{"config": {}}')
    with pytest.raises(DataError, match="bad.json"):
        get_tokenizer(str(tmp_path / "bad.json"))


# ---- prepare


def test_prepare(tmp_path, monkeypatch):
    inputs, texts = corpus(tmp_path)
    prepare(inputs, str(tmp_path / "w1"), val_fraction=0.3, workers=1)
    prepare(inputs, str(tmp_path / "w2"), val_fraction=0.3, workers=2, shard_tokens=500)
    monkeypatch.setattr(data, "PIECE_BYTES", 100)  # the .jsonl file in many pieces: line numbers must still match
    prepare(inputs, str(tmp_path / "w3"), val_fraction=0.3, workers=2)
    meta = json.loads((tmp_path / "w1" / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 260 and meta["dtype"] == "uint16"
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(texts) and meta["documents"]["val"] > 0
    assert len(os.listdir(tmp_path / "w2")) > 4  # small shards: several files per split
    tok = get_tokenizer("byte")
    decoded = []
    for split in ("train", "val"):
        tokens = stream(tmp_path / "w1", split)
        assert len(tokens) == meta["tokens"][split]
        assert np.array_equal(tokens, stream(tmp_path / "w2", split))  # the same for any workers and shard size
        assert np.array_equal(tokens, stream(tmp_path / "w3", split))
        docs = split_documents(tokens)
        assert len(docs) == meta["documents"][split]
        decoded += [tok.decode(d) for d in docs]
    assert sorted(decoded) == sorted(texts)
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_prepare_small_corpus_has_val(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tmp_path / "out"), val_fraction=1e-9)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == {"train": 1, "val": 1}
    assert get_tokenizer("byte").decode(stream(tmp_path / "out", "val")) == "two"  # the last document moved


def test_prepare_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=f"{bad}:3: not valid JSON"):
        prepare([str(good), str(bad)], str(tmp_path / "out"), workers=2)
    bad.write_text('{"text": "ok"}\n\n{"txt": "no text field"}\n')
    with pytest.raises(DataError, match=f'{bad}:3: .*"text"'):
        prepare([str(bad)], str(tmp_path / "out"))
    with pytest.raises(DataError, match="missing.txt: no such file"):
        prepare([str(tmp_path / "missing.txt")], str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.txt"]  # failures leave nothing behind
    prepare([str(good)], str(tmp_path / "out"))
    with pytest.raises(DataError, match="already exists"):
        prepare([str(good)], str(tmp_path / "out"))


# ---- loader


def toy_dataset(tmp_path, n_tokens=1000, shard=300):
    """Shards holding the stream 0, 1, 2, ...: a sequence's first token tells which sequence it is."""
    tokens = np.arange(n_tokens, dtype=np.uint16)
    for i, a in enumerate(range(0, n_tokens, shard)):
        write_shard(tmp_path / f"train_{i:06d}.bin", tokens[a:a + shard])
    return str(tmp_path)


def test_loader_sequences_and_determinism(tmp_path):
    path = toy_dataset(tmp_path)
    loader = DataLoader(path, "train", seq_len=16, global_batch=8, micro_batch=4, shuffle=False)
    assert loader.num_sequences == (1000 - 1) // 16
    batch = loader.get_batch(2)
    assert len(batch) == 2 and batch[0][0].shape == (4, 16) and batch[0][0].dtype == torch.int64
    x = torch.cat([mb[0] for mb in batch])
    y = torch.cat([mb[1] for mb in batch])
    starts = torch.arange(16, 24) * 16  # sequences 16..23; sequence 18 crosses the shard boundary at 300
    assert torch.equal(x, starts[:, None] + torch.arange(16)) and torch.equal(y, x + 1)
    a = DataLoader(path, "train", 16, 8, 2, seed=1)
    b = DataLoader(path, "train", 16, 8, 2, seed=1)
    c = DataLoader(path, "train", 16, 8, 2, seed=2)
    for step in (0, 5, 3):
        assert all(torch.equal(p[0], q[0]) for p, q in zip(a.get_batch(step), b.get_batch(step)))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a.get_batch(0), c.get_batch(0)))


def test_loader_data_parallel_union(tmp_path):
    path = toy_dataset(tmp_path)
    for step in (0, 1, 7, 13):  # 7 crosses an epoch boundary (62 sequences, 8 per step)
        single = torch.cat([x for x, _ in DataLoader(path, "train", 16, 8, 2, seed=3).get_batch(step)])
        for dp in (2, 4):
            ranks = [DataLoader(path, "train", 16, 8, 2, dp_rank=r, dp_size=dp, seed=3).get_batch(step)
                     for r in range(dp)]
            assert all(len(mbs) == 4 // dp for mbs in ranks)
            assert torch.equal(torch.cat([x for mbs in ranks for x, _ in mbs]), single)


def test_loader_epochs(tmp_path):
    path = toy_dataset(tmp_path, n_tokens=16 * 10 + 1, shard=1000)  # exactly 10 sequences
    loader = DataLoader(path, "train", 16, global_batch=4, micro_batch=4, seed=0)
    seen = [loader.get_batch(step)[0][0][:, 0] // 16 for step in range(10)]  # 40 samples = 4 epochs
    order = torch.cat(seen).tolist()
    epochs = [order[i:i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # every epoch is a permutation of all sequences
    assert epochs[0] != epochs[1]  # ... and a new one each epoch
    fresh = DataLoader(path, "train", 16, global_batch=4, micro_batch=4, seed=0)  # resume: only the step matters
    assert torch.equal(fresh.get_batch(7)[0][0], loader.get_batch(7)[0][0])


def test_loader_errors(tmp_path):
    path = toy_dataset(tmp_path)
    write_shard(tmp_path / "val_000000.bin", np.array([1, 5, 300, 2], dtype=np.uint16))
    with pytest.raises(DataError, match="val data holds token id 300 >= vocab_size 272 .wrong tokenizer"):
        DataLoader(path, "val", seq_len=3, global_batch=1, micro_batch=1, vocab_size=272).get_batch(0)
    with pytest.raises(DataError, match="too few"):
        DataLoader(path, "val", seq_len=4, global_batch=1, micro_batch=1)
    with pytest.raises(DataError, match="global_batch 8 must divide by dp_size 3 x micro_batch 2"):
        DataLoader(path, "train", 16, 8, 2, dp_rank=0, dp_size=3)
    with pytest.raises(DataError, match="python data.py prepare"):
        DataLoader(str(tmp_path / "nowhere"), "train", 16, 8, 2)
    with pytest.raises(DataError, match=f"{tmp_path}: no test_\\*.bin shards.*python data.py prepare"):
        DataLoader(path, "test", 16, 8, 2)


# ---- command line and demo corpus


def test_cli(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    run = [sys.executable, os.path.join(ROOT, "data.py"), "prepare"]
    ok = subprocess.run(run + [str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and os.path.exists(tmp_path / "out" / "meta.json"), ok.stderr
    bad = subprocess.run(run + [str(tmp_path / "missing"), "--out", str(tmp_path / "x")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or directory"]


def test_demo_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOAPERTUS_CACHE", str(tmp_path))
    t0 = time.time()
    path = data.demo_dataset()
    assert path == str(tmp_path / "demo-byte") and time.time() - t0 < 60
    meta = json.loads((tmp_path / "demo-byte" / "meta.json").read_text())
    assert 5e6 < meta["tokens"]["train"] < 25e6 and meta["tokens"]["val"] > 10_000
    assert os.listdir(tmp_path) == ["demo-byte"]  # the temporary corpus is gone
    x, y = DataLoader(path, "val", 256, 8, 4, vocab_size=260, shuffle=False).get_batch(0)[0]
    assert x[0, 0] == data.BOS_ID and torch.equal(x[:, 1:], y[:, :-1])
    t0 = time.time()
    assert data.demo_dataset() == path and time.time() - t0 < 1  # cached
