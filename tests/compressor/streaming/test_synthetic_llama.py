"""The synthetic Llama generator and the shard writer/reader it shares with streamed runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor.stream_io import CheckpointReader, ShardWriter
from compressor.synthetic_llama import SHAPES, checkpoint_bytes, generate, tensor_specs


def test_llama_2_7b_shape_is_the_real_one():
    s = SHAPES["llama-2-7b"]
    n = sum(torch.Size(shape).numel() for _, shape in tensor_specs(s))
    assert n == 6_738_415_616  # Llama-2-7b-hf's parameter count
    assert checkpoint_bytes(s) == 2 * n  # ~13.5 GB of bf16
    assert len(tensor_specs(s)) == 32 * 9 + 3


def test_generated_checkpoint_is_sharded_deterministic_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = generate("tiny", tmp_path / "a", seed=7, shard_bytes=400_000)
    b = generate("tiny", tmp_path / "b", seed=7, shard_bytes=400_000)
    c = generate("tiny", tmp_path / "c", seed=8, shard_bytes=400_000)
    files = sorted(a.glob("*.safetensors"))
    assert len(files) == 4 and [f.read_bytes() for f in files] == [(b / f.name).read_bytes() for f in files]
    assert load_file(str(files[1])).keys() == load_file(str(c / files[1].name)).keys()
    assert not torch.equal(load_file(str(files[1]))[next(iter(load_file(str(files[1]))))],
                           load_file(str(c / files[1].name))[next(iter(load_file(str(files[1]))))])
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in tensor_specs(SHAPES["tiny"])}
    assert index["metadata"]["total_size"] == checkpoint_bytes(SHAPES["tiny"])
    cfg = json.loads((a / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (128, 4, 512)
    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)
    reader = CheckpointReader(a)
    assert torch.equal(reader.get("model.layers.2.mlp.up_proj.weight"), model.model.layers[2].mlp.up_proj.weight)
    w = reader.get("model.layers.2.mlp.up_proj.weight").float()
    assert w.dtype == torch.float32 and abs(w.std().item() - 0.02) < 0.002
    tok = AutoTokenizer.from_pretrained(a)
    ids = tok("Streaming é!")["input_ids"]
    assert len(ids) == len("Streaming é!".encode()) and max(ids) < 512 and tok.decode(ids) == "Streaming é!"
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 512)


def test_shard_writer_limits_and_oversized_tensor(tmp_path):
    w = ShardWriter(tmp_path, max_shard_bytes=1000)
    t = {f"t{i}": torch.arange(i * 100, i * 100 + 100, dtype=torch.float32) for i in range(3)}  # 400 B each
    t["big"] = torch.ones(50, 50, dtype=torch.bfloat16)  # 5000 B: a shard of its own, closed by the next
    t["f8"] = torch.full((4,), 2.0).to(torch.float8_e4m3fn)
    for k, v in t.items():
        w.add(k, v)
    files = w.finish()
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert [sorted(load_file(str(f))) for f in files] == [["t0", "t1"], ["t2"], ["big"], ["f8"]]
    back = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert all(torch.equal(back[k].view(torch.uint8), t[k].view(torch.uint8)) for k in t)
    assert not list(tmp_path.glob(".shard-*"))
    w2 = ShardWriter(tmp_path / "y")
    w2.add("a", torch.ones(1))
    with pytest.raises(ValueError, match="written twice"):
        w2.add("a", torch.ones(1))


def test_activation_store_on_disk_round_trips(tmp_path):
    from compressor.stream_gptq import ActivationStore

    s = ActivationStore(3, (1, 5, 4), torch.bfloat16, tmp_path)
    rows = [torch.randn(1, 5, 4).to(torch.bfloat16) for _ in range(3)]
    for i in (2, 0, 1):
        s.put(i, rows[i])
    assert s.on_disk and (tmp_path / "activations.bin").stat().st_size == 3 * 5 * 4 * 2
    assert all(torch.equal(s.get(i), rows[i]) for i in range(3))
    s.close()
    assert not (tmp_path / "activations.bin").exists()


def test_fixtures_entry_point_dispatches(tmp_path, capsys):
    from compressor.eval.fixtures import main

    assert main(["synthetic-llama", "--shape", "tiny", "--out", str(tmp_path / "t"), "--layers", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "t" / "config.json").read_text())["num_hidden_layers"] == 1
    assert main(["synthetic-llama", "--shape", "tiny", "--out", str(tmp_path / "t"), "--quiet"]) == 2  # exists
    with pytest.raises(SystemExit) as e:  # the MoE fixtures' own parser still answers
        main(["moe-unknown", "--out", str(tmp_path / "m")])
    assert e.value.code == 2 and "moe-mixtral" in capsys.readouterr().err
