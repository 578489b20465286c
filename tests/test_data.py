"""data.py and prepare.py: Megatron's indexed dataset (against an independent writer), prepare, the tokenizers, the blend
(against helpers.cpp), the loader's order, stages, resume and data-parallel property."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import types

import numpy as np
import pytest
import torch

import data
import prepare as prepare_py
import train
from conftest import tekken_path
from data import DataConfig, DataError, DataLoader, IndexedDataset
from prepare import get_tokenizer, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Grüezi mitenand! 你好, мир. <s> is text here. 🙂\n"

# ---- an independent writer of the format (the layout of Megatron-LM's megatron/core/datasets/indexed_dataset.py),
# with struct and numpy (not data.py's writer)

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}

def write_megatron(prefix, documents, dtype, version=1, gap_after=None):
    """documents: a list of documents, each a list of sequences (lists of ids). gap_after: a sequence
    after which the .bin gets 2 stray bytes (the pointers then leave a gap)."""
    prefix, dtype = str(prefix), np.dtype(dtype)
    sequences = [np.asarray(s, dtype=dtype.newbyteorder("<")) for doc in documents for s in doc]
    lengths, pointers, doc_idx, blob = [], [], [0], b""
    for k, s in enumerate(sequences):
        lengths.append(len(s))
        pointers.append(len(blob))
        blob += s.tobytes() + (b"\0\0" if k == gap_after else b"")
    for doc in documents:
        doc_idx.append(doc_idx[-1] + len(doc))
    with open(prefix + ".bin", "wb") as f:
        f.write(blob)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", version))
        f.write(struct.pack("<B", CODES[dtype.type]))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))
    return prefix

def stream_source(tmp_path, name, n_tokens, dtype=np.uint16, doc=97):
    """A source whose token stream is offset, offset+1, ...: a window's first token tells which one it is."""
    tokens = np.arange(n_tokens) % 60000
    return write_megatron(tmp_path / name, [[tokens[a:a + doc]] for a in range(0, n_tokens, doc)], dtype)

# ---- the format

@pytest.mark.parametrize("dtype,high", [(np.uint16, 2**16), (np.int32, 2**31)])
def test_reads_every_document_of_an_independent_writer(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, high, size=rng.integers(0, 50)).tolist() for _ in range(rng.integers(1, 4))]
            for _ in range(200)]  # 1 to 3 sequences per document, some empty
    prefix = write_megatron(tmp_path / "ds", docs, dtype)
    ds = IndexedDataset(prefix, vocab_size=high)
    assert ds.dtype == dtype and ds.num_documents == 200 and len(ds) == sum(map(len, docs))
    k = 0
    for d, doc in enumerate(docs):
        assert ds.document(d).tolist() == [t for s in doc for t in s]
        for s in doc:
            assert ds.sequence(k).tolist() == s
            k += 1

@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_our_writer_writes_the_same_bytes(tmp_path, dtype):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 60000, size=rng.integers(0, 300)) for _ in range(100)]
    write_megatron(tmp_path / "theirs", [[d.tolist()] for d in docs], dtype)
    with data.IndexedDatasetWriter(str(tmp_path / "ours"), dtype) as w:
        for d in docs[:40]:
            w.add_document(d)
        w.add_documents(np.concatenate(docs[40:]), [len(d) for d in docs[40:]])
    for ext in (".idx", ".bin"):
        assert (tmp_path / ("ours" + ext)).read_bytes() == (tmp_path / ("theirs" + ext)).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["ours.bin", "ours.idx", "theirs.bin", "theirs.idx"]  # no temp files

def corrupt(tmp_path, what):
    prefix = write_megatron(tmp_path / "ds", [[list(range(5, 105))], [list(range(7, 57))]], np.uint16)
    idx, bin_ = tmp_path / "ds.idx", tmp_path / "ds.bin"
    raw = idx.read_bytes()
    if what == "version":
        idx.write_bytes(raw[:9] + struct.pack("<Q", 2) + raw[17:])
    elif what == "code":
        idx.write_bytes(raw[:17] + b"\x09" + raw[18:])
    elif what == "float":
        idx.write_bytes(raw[:17] + b"\x07" + raw[18:])
    elif what == "narrow":  # uint8 ids cannot hold a 260-id vocabulary
        idx.write_bytes(raw[:17] + b"\x01" + raw[18:])
    elif what == "magic":
        idx.write_bytes(b"NOTANIDX\x00" + raw[9:])
    elif what == "short idx":
        idx.write_bytes(raw[:-5])
    elif what == "short header":  # the magic and part of the header
        idx.write_bytes(raw[:20])
    elif what == "short bin":
        bin_.write_bytes(bin_.read_bytes()[:-10])
    elif what == "long bin":
        bin_.write_bytes(bin_.read_bytes() + b"xx")
    elif what == "no bin":
        bin_.unlink()
    elif what == "no idx":
        idx.unlink()
    return prefix

