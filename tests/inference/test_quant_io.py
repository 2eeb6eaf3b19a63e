"""Quantised checkpoints: ``OptimizedMoEModel.save_quantized`` / ``load_model`` and ``moe-lab quantize``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_lab.cli.main import main
from moe_lab.inference.expert_modules import QuantizedExperts
from moe_lab.inference.generate import generate
from moe_lab.inference.optimized import OptimizedMoEModel, load_model, load_quantized
from moe_lab.models import MoEModel

TEXT = "Mixture-of-experts models route every token to a few experts. " * 80


def _model(seed: int = 0) -> MoEModel:
    torch.manual_seed(seed)
    return MoEModel.from_preset("tiny").eval()


def _ids(seed: int = 1, b: int = 2, s: int = 16) -> torch.Tensor:
    return torch.randint(0, 200, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 16), (4, None)])
def test_save_load_roundtrip_is_bitwise(tmp_path: Path, bits: int, group_size: int | None) -> None:
    opt = OptimizedMoEModel(_model()).quantize(bits=bits, group_size=group_size)
    ids = _ids()
    with torch.no_grad():
        ref = opt(ids).logits
    path = opt.save_quantized(tmp_path / "q")
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors", "quantization.json"]
    meta = json.loads((path / "quantization.json").read_text())
    assert meta["bits"] == bits and meta["format"] == "moe-lab-quantized"
    assert meta["group_size"] == group_size  # as asked; None = the per-weight default

    loaded = load_model(path)
    assert loaded.quantization["bits"] == bits
    for layer in loaded.moe_layers():
        assert isinstance(layer.experts, QuantizedExperts)
        assert not any(t.is_floating_point() for n, t in layer.experts.named_buffers() if n.endswith("_q"))
    # no float copy of the experts anywhere in the loaded model
    assert not any("w1_EDF" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        out = loaded(ids).logits
    assert torch.equal(out, ref)
    # the loaded model holds the quantised bytes (int8: about a quarter of fp32 plus scales)
    assert OptimizedMoEModel(loaded).expert_weight_bytes() == opt.expert_weight_bytes()
    # KV-cache generation from the loaded model gives the same tokens as before saving
    a = generate(opt.model, ids[:1, :8].tolist()[0], max_new_tokens=6, temperature=0.0)
    b = generate(loaded, ids[:1, :8].tolist()[0], max_new_tokens=6, temperature=0.0)
    assert a.new_tokens == b.new_tokens


def test_int4_default_groups_follow_each_weights_shape(tmp_path: Path) -> None:
    # D=32 and F=48: the default group is min(64, input dim) per weight (32 for w1/w3, 48 for w2); the
    # saved model must come back with the same groups
    torch.manual_seed(0)
    model = MoEModel(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48).eval()
    opt = OptimizedMoEModel(model).quantize(bits=4)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = opt(ids).logits
    loaded = load_model(opt.save_quantized(tmp_path / "q"))
    assert loaded.quantization["group_size"] is None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_from_pretrained_and_resave(tmp_path: Path) -> None:
    opt = OptimizedMoEModel(_model()).quantize(bits=8, quantize_router=True)
    opt.save_quantized(tmp_path / "a")
    again = OptimizedMoEModel.from_pretrained(tmp_path / "a")
    assert again.model.quantization == {"bits": 8, "group_size": None, "quantize_router": True}
    again.save_quantized(tmp_path / "b")  # a loaded quantised model saves again, unchanged
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_save_needs_quantize_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="call quantize"):
        OptimizedMoEModel(_model()).save_quantized(tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: "{not json", "not valid JSON"),
        (lambda m: json.dumps({**m, "format": "other"}), "format"),
        (lambda m: json.dumps({**m, "version": 99}), "version 99"),
        (lambda m: json.dumps({**m, "bits": 3}), "bits must be 8 or 4"),
        (lambda m: json.dumps({**m, "bits": 4, "group_size": 16}), "weights do not match"),
    ],
)
def test_bad_quantization_file_names_it(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = OptimizedMoEModel(_model()).quantize(bits=8).save_quantized(tmp_path / "q")
    meta_file = path / "quantization.json"
    meta_file.write_text(edit(json.loads(meta_file.read_text())))
    with pytest.raises(ValueError, match=message) as info:
        load_quantized(path)
    assert str(path) in str(info.value)


def test_failed_save_keeps_the_previous_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opt = OptimizedMoEModel(_model()).quantize(bits=8)
    path = opt.save_quantized(tmp_path / "q")
    before = (path / "model.safetensors").read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("moe_lab.models.io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        OptimizedMoEModel(_model(seed=5)).quantize(bits=4).save_quantized(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert json.loads((path / "quantization.json").read_text())["bits"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary directory left behind


# ---- CLI -------------------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    _model().save_pretrained(str(d))
    return d


def test_cli_quantize_reports_and_saves(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_file = tmp_path / "data.txt"
    data_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "int8"
    rc = main(["quantize", str(model_dir), "--bits", "8", "--data", str(data_file), "--eval-tokens", "512",
               "--seq-len", "64", "-o", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MiB ->" in printed and "perplexity on" in printed and f"wrote {out}" in printed
    # the printed perplexities are those of the two models on the same tokens
    base = MoEModel.load(str(model_dir)).eval()
    ids = torch.tensor([list(TEXT.encode("utf-8"))[i : i + 64] for i in range(0, 512, 64)])
    from moe_lab.inference.optimized import perplexity

    before, after = perplexity(base, [ids[:4], ids[4:]]), perplexity(load_model(out), [ids[:4], ids[4:]])
    assert f"{before:.3f} -> {after:.3f}" in printed
    assert abs(after / before - 1) < 0.02  # int8 per channel: a small change
    # an existing output is never overwritten without --overwrite
    assert main(["quantize", str(model_dir), "--eval-tokens", "0", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), "--bits", "4", "--eval-tokens", "0", "-o", str(out),
                 "--overwrite"]) == 0  # fmt: skip
    assert load_model(out).quantization["bits"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bits", "8", "--group-size", "16"], "--group-size applies to --bits 4"),
        (["--bits", "4", "--group-size", "48"], "not divisible by group_size 48"),
        (["--data", "{missing}"], "--data: not found"),
    ],
)
def test_cli_quantize_bad_input_exit_2(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    tail = [a.format(missing=tmp_path / "nope.txt") for a in argv]
    assert main(["quantize", str(model_dir), *tail, "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_quantize_refuses_a_quantised_model(model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["quantize", str(model_dir), "--eval-tokens", "0", "-o", str(tmp_path / "q")]) == 0
    assert main(["quantize", str(tmp_path / "q"), "--eval-tokens", "0", "-o", str(tmp_path / "q2")]) == 2
    assert "already quantised" in capsys.readouterr().err


def test_cli_generate_from_a_quantised_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    MoEModel.from_preset("tiny", vocab_size=260).save_pretrained(str(tmp_path / "bytes"))
    assert main(["quantize", str(tmp_path / "bytes"), "--eval-tokens", "0", "-o", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    rc = main(["generate", str(tmp_path / "q"), "--prompt", "experts", "--temperature", "0",
               "--max-new-tokens", "5"])  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    assert "byte tokenizer" in captured.err  # no tokenizer.json beside the model: announced
    # the same continuation as the quantised model's own greedy decoding
    loaded = load_model(tmp_path / "q")
    ids = list(b"experts")
    new = generate(loaded, ids, max_new_tokens=5, temperature=0.0, eos_token_id=None).new_tokens[0]
    from moe_lab.data import ByteTokenizer

    assert captured.out.rstrip("\n") == "experts" + ByteTokenizer().decode(new)
    # a prompt outside a small vocabulary (100 ids; the euro sign is bytes 226, 130, 172) is refused
    MoEModel.from_preset("tiny", vocab_size=100).save_pretrained(str(tmp_path / "small-vocab"))
    assert main(["generate", str(tmp_path / "small-vocab"), "--prompt", "\u20ac"]) == 2
    assert "does not belong to this model" in capsys.readouterr().err


def test_cli_generate_stop_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moe_lab.data import ByteTokenizer

    torch.manual_seed(1)
    MoEModel.from_preset("tiny", vocab_size=260).save_pretrained(str(tmp_path / "m"))
    base = ["generate", str(tmp_path / "m"), "--prompt", "ab", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(base) == 0
    full = capsys.readouterr().out.rstrip("\n")[2:]
    new = generate(load_model(tmp_path / "m"), list(b"ab"), max_new_tokens=12, temperature=0.0).new_tokens[0]
    assert full == ByteTokenizer().decode(new)
    # --stop TEXT: the output ends before the first occurrence
    stop = full[4:6]
    assert stop and main([*base, "--stop", stop]) == 0
    assert capsys.readouterr().out.rstrip("\n") == "ab" + full[: full.find(stop)]
    # --stop-token-id ID: generation ends after that token
    assert main([*base, "--stop-token-id", str(new[2])]) == 0
    first = new.index(new[2])
    assert capsys.readouterr().out.rstrip("\n") == "ab" + ByteTokenizer().decode(new[: first + 1])
