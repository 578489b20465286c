"""Fine-tuning the released weights: a Hugging Face directory in (any layout), the same format out."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["--train.log_interval=1", "--train.sample_tokens=0", "--train.eval_interval=0", "--train.max_steps=1",
        "--train.global_batch_size=4", "--train.micro_batch_size=2", "--data.seq_len=64"]

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random transformers Apertus with the real vocabulary (131,072 ids), saved in fp32."""
    path = tmp_path_factory.mktemp("hf") / "tiny-apertus"
    cfg = transformers.ApertusConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=131072, max_position_embeddings=512,
                                     rope_parameters={"rope_type": "llama3", "rope_theta": 12e6, "factor": 8.0,
                                                      "original_max_position_embeddings": 64,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "act_fn" in name else 0.05) + ("norm" in name))
    m.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 65536}))
    return path

def config_without_model(tmp_path):
    """configs/tiny.toml without its [model] section: with init_from the architecture is the HF one."""
    text = open(os.path.join(ROOT, "configs/tiny.toml")).read()
    head, rest = text.split("[model]", 1)
    path = tmp_path / "sft.toml"
    path.write_text(head + "[data]" + rest.split("[data]", 1)[1])
    return str(path)

def train(out_dir, hf, *args, nproc=1):
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    os.makedirs(out_dir, exist_ok=True)
    return subprocess.run([*launch, "train.py", config_without_model(out_dir.parent), *FAST, f"--train.out_dir={out_dir}",
                           f"--train.init_from={hf}", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)

@pytest.mark.parametrize("tp", [1, 2])
def test_init_from_then_a_zero_lr_step_exports_the_input_exactly(hf_dir, tmp_path, tp):
    out = train(tmp_path, hf_dir, "--train.lr=0", "--train.optimizer=adamw", "--train.export_hf=true",
                f"--parallel.tp={tp}", nproc=tp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "threads outlive the process groups" not in out.stderr, out.stderr[-3000:]
    assert "initialised from" in out.stdout
    src, dst = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(dst) == {k for k in src if not k.endswith("inv_freq")}
    for k in dst:
        assert dst[k].dtype == src[k].dtype == torch.float32 and torch.equal(dst[k], src[k]), k
    assert os.path.exists(tmp_path / "hf" / "tokenizer_config.json")  # the tokenizer files come along
    # each rank read only its tensor-parallel slices: about 1/tp of the weights
    lo, hi, total = map(float, re.search(r"read ([\d.]+) to ([\d.]+) MB per rank, ([\d.]+) MB in all", out.stdout).groups())
    weights = os.path.getsize(hf_dir / "model.safetensors") / 1e6
    assert total <= 1.01 * weights and hi <= 1.01 * weights / tp + 0.1, (lo, hi, total, weights)
    ids = torch.randint(0, 131072, (2, 40))
    a = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)

def test_init_from_trains_resumes_and_bad_directories_are_one_line(hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = train(tmp_path, hf_dir, "--train.lr=1e-3", "--train.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    # a checkpoint wins over init_from, which is then not read at all: the download may be gone
    out = train(tmp_path, tmp_path / "moved-away", "--train.lr=1e-3", "--train.max_steps=3")
    assert out.returncode == 0 and "resumed from" in out.stdout and "initialised from" not in out.stdout, out.stderr[-3000:]
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-factor").mkdir()
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    hf_cfg.pop("rope_parameters", None)
    hf_cfg["rope_scaling"] = {"rope_type": "llama3"}  # a llama3 RoPE without its factors
    (tmp_path / "no-factor" / "config.json").write_text(json.dumps(hf_cfg))
    import train as train_py  # the bad directories in this process: train.main catches, one line, exit 2
    for args, message in (([f"--train.init_from={tmp_path / 'nope'}"], "nope: not a directory"),
                          ([f"--train.init_from={hf_dir / 'config.json'}"], "config.json: not a directory"),
                          ([f"--train.init_from={tmp_path / 'empty'}"], "empty/config.json: not found"),
                          ([f"--train.init_from={tmp_path}"], "is a run directory: name one of its checkpoints"),
                          ([f"--train.init_from={tmp_path / 'no-factor'}"], "the field 'factor' is missing"),
                          (["--model.hidden_size=128"], "model.hidden_size = 128 disagrees with 64")):
        argv = [config_without_model(tmp_path), *FAST, f"--train.out_dir={tmp_path / 'x'}", f"--train.init_from={hf_dir}", *args]
        assert train_py.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err

def test_export_every_n_steps_in_the_dtype_the_weights_came_in(hf_dir, tmp_path):
    bf16 = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    out = train(tmp_path / "run", bf16, "--train.max_steps=2", "--train.export_hf=true", "--train.export_hf_every=1",
                "--train.checkpoint_interval=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("exported") == 2 and "ckpt-00000001 to" in out.stdout  # after step 1, then at the end
    t = load_file(tmp_path / "run" / "hf" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert m.dtype == torch.bfloat16

def test_consolidate_in_fp32_and_bf16(hf_dir, tmp_path):
    """The xIELU buffers of every layer once became one shared tensor in fp32 ('Some tensors share memory')."""
    import checkpoint
    assert train(tmp_path, hf_dir, "--train.lr=0").returncode == 0
    for dtype in ("float32", "bfloat16"):
        checkpoint.consolidate(str(tmp_path / "ckpt-00000001"), str(tmp_path / dtype), getattr(torch, dtype))
        t = load_file(tmp_path / dtype / "model.safetensors")
        assert t["model.layers.1.mlp.act_fn.beta"].dtype == getattr(torch, dtype)