@pytest.mark.parametrize("what,file,message", [
    ("version", "idx", "unknown index version 2"),
    ("code", "idx", "unknown dtype code 9"),
    ("float", "idx", "holds float32 values, not token ids"),
    ("narrow", "idx", "dtype uint8 cannot hold the ids of a vocabulary of 260"),
    ("magic", "idx", "not a Megatron indexed dataset"),
    ("short idx", "idx", "truncated index"),
    ("short header", "idx", "truncated index: 20 bytes, shorter than the 34-byte header"),
    ("short bin", "bin", "truncated token file: its index says 300 bytes, the file holds 290"),
    ("long bin", "bin", "corrupt token file"),
    ("no bin", "idx", "its token file .*ds.bin is missing"),
    ("no idx", "idx", "cannot read the index .*python prepare.py"),
])
def test_a_bad_dataset_is_one_line_of_error_naming_the_file(tmp_path, what, file, message):
    prefix = corrupt(tmp_path, what)
    with pytest.raises(DataError, match=f"^{re.escape(prefix)}.{file}: {message}") as e:
        IndexedDataset(prefix, vocab_size=260)
    assert "\n" not in str(e.value)

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
    assert prepare_py.token_dtype(tok.vocab_size) == np.int32 and prepare_py.token_dtype(260) == np.uint16
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # the reference implementation

    assert Tekkenizer.from_file(path).encode(TEXT, bos=True, eos=True) == tok.encode_document(TEXT)

