"""The engine computes what the plain official forward computes."""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wav2lip.cuda_graphs import bucket
from wav2lip.engine import Engine, fold_batchnorm, pick_device
from wav2lip.model import Wav2Lip
from wav2lip.onnx_backend import OnnxDecoder


def test_fold_batchnorm_removes_every_batchnorm_and_keeps_outputs(wav2lip_model: Wav2Lip):
    folded = fold_batchnorm(wav2lip_model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in wav2lip_model.modules())  # a copy
    mel, faces = torch.randn(4, 1, 80, 16), torch.rand(4, 6, 96, 96)
    with torch.no_grad():
        expected = wav2lip_model(mel, faces)
        got = folded(mel, faces)
    assert (got - expected).abs().max() < 1e-4
    # The random BatchNorm statistics make folding matter: merely dropping BatchNorm shows.
    dropped = copy.deepcopy(wav2lip_model)
    for module in dropped.modules():
        if hasattr(module, "conv_block"):
            module.conv_block[1] = nn.Identity()
    with torch.no_grad():
        assert (dropped(mel, faces) - expected).abs().max() > 0.05


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_engine_equals_plain_forward(wav2lip_model: Wav2Lip, backend: str) -> None:
    rng = np.random.default_rng(0)
    face = rng.random((6, 96, 96), dtype=np.float32)
    mels = rng.standard_normal((5, 80, 16)).astype(np.float32)
    engine = Engine(wav2lip_model, device="cpu", backend=backend)
    assert engine.backend == backend
    assert engine.dtype == torch.float32  # no half precision on the CPU
    prepared = engine.prepare(face)
    got = engine.infer(prepared, mels)
    with torch.no_grad():
        plain = wav2lip_model(
            torch.from_numpy(mels[:, None]), torch.from_numpy(face[None]).expand(5, -1, -1, -1)
        )
    expected = (plain.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    assert got.shape == (5, 96, 96, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1  # truncation at a pixel boundary may flip by one
    assert (diff > 0).mean() < 0.01
    # Each window gets its own mouth: the batch is not one frame repeated.
    assert np.abs(got[0].astype(int) - got[1].astype(int)).max() > 0


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_engine_batches_several_photos(wav2lip_model: Wav2Lip, backend: str) -> None:
    rng = np.random.default_rng(1)
    engine = Engine(wav2lip_model, device="cpu", backend=backend)
    photos = [engine.prepare(rng.random((6, 96, 96), dtype=np.float32)) for _ in range(2)]
    mels = rng.standard_normal((3, 80, 16)).astype(np.float32)
    mixed = engine.infer([photos[0], photos[1], photos[0]], mels)
    for i, photo in enumerate([photos[0], photos[1], photos[0]]):
        alone = engine.infer(photo, mels[i : i + 1])[0]
        assert np.abs(mixed[i].astype(int) - alone.astype(int)).max() <= 1
    assert np.abs(mixed[0].astype(int) - mixed[1].astype(int)).mean() > 1


def test_backend_choice(wav2lip_model: Wav2Lip) -> None:
    assert Engine(wav2lip_model, device="cpu").backend == "onnxruntime"  # installed: preferred
    with pytest.raises(ValueError, match="run on the CPU in fp32 only"):
        Engine(wav2lip_model, device="cpu", half=True, backend="onnxruntime")
    with pytest.raises(ValueError, match="backend must be"):
        Engine(wav2lip_model, device="cpu", backend="tensorrt")


def test_onnx_runtime_picks_the_cpu(
    wav2lip_model: Wav2Lip, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked for ONNX Runtime on a machine with a GPU, "auto" means the CPU, where it runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    engine = Engine(wav2lip_model, backend="onnxruntime")
    assert engine.device.type == "cpu" and engine.backend == "onnxruntime"


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert pick_device("auto").type == expected


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_lower_rows_engine_is_exact_where_it_computes(wav2lip_model: Wav2Lip, backend) -> None:
    from wav2lip.blend import first_face_row
    from wav2lip.still import StillGenerator

    rng = np.random.default_rng(2)
    face = rng.random((6, 96, 96), dtype=np.float32)
    mels = rng.standard_normal((3, 80, 16)).astype(np.float32)
    full = Engine(wav2lip_model, device="cpu", backend="torch")
    first_row = first_face_row("feather")
    lower = Engine(wav2lip_model, device="cpu", first_row=first_row, backend=backend)
    assert 0 < lower.first_exact_row <= first_row
    expected = full.infer(full.prepare(face), mels)
    got = lower.infer(lower.prepare(face), mels)
    # Identical in every row the picture can show; above, the photo's own crop.
    shown = slice(lower.first_exact_row, None)
    assert np.abs(got[:, shown].astype(int) - expected[:, shown].astype(int)).max() <= 1
    crop = np.rint(face[3:].transpose(1, 2, 0) * 255).astype(np.uint8)
    top = lower.first_exact_row
    assert np.array_equal(got[:, :top], np.repeat(crop[None, :top], 3, 0))
    # Any first row: each stage runs on the rows the next needs, and the rows returned are
    # those of the plain decoder; from row 2 on, exactly the rows asked for.
    folded = fold_batchnorm(wav2lip_model)
    faces = torch.from_numpy(face[None])
    mel = torch.from_numpy(mels[:, None])
    with torch.no_grad():
        reference = folded.decode(mel, folded.encode_face(faces))
        rows = (0, 1, 2, 10, 23, 31, 47, 60, 95)
        for row, fold, plain in itertools.product(rows, (True, False), (True, False)):
            generator = StillGenerator(folded, row, fold, plain_joins=plain).eval()
            rewrites = [join.rewrite for join in generator.joins]
            assert rewrites == (["embedding"] + ["phases"] * 5 + [""] if plain else [""] * 7)
            start = generator.first_exact_row
            assert start == (row if row >= 2 else 0)
            out = generator(mel, *generator.photo_terms(faces))
            assert out.shape == (3, 3, 96 - start, 96)
            assert (out - reference[:, :, start:]).abs().max() < 1e-5
        # Less is computed than before the cut: the 12-pixel stage starts at row 2 for 47.
        assert StillGenerator(folded, 47).starts[2:] == [2, 8, 20, 44, 47]


def test_half_precision_stays_within_two_levels(wav2lip_model: Wav2Lip) -> None:
    # The GPU's default precision, run on the CPU: the generator is built in fp32 and cast,
    # folded centre taps included, and the pixels shown stay close to fp32's.
    rng = np.random.default_rng(4)
    face = rng.random((6, 96, 96), dtype=np.float32)
    mels = rng.standard_normal((3, 80, 16)).astype(np.float32)
    exact = Engine(wav2lip_model, device="cpu", backend="torch", first_row=47)
    half = Engine(wav2lip_model, device="cpu", half=True, backend="torch", first_row=47)
    assert half.generator.rests[3][0].weight.dtype == torch.float16
    a = exact.infer(exact.prepare(face), mels).astype(int)
    b = half.infer(half.prepare(face), mels).astype(int)
    assert np.abs(a - b).max() <= 2


def test_int8_is_an_option_that_stays_close(wav2lip_model: Wav2Lip) -> None:
    rng = np.random.default_rng(3)
    face = rng.random((6, 96, 96), dtype=np.float32)
    mels = rng.uniform(-4, 4, (8, 80, 16)).astype(np.float32)  # the mel scale's whole range
    exact = Engine(wav2lip_model, device="cpu", backend="onnxruntime")
    int8 = Engine(wav2lip_model, device="cpu", backend="onnxruntime-int8")
    a = exact.infer(exact.prepare(face), mels).astype(int)
    b = int8.infer(int8.prepare(face), mels).astype(int)
    # Quantized, so not equal; but a picture of the same mouths, not noise. (4.5 levels on
    # average with these weights; 4.3 with the transposed convolutions left in fp32, 6.4
    # when calibrated on windows no louder than +2.)
    assert np.abs(a - b).max() > 0
    assert np.abs(a - b).mean() < 5
    # Residuals folded into the weights would take each channel's quantization range, and
    # ONNX Runtime runs transposed convolutions in fp32 only.
    assert not int8.generator.fold_residuals and exact.generator.fold_residuals
    assert {join.rewrite for join in int8.generator.joins} == {"embedding", "phases", ""}
    with pytest.raises(ValueError, match="without folded residuals"):
        OnnxDecoder(exact.generator, threads=1, int8=True)


def test_cuda_graph_buckets_and_device_check(wav2lip_model: Wav2Lip) -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Engine(wav2lip_model, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("half", [False, True])
def test_cuda_graphs_give_the_eager_pixels(wav2lip_model: Wav2Lip, half: bool) -> None:
    rng = np.random.default_rng(3)
    options = {"device": "cuda", "half": half, "first_row": 47}
    eager = Engine(wav2lip_model, cuda_graphs=False, **options)
    graphed = Engine(wav2lip_model, cuda_graphs=True, **options)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    faces = [rng.random((6, 96, 96), dtype=np.float32) for _ in range(3)]
    for batch in (1, 3, 16, 5):  # 5 after 16: a smaller batch in a larger recorded size
        mels = rng.standard_normal((batch, 80, 16)).astype(np.float32)
        for engine_faces in ([eager.prepare(faces[0])], [eager.prepare(f) for f in faces]):
            photos = [engine_faces[i % len(engine_faces)] for i in range(batch)]
            expected = eager.infer(photos, mels)
            graphed_photos = [graphed.prepare(faces[i % len(engine_faces)]) for i in range(batch)]
            got = graphed.infer(graphed_photos, mels)
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    # Replays really use the new inputs: different windows give different mouths.
    assert np.abs(got[0].astype(int) - got[1].astype(int)).max() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names are Linux's")
def test_onnx_runtime_workers_are_named_inference(wav2lip_model: Wav2Lip) -> None:
    """`top -H` and the benchmark see ONNX Runtime's worker as inference, not as python."""
    engine = Engine(wav2lip_model, device="cpu", backend="onnxruntime")
    engine.infer(engine.prepare(np.zeros((6, 96, 96), np.float32)), np.zeros((1, 80, 16)))
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    assert torch.get_num_threads() == 1 or "inference" in names
