import base64
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

# the top-level modules are scripts in the nanoGPT way: make them importable from the tests
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONTROL = ["<|system_start|>", "<|system_end|>", "<|developer_start|>", "<|developer_end|>", "<|user_start|>",
           "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>", "<|inner_prefix|>", "<|inner_suffix|>",
           "<|tools_prefix|>", "<|tools_suffix|>"]  # ids 61..72 in the tokenizer.json of swiss-ai/Apertus-8B-2509

def train_in_process(*args, threads=None):
    """`python train.py ARGS`, run by train.main in this process (a new interpreter would spend most of a
    short run importing torch): a CompletedProcess with its exit status and what it printed. threads:
    torch's intra-op threads for the run (results are bit-identical only between runs with as many
    threads as each other: the sums are split differently)."""
    import torch
    import train
    out, err, cwd, before = io.StringIO(), io.StringIO(), os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)
    torch.set_num_threads(threads or before)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = train.main(list(map(str, args)))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(before)
    return subprocess.CompletedProcess(["train.py", *args], rc, out.getvalue(), err.getvalue())

def tekken_path():
    spec = importlib.util.find_spec("mistral_common")
    path = spec and os.path.join(spec.submodule_search_locations[0], "data", "tekken_240718.json")
    if not path or not os.path.exists(path):
        pytest.skip("mistral-common (which ships tekken_240718.json) is not installed")
    return path

@pytest.fixture(scope="session")
def apertus_json(tmp_path_factory):
    """An Apertus-style tokenizer.json in a directory of its own: its path."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with open(tekken_path(), encoding="utf-8") as f:
        tekken = json.load(f)
    n_special, vocab_size = tekken["config"]["default_num_special_tokens"], tekken["config"]["default_vocab_size"]
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in tekken["vocab"][: vocab_size - n_special]}
    spelling = bytes_to_unicode()

    def spell(b):
        return "".join(spelling[x] for x in b)

    # a merge for every split of a token into two tokens, in the order of the token's rank (ties: the parts' ranks)
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort()
    names = {0: "<unk>", 1: "<s>", 2: "</s>", **{61 + k: name for k, name in enumerate(CONTROL)}}
    specials = [names.get(i, f"<SPECIAL_{i}>") for i in range(n_special)]
    vocab = {spell(b): rank + n_special for b, rank in ranks.items()} | {s: i for i, s in enumerate(specials)}
    tok = Tokenizer(BPE(vocab, [(spell(a), spell(b)) for *_, a, b in merges], fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tekken["config"]["pattern"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    path = tmp_path_factory.mktemp("apertus") / "tokenizer.json"
    tok.save(str(path))
    return str(path)