def test_bad_tokenizer(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        get_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('{"config": {}}')
    with pytest.raises(DataError, match="bad.json"):
        get_tokenizer(str(tmp_path / "bad.json"))

# ---- prepare

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

def test_prepare(tmp_path, monkeypatch):
    inputs, texts = corpus(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    counts = prepare(inputs, str(out / "w1"), workers=1)
    prepare(inputs, str(out / "w2"), workers=2)
    monkeypatch.setattr(prepare_py, "PIECE_BYTES", 100)  # the .jsonl file in many pieces: line numbers must still match
    prepare(inputs, str(out / "w3"), workers=2)
    for ext in (".idx", ".bin"):  # the same bytes for any number of workers and pieces
        assert (out / f"w1{ext}").read_bytes() == (out / f"w2{ext}").read_bytes() == (out / f"w3{ext}").read_bytes()
    ds = IndexedDataset(str(out / "w1"), vocab_size=260)
    assert ds.dtype == np.uint16 and len(ds) == ds.num_documents == len(texts) == counts["documents"]
    assert ds.doc_indices(0, len(texts) + 1).tolist() == list(range(len(texts) + 1))
    assert ds.num_tokens == counts["tokens"]
    tok = get_tokenizer("byte")
    docs = [ds.document(d) for d in range(ds.num_documents)]
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id and (d[1:-1] >= 4).all() for d in docs)
    assert sorted(tok.decode(d) for d in docs) == sorted(texts)
    assert tok.decode(docs[-1]) == texts[-1]  # input order: the .jsonl file came last
    assert sorted(os.listdir(out)) == ["w1.bin", "w1.idx", "w2.bin", "w2.idx", "w3.bin", "w3.idx"]

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
    with pytest.raises(DataError, match="out.idx: already exists"):
        prepare([str(good)], str(tmp_path / "out"))

def test_cli(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    run = [sys.executable, os.path.join(ROOT, "prepare.py")]
    ok = subprocess.run(run + [str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{tmp_path / 'out'}: 7 tokens, 1 documents", ok.stderr
    bad = subprocess.run(run + [str(tmp_path / "missing"), "--out", str(tmp_path / "x")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or directory"]

def chat_tokenizer(path):
    """A byte-level tokenizer.json with Apertus' chat control tokens and no merges: <unk> <s> </s>, the
    eight control tokens, then the 256 bytes."""
    spell, specials = prepare_py._gpt2_byte_spelling(), ["<unk>", "<s>", "</s>", *prepare_py.CHAT_CONTROL]
    vocab = {t: i for i, t in enumerate(specials)} | {spell[b]: len(specials) + b for b in range(256)}
    path.write_text(json.dumps({
        "normalizer": None, "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(specials)],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\s+|\S+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
        "model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    return str(path)

def test_prepare_chat_makes_its_directory_never_overwrites_and_blames_the_right_thing(tmp_path):
    tokenizer, chats = chat_tokenizer(tmp_path / "tok.json"), tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    chats.write_text(json.dumps(good) + "\n")
    out = tmp_path / "new" / "dir" / "chats"  # in a directory that does not exist yet, as plain prepare allows
    run = [sys.executable, os.path.join(ROOT, "prepare.py"), "--chat", str(chats), "--tokenizer", tokenizer,
           "--seq-len", "511", "--out", str(out)]
    ok = subprocess.run(run, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    files = ["chats.bin", "chats.idx", "chats.mask.bin", "chats.mask.idx"]
    assert sorted(os.listdir(out.parent)) == files
    before = [(out.parent / n).read_bytes() for n in files]
    again = subprocess.run(run, capture_output=True, text=True)  # refused, as plain prepare refuses
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {out}.idx: already exists; remove it or choose another --out"]
    assert [(out.parent / n).read_bytes() for n in files] == before
    (tmp_path / "a.txt").write_text("text")
    for name in ("chats.idx", "chats.bin"):  # nor does either write a dataset beside a stale loss mask
        os.remove(out.parent / name)
    for make in (lambda: prepare([str(tmp_path / "a.txt")], str(out)),
                 lambda: prepare_py.prepare_chat(str(chats), str(out), tokenizer, 511)):
        with pytest.raises(DataError, match=f"^{re.escape(str(out))}.mask.idx: already exists"):
            make()
    chats.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(chats))}:2: message 0 has no content$"):
        prepare_py.prepare_chat(str(chats), str(tmp_path / "c2"), tokenizer, 511)
    with pytest.raises(DataError, match=r"^tokenizer byte has no <\|system_start\|> token; chat data needs Apertus'"):
        prepare_py.prepare_chat(str(chats), str(tmp_path / "c3"), "byte", 511)  # the tokenizer's fault, not line 1's
    assert not any(n.startswith(("c2", "c3")) for n in os.listdir(tmp_path))

def test_demo_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOAPERTUS_CACHE", str(tmp_path))
    t0 = time.time()
    prefix = prepare_py.demo_dataset()
    assert prefix == str(tmp_path / "demo-byte") and time.time() - t0 < 60
    assert sorted(os.listdir(tmp_path)) == ["demo-byte.bin", "demo-byte.idx"]  # the temporary corpus is gone
    ds = IndexedDataset(prefix, vocab_size=260)
    assert 5e6 < ds.num_tokens < 25e6 and ds.num_documents > 500
    loader = DataLoader(data.stage_table(DataConfig(dataset=prefix), 8), 256, 8, 4, vocab_size=260)
    b = loader.val_batches(0, 0)[0]
    assert torch.equal(b.x[:, 1:], b.y[:, :-1]) and b.loss_mask is None and loader.sources[0].num_val > 100
    t0 = time.time()
    assert prepare_py.demo_dataset() == prefix and time.time() - t0 < 1  # cached

# ---- the blend against Megatron-LM

def normalize(weights):
    """megatron/core/datasets/utils.py normalize()."""
    w = np.array(weights, dtype=np.float64)
    w_sum = np.sum(w)
    w = (w / w_sum).tolist()
    return w

def build_blending_indices(weights, size):
    """helpers.cpp build_blending_indices, transcribed line by line, on the weights BlendedDataset hands it:
    normalize()d by BlendedMegatronDatasetBuilder.build, then again in BlendedDataset.__init__."""
    weights = normalize(normalize(weights))
    num_datasets = len(weights)
    dataset_index, dataset_sample_index = [0] * size, [0] * size
    current_samples = [0] * num_datasets
    for sample_idx in range(size):
        sample_idx_double = max(float(sample_idx), 1.0)
        max_error_index = 0
        max_error = weights[0] * sample_idx_double - float(current_samples[0])
        for dataset_idx in range(1, num_datasets):
            error = weights[dataset_idx] * sample_idx_double - float(current_samples[dataset_idx])
            if error > max_error:
                max_error = error
                max_error_index = dataset_idx
        dataset_index[sample_idx] = max_error_index
        dataset_sample_index[sample_idx] = current_samples[max_error_index]
        current_samples[max_error_index] += 1
    return dataset_index, dataset_sample_index

# [6.4, 0.5, 7.4, 4.7]: normalised twice, as Megatron does, two weights move by one bit and the order of
# sources differs from sample 19 on from that of weights normalised once
WEIGHT_SETS = [[0.7, 0.3], [1, 1, 1], [0.5, 0.3, 0.2], [3, 1, 0.01, 7, 2], [0.1] * 10, [2], [6.4, 0.5, 7.4, 4.7]]

@pytest.mark.parametrize("weights", WEIGHT_SETS + [np.random.default_rng(4).random(8).tolist()])
def test_blend_is_megatrons(weights):
    want = build_blending_indices(weights, 20_000)
    w = data.blend_weights(weights)
    got, taken, first = ([], []), [0] * len(w), 0
    for count in np.random.default_rng(0).integers(1, 700, size=100):  # continued from the counts, in pieces
        count = min(int(count), 20_000 - first)
        sources, places = data.blend(w, taken, first, count)
        got[0].extend(sources)
        got[1].extend(places)
        first += count
    assert first == 20_000 and got == want

def loader(stages, tmp_path, G=10, m=2, rank=0, dp=1, seed=0, **kw):
    return DataLoader(stages, 16, G, m, dp_rank=rank, dp_size=dp, seed=seed, vocab_size=60000, **kw)

@pytest.mark.parametrize("weights", [[0.7, 0.3], [6.4, 0.5, 7.4, 4.7]])
def test_the_loaders_sources_follow_megatron_and_every_prefix_keeps_the_weights(tmp_path, weights):
    names = ["web", "code", "math", "wiki"][:len(weights)]
    load = loader([(0, [(n, stream_source(tmp_path, n, 5000 - 500 * k), w)
                        for k, (n, w) in enumerate(zip(names, weights))])], tmp_path)
    order = torch.cat([mb.source for step in range(100) for mb in load.get_batch(step)]).tolist()
    assert order == build_blending_indices(weights, 1000)[0]
    counts = np.cumsum(np.eye(len(weights), dtype=int)[order], axis=0)  # [1000, S]: samples of each source by prefix
    expected = np.outer(np.arange(1, 1001), np.array(weights) / sum(weights))
    assert np.abs(counts - expected).max() <= 1
    assert load.tokens_seen(100) == {n: int(c) * 16 for n, c in zip(names, counts[-1])}

# ---- order, resume, layouts, stages

def first_tokens(batches):
    return torch.cat([mb.x[:, 0] for mb in batches])

def test_epochs_are_fresh_permutations_and_validation_is_held_out(tmp_path):
    prefix = stream_source(tmp_path, "a", 16 * 12 + 1)  # 12 samples: 11 train + 1 validation at 0.05
    load = loader([(0, [("a", prefix, 1.0)])], tmp_path, G=11, m=11, val_fraction=0.05)
    assert (load.sources[0].num_train, load.sources[0].num_val) == (11, 1)
    epochs = [(first_tokens(load.get_batch(step)) // 16).tolist() for step in range(4)]  # G = n: one epoch a step
    assert all(sorted(e) == list(range(11)) for e in epochs) and len({tuple(e) for e in epochs}) == 4
    val = load.val_batches(0, 0)
    assert (first_tokens(val) // 16).tolist() == [11] * 11  # the held-out sample, in order (repeated here)
    other = loader([(0, [("a", prefix, 1.0)])], tmp_path, G=11, m=11, val_fraction=0.05, seed=1)
    assert (first_tokens(other.get_batch(0)) // 16).tolist() != epochs[0]
    b = load.get_batch(0)[0]
    assert torch.equal(b.y, b.x + 1) and b.x.dtype == torch.int64 and b.loss_mask is None

@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 255, 1000, 4097])
def test_permute_is_a_bijection(n):
    key = np.array([1, 2, 3, 4], dtype=np.uint64)
    p = data.permute(np.arange(n), n, key)
    assert sorted(p.tolist()) == list(range(n)) and np.array_equal(p, data.permute(np.arange(n), n, key))

def test_the_order_of_a_trillion_samples_is_computed_in_constant_memory():
    n = 10**12  # train samples: 4 PB of tokens at seq_len 4,096, far past Apertus' 3.7 billion sequences
    fake = types.SimpleNamespace(name="web", num_train=n)  # all of a Source that train_samples reads
    positions = np.concatenate([np.arange(n - 5000, n + 5000), np.arange(3 * n - 10, 3 * n)])  # epochs 0, 1, 2
    tracemalloc.start()
    t0 = time.perf_counter()
    got = data.Source.train_samples(fake, positions, seed=0)
    seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 5 and peak < 4 << 20, (seconds, peak)  # arrays of the 10,010 positions, nothing of n
    assert ((0 <= got) & (got < n)).all()
    for epoch in (0, 1, 2):  # one-to-one within each epoch, a new order in each
        at = positions // n == epoch
        assert len(np.unique(got[at])) == at.sum()
    assert not np.array_equal(got[:5000], got[5000:10000])
    assert np.array_equal(got[::7], data.Source.train_samples(fake, positions[::7], seed=0))  # a pure function

def test_resume_at_any_step_under_any_layout_across_stages(tmp_path):
    a, b, c = (stream_source(tmp_path, n, k) for n, k in (("a", 3000), ("b", 2000), ("c", 1500)))
    stages = [(0, [("a", a, 0.7), ("b", b, 0.3)]), (4, [("b", b, 0.5), ("c", c, 0.5)]),
              (9, [("a", a, 1.0), ("c", c, 2.0), ("b", b, 0.2)])]
    G, steps = 8, 14
    straight = loader(stages, tmp_path, G=G)
    want = [first_tokens(straight.get_batch(s)) for s in range(steps)]
    seen = [straight.tokens_seen(s) for s in range(steps + 1)]
    assert sum(seen[steps].values()) == steps * G * 16 and seen[4]["c"] == 0 and seen[5]["c"] > 0
    # stage 2 continues sources a and b where they stopped, and starts a fresh blend of its own weights
    stage2 = [int(s) for step in range(4, 9) for mb in straight.get_batch(step) for s in mb.source]
    assert stage2 == [[1, 2][i] for i in build_blending_indices([0.5, 0.5], 5 * G)[0]]
    for start in range(steps):
        for dp in (1, 2, 4):
            fresh = [loader(stages, tmp_path, G=G, rank=r, dp=dp) for r in range(dp)]  # recomputes the cursor
            saved = [loader(stages, tmp_path, G=G, rank=r, dp=dp) for r in range(dp)]  # continues from a state
            for s in saved:
                s.load_state(json.loads(json.dumps(straight.state(start))))
            for step in range(start, steps):
                for ranks in (fresh, saved):
                    assert torch.equal(torch.cat([first_tokens(r.get_batch(step)) for r in ranks]), want[step])
                assert fresh[0].tokens_seen(step + 1) == saved[-1].tokens_seen(step + 1) == seen[step + 1]

def test_a_cursor_continues_a_new_stage_and_one_from_another_table_is_ignored(tmp_path):
    a, b = stream_source(tmp_path, "a", 3000), stream_source(tmp_path, "b", 3000)
    one = loader([(0, [("a", a, 0.7), ("b", b, 0.3)])], tmp_path)
    state = one.state(5)
    later = [(0, [("a", a, 0.7), ("b", b, 0.3)]), (5, [("b", b, 1.0)])]  # a stage added from step 5 on
    resumed, fresh = loader(later, tmp_path), loader(later, tmp_path)
    assert resumed.load_state(state) and resumed.tokens_seen(5) == one.tokens_seen(5)
    assert torch.equal(first_tokens(resumed.get_batch(5)), first_tokens(fresh.get_batch(5)))
    assert all(int(s) == 1 for mb in resumed.get_batch(5) for s in mb.source)
    for other in ([(0, [("a", a, 0.6), ("b", b, 0.4)])], 10), (later, 20):  # other weights; another batch
        resumed, fresh = loader(*other[:1], tmp_path, G=other[1]), loader(*other[:1], tmp_path, G=other[1])
        assert not resumed.load_state(state)  # ignored: the order stays that of the current table
        assert torch.equal(first_tokens(resumed.get_batch(7)), first_tokens(fresh.get_batch(7)))

def test_packed_source_brings_its_loss_mask(tmp_path):
    T = 16
    rng = np.random.default_rng(0)
    seqs = [list(range(1000 * k, 1000 * k + T + 1)) for k in range(20)]
    masks = [rng.integers(0, 2, size=T + 1).tolist() for _ in seqs]
    packed = write_megatron(tmp_path / "chat", [[s] for s in seqs], np.int32)
    write_megatron(tmp_path / "chat.mask", [[m] for m in masks], np.uint8)
    plain = stream_source(tmp_path, "web", 3000)
    load = DataLoader([(0, [("web", plain, 0.5), ("chat", packed, 0.5)])], T, 8, 4, vocab_size=60000)
    assert load.sources[1].num_train == 19
    for step in range(5):
        for mb in load.get_batch(step):
            for x, y, lm, src in zip(mb.x, mb.y, mb.loss_mask, mb.source):
                assert torch.equal(y[:-1], x[1:])
                if src == 1:
                    k = int(x[0]) // 1000
                    assert x.tolist() == seqs[k][:-1] and lm.tolist() == [bool(v) for v in masks[k][1:]]
                else:
                    assert lm.all()
    assert DataLoader([(0, [("web", plain, 1.0)])], T, 8, 4).get_batch(0)[0].loss_mask is None
    val = load.val_batches(1, 0)[0]
    assert (val.x[:, 0] == 19000).all() and val.loss_mask.tolist()[0] == [bool(v) for v in masks[19][1:]]
    write_megatron(tmp_path / "chat", [[s[:T]] for s in seqs], np.int32)  # one token short
    with pytest.raises(DataError, match=r"chat.idx: sequence \d+ holds 16 tokens; a packed source needs seq_len \+ 1 = 17"):
        DataLoader([(0, [("chat", packed, 1.0)])], T, 8, 4).get_batch(0)

def test_loader_errors(tmp_path):
    prefix = stream_source(tmp_path, "a", 1000)
    stages = [(0, [("a", prefix, 1.0)])]
    write_megatron(tmp_path / "oov", [[[1, 5, 300, 2] * 20]], np.uint16)
    with pytest.raises(DataError, match="oov.bin: holds token id 300 >= vocab_size 272 .wrong tokenizer"):
        DataLoader([(0, [("oov", str(tmp_path / "oov"), 1.0)])], 3, 1, 1, vocab_size=272).get_batch(0)
    write_megatron(tmp_path / "neg", [[[1, 5, -3, 2] * 20]], np.int32)
    with pytest.raises(DataError, match="neg.bin: holds a negative token id -3"):
        DataLoader([(0, [("neg", str(tmp_path / "neg"), 1.0)])], 3, 1, 1, vocab_size=272).get_batch(0)
    with pytest.raises(DataError, match="holds 0 samples of seq_len 2000 .* too few for training and validation"):
        DataLoader(stages, 2000, 1, 1)
    with pytest.raises(DataError, match="global_batch 8 must divide by dp_size 3 x micro_batch 2"):
        DataLoader(stages, 16, 8, 2, dp_rank=0, dp_size=3)
    with pytest.raises(DataError, match="nowhere.idx: cannot read the index .*python prepare.py"):
        DataLoader([(0, [("x", str(tmp_path / "nowhere"), 1.0)])], 16, 8, 2)
    with pytest.raises(DataError, match="stages must start at step 0"):
        DataLoader([(3, [("a", prefix, 1.0)])], 16, 8, 2)
    gap = write_megatron(tmp_path / "gap", [[list(range(100))]] * 900, np.uint16, gap_after=450)
    with pytest.raises(DataError, match="gap.idx: sequences 450 and 451 do not follow each other in .*gap.bin"):
        DataLoader([(0, [("gap", gap, 1.0)])], 16, 8, 2)

# ---- a staged run of train.py

STAGES = [[0, [("code", 0.8), ("docs", 0.2)]], [20, [("code", 0.3), ("docs", 0.7)]]]  # the boundary inside the run
STAGED_RUN = [  # configs/tiny-stages.toml, smaller (2 layers, 16 x 64 tokens a step) and shorter: about 20 s
    "--data.stages=[" + ", ".join(f"{{start_step={start}, sources=[" + ", ".join(
        f'{{name="{n}", prefix="demo:{n}", weight={w}}}' for n, w in sources) + "]}" for start, sources in STAGES) + "]",
    "--model.num_hidden_layers=2", "--data.seq_len=64", "--train.global_batch_size=16", "--train.micro_batch_size=8",
    "--train.eval_interval=10", "--train.log_interval=1", "--train.checkpoint_interval=15", "--train.sample_tokens=0",
    "--train.warmup_steps=5", "--train.decay_start=30", "--train.decay_steps=10"]  # the lr not tied to max_steps

def staged_run(out_dir, max_steps):
    train.run(train.load_config(os.path.join(ROOT, "configs/tiny-stages.toml"),
                                STAGED_RUN + [f"--train.max_steps={max_steps}", f"--train.out_dir={out_dir}"]))
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))}

@pytest.fixture
def one_thread():
    """One intra-op thread: on CPU cores that other jobs share, two threads wait for each other at every
    barrier (the straight run took 29 s with two, 17 s with one, beside two busy processes on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def test_a_staged_run_learns_every_source_counts_its_tokens_and_resumes_across_the_boundary(tmp_path, capsys,
                                                                                            one_thread):
    G, T = 16, 64
    straight = staged_run(tmp_path / "straight", 40)
    # tokens/<source>: every step's samples counted, as Megatron's blend of each stage hands them out
    assert all(straight[s]["tokens/code"] + straight[s]["tokens/docs"] == s * G * T for s in range(1, 41))
    first, second = (build_blending_indices([w for _, w in sources], 20 * G)[0] for _, sources in STAGES)
    assert straight[20]["tokens/code"] == first.count(0) * T == 0.8 * 20 * G * T  # the first stage, 0.8 code
    assert straight[40]["tokens/code"] - straight[20]["tokens/code"] == second.count(0) * T == 0.3 * 20 * G * T
    # both sources' held-out losses fall, before and after the switch
    assert [s for s in sorted(straight) if "val_loss" in straight[s]] == [10, 20, 30, 40]
    for name in ("code", "docs"):
        assert straight[40][f"val_loss/{name}"] < straight[10][f"val_loss/{name}"] - 0.1, name
    # a run stopped at step 15, before the boundary, and resumed past it with its checkpoint's data cursor; a
    # new run from the checkpoint of step 30 without one (the cursor recomputed from step 0, through both
    # stages): the same losses, bit for bit, and the same counts as the uninterrupted run
    assert sorted(staged_run(tmp_path / "stopped", 15)) == list(range(1, 16))
    ckpt = tmp_path / "from-30" / "ckpt-00000030"
    shutil.copytree(tmp_path / "straight" / ckpt.name, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "data_state": None}))
    for out_dir, step in ((tmp_path / "stopped", 15), (ckpt.parent, 30)):
        capsys.readouterr()
        resumed = staged_run(out_dir, 40)
        assert f"resumed from {out_dir / f'ckpt-{step:08d}'} at step {step}" in capsys.readouterr().out
        assert sorted(resumed) == list(range(1 if step == 15 else 31, 41))
        for s in resumed:
            for key in ("loss", "tokens/code", "tokens/docs"):
                assert resumed[s][key] == straight[s][key], (step, s, key)

# ---- configuration

def test_data_config(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("""
[data]
seq_len = 16
val_fraction = 0.05
[[data.stages]]
start_step = 0
sources = [{name = "web", prefix = "data/web", weight = 1}]
[[data.stages]]
start_tokens = 1000
sources = [{name = "web", prefix = "data/web", weight = 0.6}, {name = "math", prefix = "data/math", weight = 0.4}]
""")
    cfg = train.load_config(str(toml))["data"]
    # 1000 tokens at 4 x 16 per step: the stage starts at step 16 (the first that begins at or past them)
    assert data.stage_table(cfg, 4) == [(0, [("web", "data/web", 1.0)]),
                                        (16, [("web", "data/web", 0.6), ("math", "data/math", 0.4)])]
    assert data.stage_table(DataConfig(dataset="x/mine"), 4) == [(0, [("mine", "x/mine", 1.0)])]
    mix = [{"name": "a", "prefix": "p", "weight": 2}, {"name": "b", "prefix": "q", "weight": 1.5}]
    assert data.stage_table(DataConfig(sources=mix), 4) == [(0, [("a", "p", 2.0), ("b", "q", 1.5)])]
    bad = [(dict(sources=mix, dataset="d"), "set only one of data.dataset, data.sources and data.stages"),
           (dict(sources=[{"name": "a", "prefix": "p"}]), r"data.sources\[0\] must be a table with exactly name"),
           (dict(sources=[{"name": "a b", "prefix": "p", "weight": 1}]), r"data.sources\[0\].name must be"),
           (dict(sources=[mix[0], mix[0]]), r"data.sources\[1\].name must be a unique name"),
           (dict(sources=[{**mix[0], "weight": -1}]), r"data.sources\[0\].weight must be a positive number"),
           (dict(stages=[{"start_step": 0}]), r"data.stages\[0\].sources must be a non-empty list"),
           (dict(stages=[{"sources": mix}]), r"data.stages\[0\] needs one of start_step or start_tokens"),
           (dict(stages=[{"start_step": 0, "sources": mix}, {"start_step": 5, "sources": [{**mix[0], "prefix": "o"}]}]),
            r"data.stages\[1\].sources\[0\]: source 'a' has prefix 'o' here and 'p' elsewhere"),
           (dict(val_fraction=1.0), "data.val_fraction must be in")]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            DataConfig(**kw)
    with pytest.raises(DataError, match=r"data.stages\[1\] starts at step 0"):
        data.stage_table(DataConfig(stages=[{"start_step": 0, "sources": mix}, {"start_tokens": 0, "sources": mix}]), 4)

def test_min_doc_tokens_trains_exactly_as_a_dataset_of_the_kept_documents(tmp_path, monkeypatch):
    """A source with min_doc_tokens = N reads the documents of at least N tokens back to back, in their
    order: the same batches (blended, across a stage boundary, resumed) and validation samples as a dataset
    written with those documents alone. Documents of several sequences count their sequences together;
    the lengths are read a chunk of documents at a time (3 here)."""
    rng = np.random.default_rng(0)
    docs = [[rng.integers(3, 60000, rng.integers(1, 25)) for _ in range(rng.integers(1, 4))] for _ in range(300)]
    N = 40
    kept = [d for d in docs if sum(map(len, d)) >= N]
    assert 30 < len(kept) < len(docs) - 30
    full, only = write_megatron(tmp_path / "full", docs, np.uint16), write_megatron(tmp_path / "only", kept, np.uint16)
    other = stream_source(tmp_path, "other", 3000)
    monkeypatch.setattr(data.Source, "_keep", lambda self, n, chunk=3, keep=data.Source._keep: keep(self, n, chunk))
    for stages in ([(0, [("long", full, 1.0, N)])], [(0, [("long", full, 0.6, N), ("other", other, 0.4)]),
                                                      (3, [("other", other, 0.5), ("long", full, 0.5, N)])]):
        same = [(start, [(n, only if p == full else p, w) for n, p, w, *_ in sources]) for start, sources in stages]
        a, b = loader(stages, tmp_path), loader(same, tmp_path)
        assert (a.sources[0].num_train, a.sources[0].num_val) == (b.sources[0].num_train, b.sources[0].num_val)
        for step in range(8):
            for x, y in zip(a.get_batch(step), b.get_batch(step)):
                assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and torch.equal(x.source, y.source)
        assert all(torch.equal(x.x, y.x) for x, y in zip(a.val_batches(0, 1), b.val_batches(0, 1)))
        resumed = loader(stages, tmp_path)
        assert resumed.load_state(a.state(5))
        assert all(torch.equal(x.x, y.x) for x, y in zip(resumed.get_batch(5), b.get_batch(5)))
    with pytest.raises(DataError, match=r"^source 'long': min_doc_tokens = 1000 keeps no document of .*full.idx$"):
        loader([(0, [("long", full, 1.0, 1000)])], tmp_path)
    cfg = train.load_config(os.path.join(ROOT, "configs/tiny.toml"), [
        '--data.sources=[{name="long",prefix="p",weight=1,min_doc_tokens=4096}]'])["data"]
    assert data.stage_table(cfg, 4) == [(0, [("long", "p", 1.0, 4096)])]
    for value, message in ((0, r"data.sources\[0\].min_doc_tokens must be a positive integer, got 0"),
                           ("many", r"data.sources\[0\].min_doc_tokens must be a positive integer, got 'many'")):
        with pytest.raises(ValueError, match=message):
            DataConfig(sources=[{"name": "a", "prefix": "p", "weight": 1, "min_doc_tokens": value}])
    with pytest.raises(ValueError, match=r"data.stages\[1\].sources\[0\]: source 'a' has min_doc_tokens 9 here and 0"):
        DataConfig(stages=[{"start_step": 0, "sources": [{"name": "a", "prefix": "p", "weight": 1}]},
                           {"start_step": 5, "sources": [{"name": "a", "prefix": "p", "weight": 1, "min_doc_tokens": 9}]}])
