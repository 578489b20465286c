"""The model against the reference: the Apertus model of Hugging Face transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import model as model_py
from model import Apertus, ModelConfig, attention, document_ids, make_block_mask, sdpa_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SHAPES = {  # (hidden, ff, layers, heads, kv_heads, head_dim, vocab, rope_scaling)
    "mha": (64, 96, 2, 4, 4, 16, 128, None),
    "gqa-llama3": (64, 160, 2, 8, 2, 8, 256, LLAMA3),
    "mqa": (48, 64, 2, 6, 1, 8, 100, LLAMA3),
    "odd": (36, 75, 3, 3, 3, 12, 97, None),
}

def hf_model(shape, seed=0):
    """A transformers Apertus with every tensor random: norms, QK-norms and xIELU scalars included."""
    d, ff, L, H, KV, D, V, rope = shape
    rp = {"rope_type": "default", "rope_theta": 10000.0} if rope is None else {**rope, "rope_theta": 50000.0}
    cfg = transformers.ApertusConfig(hidden_size=d, intermediate_size=ff, num_hidden_layers=L,
                                     num_attention_heads=H, num_key_value_heads=KV, head_dim=D,
                                     vocab_size=V, max_position_embeddings=256, rope_parameters=rp)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "act_fn" in name else 0.15) + ("norm" in name))
    return m.eval()

def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

@pytest.mark.parametrize("shape", list(SHAPES))
def test_load_hf_and_save_hf_match_transformers(shape, tmp_path):
    ref = hf_model(SHAPES[shape])
    ref.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, SHAPES[shape][6], (2, 40))
    with torch.no_grad():
        want = ref(ids).logits
    ours = checkpoint.load_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        got = ours(ids)
    assert rel_err(got, want) < 1e-5
    checkpoint.save_hf(ours, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-5

def test_a_save_split_into_files_roundtrips_and_transformers5_config(tmp_path):
    ref = hf_model(SHAPES["gqa-llama3"])
    ref.save_pretrained(tmp_path / "hf")
    ours = checkpoint.load_hf(tmp_path / "hf")
    checkpoint.save_hf(ours, tmp_path / "split", max_file_bytes=20_000)
    files = os.listdir(tmp_path / "split")
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 3
    cfg = json.load(open(tmp_path / "split" / "config.json"))
    assert cfg["model_type"] == "apertus" and cfg["rope_scaling"]["rope_type"] == "llama3"
    # the transformers 5 spelling: one rope_parameters dict
    cfg["rope_parameters"] = {**cfg.pop("rope_scaling"), "rope_theta": cfg.pop("rope_theta")}
    json.dump(cfg, open(tmp_path / "split" / "config.json", "w"))
    again = checkpoint.load_hf(tmp_path / "split")
    assert again.config == ours.config
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
        assert rel_err(ours(ids), ref(ids).logits) < 1e-5

def test_packed_documents_match_documents_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=50, rope_scaling=None, rope_theta=1e4)
    m = Apertus(cfg).eval()
    m.init_weights(seed=1)
    docs = [torch.randint(4, 50, (n,)) for n in (7, 12, 5)]
    docs = [torch.cat([torch.tensor([1]), d, torch.tensor([2])]) for d in docs]  # BOS ... EOS
    packed = torch.cat(docs)[None]
    with torch.no_grad():
        out = m(packed, doc_ids=document_ids(packed, cfg.eos_token_id))[0]
        start = 0
        for d in docs:
            alone = m(d[None])[0]
            assert torch.allclose(out[start:start + len(d)], alone, atol=1e-5, rtol=1e-5)
            start += len(d)

@pytest.mark.parametrize("with_docs", [False, True])
def test_flex_attention_matches_sdpa(with_docs):
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 4, 2, 256, 16
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    ids = torch.randint(3, 20, (B, T))
    ids[0, [30, 100, 101, 200]] = 2
    ids[1, [7]] = 2
    doc = document_ids(ids, 2) if with_docs else torch.zeros_like(ids)
    want = attention(q, k, v, sdpa_mask(doc))
    got = attention(q, k, v, make_block_mask(doc))
    assert (got - want).abs().max() < 1e-5

def test_init_is_deterministic_and_apertus_like():
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=64)
    a, b = Apertus(cfg), Apertus(cfg)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert torch.all(a.model.layers["0"].attention_layernorm.weight == 1)
    xielu = a.model.layers["1"].mlp.act_fn
    assert abs(torch.nn.functional.softplus(xielu.alpha_p).item() - 0.8) < 1e-6
    assert abs(0.5 + torch.nn.functional.softplus(xielu.alpha_n).item() - 0.8) < 1e-6
    std_o = a.model.layers["0"].self_attn.o_proj.weight.std().item()
    assert abs(std_o - 0.008944 / (2 * 4) ** 0.5) < 0.0005

def test_audit_70b_prints_exact_count_without_allocating():
    import plan
    cfg = plan.load(os.path.join(ROOT, "configs/apertus-70b.toml"), [])
    assert "70,599,864,480" in plan.audit(cfg["model"])  # built on the meta device: 282 GB of fp32 never allocated
    out = subprocess.run([sys.executable, "plan.py", "configs/apertus-8b.toml", "--audit"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "8,053,338,176" in out.stdout, out.stderr

def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="GQA cannot split 6 query heads into 4"):
        ModelConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(checkpoint.CheckpointError, match="config.json: not found"):
        checkpoint.load_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="malformed JSON"):
        checkpoint.load_hf(tmp_path)
    ref = hf_model(SHAPES["mha"])
    ref.save_pretrained(tmp_path / "hf")
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    del hf_cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(checkpoint.CheckpointError, match="config.json: the field 'hidden_size' is missing"):
        checkpoint.load_hf(tmp_path)
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, file)
    with pytest.raises(checkpoint.CheckpointError, match=r"up_proj.weight has shape \(95, 64\), the config implies \(96, 64\)"):
        checkpoint.load_hf(tmp_path / "hf")
    del tensors[name]
    save_file(tensors, file)
    with pytest.raises(checkpoint.CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        checkpoint.load_hf(tmp_path / "hf")
    out = subprocess.run([sys.executable, "plan.py", str(tmp_path / "nope.toml"), "--audit"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0 and out.stderr.startswith("error:") and "Traceback" not in out.stderr

def test_documents_start_after_eos_and_at_bos():
    ids = torch.tensor([[5, 6, 2, 1, 7, 8, 1, 9, 2, 1]])  # pretraining: </s><s>; chat: <s> without </s>
    assert document_ids(ids, 2).tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1, 2]]
    assert document_ids(ids, 2, 1).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3]]
    assert model_py.document_positions(document_ids(ids, 2, 1)).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]]

def test_every_parameter_has_a_role_that_survives_conversions():
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=64)
    with torch.device("meta"):
        m = Apertus(cfg)
    m.to_empty(device="cpu").to(torch.bfloat16)
    roles = {n: model_py.role_of(n, p) for n, p in m.named_parameters()}
    assert roles["model.layers.0.self_attn.o_proj.weight"].init == "output"
    assert roles["model.layers.1.self_attn.q_norm.weight"].tp_partial_grad
    assert roles["model.layers.1.mlp.act_fn.alpha_p"].tp_partial_grad and not roles["model.layers.1.mlp.act_fn.alpha_p"].weight_decay
    assert roles["model.norm.weight"].sequence_parallel and not roles["model.norm.weight"].weight_decay
    assert {n for n, r in roles.items() if r.weight_decay} == {n for n, p in m.named_parameters() if p.dim() == 2}
    del m.lm_head.weight.role
    with pytest.raises(RuntimeError, match="lm_head.weight has no Role"):
        m.init_weights()

def test_compiled_blocks_keep_every_name():
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=64)
    a = Apertus(cfg)
    names = list(a.state_dict())
    a.compile_blocks()
    assert list(a.state_dict()) == names and not any("_orig_mod" in n for n in names)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in Apertus(cfg).named_parameters()]

def test_chunked_loss_equals_full_logits_cross_entropy():
    """Value and gradients of the chunked head + loss against the plain [N, V] logits version."""
    torch.manual_seed(0)
    N, d, V = 37, 16, 50
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(d, V, bias=False).double()
    targets = torch.randint(0, V, (N,))
    mask = torch.rand(N) > 0.3
    want = (torch.nn.functional.cross_entropy(head(h), targets, reduction="none") * mask).sum()
    gh, gw = torch.autograd.grad(want * 0.37, (h, head.weight))
    for chunk in (V * 1, V * 5, V * 100):  # 1, 5 and all tokens per chunk (an int: on any device)
        model_py.LOSS_CHUNK_ELEMENTS, old = chunk, model_py.LOSS_CHUNK_ELEMENTS
        try:
            got = model_py.lm_head_loss(h, head, targets, mask)
            ah, aw = torch.autograd.grad(got * 0.37, (h, head.weight))
        finally:
            model_py.LOSS_CHUNK_ELEMENTS = old
        assert torch.allclose(got, want, rtol=1e-12)
        assert torch.allclose(ah, gh, rtol=1e-10, atol=1e-14) and torch.allclose(aw, gw, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # no gradient work when none is wanted
        assert torch.allclose(model_py.lm_head_loss(h, head, targets, mask), want)
