"""The generator matches the official architecture, and every checkpoint layout loads."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from tests.conftest import random_wav2lip
from wav2lip import CheckpointError, Wav2Lip, load_checkpoint


def test_official_state_dict_layout() -> None:
    model = Wav2Lip()
    state = model.state_dict()
    assert len(state) == 352
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 36_298_035
    # A few keys as the official checkpoints name them.
    for key in (
        "face_encoder_blocks.0.0.conv_block.0.weight",
        "audio_encoder.12.conv_block.1.running_var",
        "face_decoder_blocks.6.2.conv_block.0.bias",
        "output_block.1.weight",
    ):
        assert key in state
    assert state["face_decoder_blocks.1.0.conv_block.0.weight"].shape == (1024, 512, 3, 3)


def test_forward_shapes_and_range(wav2lip_model: Wav2Lip) -> None:
    with torch.no_grad():
        out = wav2lip_model(torch.randn(3, 1, 80, 16), torch.rand(3, 6, 96, 96))
    assert out.shape == (3, 3, 96, 96)
    assert out.min() >= 0 and out.max() <= 1


def _optimizer_state(model: Wav2Lip) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return optimizer.state_dict()


def _save_layouts(model: Wav2Lip, folder: Path) -> dict[str, Path]:
    state = model.state_dict()
    prefixed = {f"module.{k}": v for k, v in state.items()}
    paths = {}

    def save(name: str, obj: object, **kwargs: object) -> None:
        paths[name] = folder / f"{name}.pth"
        torch.save(obj, paths[name], **kwargs)

    extras = {"optimizer": _optimizer_state(model), "global_step": 2, "global_epoch": 3}
    save("training_dataparallel", {"state_dict": prefixed, **extras})
    save("training_plain", {"state_dict": state, **extras})
    save(
        "training_legacy_format",
        {"state_dict": prefixed, **extras},
        _use_new_zipfile_serialization=False,
    )
    save("bare", state)
    traced = torch.jit.trace(model, (torch.randn(1, 1, 80, 16), torch.rand(1, 6, 96, 96)))
    paths["torchscript"] = folder / "Wav2Lip-SD-GAN.pt"
    traced.save(str(paths["torchscript"]))
    return paths


def test_every_layout_gives_identical_outputs(tmp_path: Path) -> None:
    model = random_wav2lip(seed=1)
    mel, faces = torch.randn(2, 1, 80, 16), torch.rand(2, 6, 96, 96)
    with torch.no_grad():
        expected = model(mel, faces)
    for name, path in _save_layouts(model, tmp_path).items():
        loaded = load_checkpoint(path, trust_code=name == "torchscript")
        assert isinstance(loaded, Wav2Lip), name
        assert not loaded.training, name
        with torch.no_grad():
            assert torch.equal(loaded(mel, faces), expected), name


def test_torchscript_file_needs_jit(tmp_path: Path) -> None:
    """The layout really is the one torch.load rejects, so the jit path is exercised."""
    path = _save_layouts(random_wav2lip(seed=2), tmp_path)["torchscript"]
    with pytest.raises(Exception):  # noqa: B017 - torch raises various types here
        torch.load(path, weights_only=True)
    assert isinstance(load_checkpoint(path, trust_code=True), Wav2Lip)


def test_torchscript_runs_code_so_it_needs_trust(tmp_path: Path, monkeypatch) -> None:
    """Loading a TorchScript archive runs code from it: refused, saying why, unless trusted;
    and refused before torch.jit.load is ever called."""
    path = _save_layouts(random_wav2lip(seed=2), tmp_path)["torchscript"]
    called = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: called.append(a) or real_load(*a, **k))
    with pytest.raises(CheckpointError, match=r"runs code from the file.*--trust-checkpoint"):
        load_checkpoint(path)
    assert called == []
    assert isinstance(load_checkpoint(path, trust_code=True), Wav2Lip)
    assert len(called) == 1


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, not a checkpoint", "not a PyTorch checkpoint"),
        (pickle.dumps([1, 2, 3]), "not a PyTorch checkpoint"),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pth")


def test_wrong_structure_is_named(tmp_path: Path, wav2lip_model: Wav2Lip) -> None:
    state = dict(wav2lip_model.state_dict())
    missing = dict(state)
    del missing["output_block.1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(first: output_block.1.weight"):
        load_checkpoint(tmp_path / "missing.pth")

    extra = dict(state, **{"discriminator.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="1 unexpected keys"):
        load_checkpoint(tmp_path / "extra.pth")

    shaped = dict(state, **{"output_block.1.bias": torch.zeros(4)})
    torch.save(shaped, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"wrong shapes .*output_block.1.bias \(4,\)"):
        load_checkpoint(tmp_path / "shape.pth")

    torch.save({"state_dict": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_checkpoint(tmp_path / "list.pth")
