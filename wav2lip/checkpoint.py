"""Loading Wav2Lip weights from every layout found in the wild, strictly and safely.

Layouts:
- the official training checkpoint: ``{"state_dict": ..., "optimizer": ..., "global_step": ...,
  "global_epoch": ...}``, keys with or without DataParallel's ``module.`` prefix;
- a bare state dict;
- TorchScript archives (``Wav2Lip-SD-GAN.pt``, ``Wav2Lip-SD-NOGAN.pt``), which ``torch.load``
  cannot read but ``torch.jit.load`` can.

Pickles are read with ``weights_only=True``, so they cannot run code on load. A TorchScript
archive is a program: ``torch.jit.load`` runs code from the file. Those are read only when the
caller says it trusts the file (``trust_code=True``; the CLI's ``--trust-checkpoint``).
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from wav2lip.model import Wav2Lip


class CheckpointError(ValueError):
    """The file is not a usable Wav2Lip checkpoint; the message says why."""


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding compiled code next to the tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.split("/")[1:2] == ["code"] for name in names) or any(
        name.endswith("/constants.pkl") for name in names
    )


def _read_state_dict(path: Path, trust_code: bool) -> Mapping[str, torch.Tensor]:
    if _is_torchscript(path):
        if not trust_code:
            raise CheckpointError(
                f"{path}: a TorchScript archive, which runs code from the file when loaded; "
                "load it only if you trust where it came from (--trust-checkpoint, or "
                "load_checkpoint(..., trust_code=True)), or use the official .pth checkpoint"
            )
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated; these files use it
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: unreadable TorchScript archive ({exc})") from exc
        return scripted.state_dict()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint, or one holding more than tensors "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors or a training checkpoint with a "
            f"'state_dict' entry, found {type(obj).__name__}"
        )
    return obj


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel's ``module.`` prefix, which the official training code saved."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def _check_keys(model: Wav2Lip, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    wrong = [
        f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (first: {'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointError(f"{path}: not a Wav2Lip generator: " + "; ".join(problems))


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", *, trust_code: bool = False
) -> Wav2Lip:
    """Load a Wav2Lip generator in eval mode from any known layout; TorchScript archives only
    with `trust_code`, as loading one runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    state = _strip_prefix(_read_state_dict(path, trust_code))
    model = Wav2Lip()
    _check_keys(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
