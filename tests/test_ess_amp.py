"""Mixed precision: what --amp means on each device, the parts that compute in float32 under autocast
whatever its dtype, and every head variant's training step and prediction under CPU bfloat16 autocast
against float32 (at 19, 300 and 3000 classes: the dense and gather ESS losses, the exact and the
cell-pruned regulariser, exact and IVF searches)."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ess import config as cfg
from ess.checkpoint import load_checkpoint
from ess.cli import main
from ess.config import ModelArgs
from ess.device import Precision, precision
from ess.evaluate import evaluate_run
from ess.heads import SoftmaxHead, UpsampledLogits
from ess.ivf import IvfSearch
from ess.knn import knn_torch
from ess.losses import _DenseNearestNegativesCrossEntropy, ess_pixel_loss, upsampled_softmax_loss
from ess.model import Segmenter, build_head
from ess.pairs import close_pairs
from ess.variants import VARIANTS, default

CHUNK = ModelArgs.chunk
LOW = [torch.bfloat16, torch.float16]  # the CPU's and CUDA's autocast dtypes; CPU autocast runs both


def loss_rtol(dtype: torch.dtype) -> float:
    """How far a loss under autocast in `dtype` may lie from float32's: a rounding moves a value by up to half
    the dtype's eps (2^-8 for bfloat16, 2^-11 for float16); between the input and the loss ResNet-18 DeepLabV3+
    rounds the output of ~25 convolutions in sequence, and independent errors add in quadrature, so the features
    carry up to sqrt(25) eps / 2 relative error (2% in bfloat16). The loss, computed in float32 from them (a mean
    over thousands of pixels, whose errors partly cancel), stays within that."""
    return 25 ** 0.5 * torch.finfo(dtype).eps / 2

# Decisions closer than this (in logits, or in distance for ESS) are float32 ties: float32 keeps 2^-24 of a
# value, and the dot products behind a score sum ~10^2 terms of size ~1; 1e-4 is 10x above that.
TIE = 1e-4


def test_amp_means_bfloat16_on_the_cpu_and_float16_with_a_scaler_on_cuda():
    assert precision("cpu", None) == Precision("cpu", None) and precision("cpu", False).describe() == "float32"
    cpu = precision("cpu", True)
    assert (cpu.dtype, cpu.scaled, cpu.describe()) == (torch.bfloat16, False, "bfloat16 autocast")
    for amp in (None, True):  # on by default on CUDA
        cuda = precision(torch.device("cuda", 1), amp)
        assert (cuda.dtype, cuda.scaled) == (torch.float16, True)
    assert cuda.describe() == "float16 autocast with gradient scaling"
    assert not precision("cuda", False).enabled
    with cpu.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with precision("cpu", None).autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert not cpu.grad_scaler().is_enabled()



def test_the_memory_check_counts_half_the_activations_wherever_amp_is_on():
    """A lower bound: float32 activations only where --amp (or its default on the device) leaves them so."""
    from ess.config import TrainConfig
    from ess.memory import training_parts

    def activations(device, amp):
        parts = training_parts(ModelArgs(head="ess", num_classes=300), TrainConfig(amp=amp), torch.device(device), 1, 0)
        return parts["activations"][1]

    full, half = activations("cpu", None), activations("cpu", True)
    assert activations("cpu", False) == full and activations("cuda", False) == full
    assert activations("cuda", None) == activations("cuda", True) == half and half < 0.6 * full

@pytest.mark.parametrize("dtype", LOW)
def test_searches_and_close_pairs_rank_in_float32_under_autocast(dtype):
    """The nearest classes and the regulariser's close pairs come out as in float32, not from rounded distances."""
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(3000, 12, generator=g), dim=1)
    queries = F.normalize(torch.randn(400, 12, generator=g), dim=1)
    ivf = IvfSearch(None, None, 100, CHUNK, use_faiss=False)
    ivf.update(base)
    expected = (knn_torch(queries, base, 8, CHUNK), *close_pairs(base, 0.5, CHUNK), ivf.search(queries, base, 8))
    assert expected[1].numel() > 0  # some close pairs to find
    with torch.autocast("cpu", dtype=dtype):
        got = (knn_torch(queries, base, 8, CHUNK), *close_pairs(base, 0.5, CHUNK), ivf.search(queries, base, 8))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _loss_cases(g):
    """(name, loss function of float tensors, its float32 inputs): each custom autograd Function of ess.losses."""
    classes = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    pixels = F.normalize(torch.randn(300, 6, generator=g), dim=1)
    target = torch.randint(0, 40, (300,), generator=g)
    negatives = torch.stack([torch.randperm(39, generator=g)[:7] for _ in range(300)])
    negatives += (negatives >= target[:, None]).long()  # never the target
    low = torch.randn(2, 11, 5, 6, generator=g)
    mask = torch.randint(0, 12, (2, 17, 21), generator=g)
    return [
        ("dense", lambda p, c: _DenseNearestNegativesCrossEntropy.apply(p, c, target, 7, 20.0, 64), (pixels, classes)),
        ("gather", lambda p, c: ess_pixel_loss(p, target, c, k=7, tau=20.0, sampling="nearest", knn="torch",
                                               chunk=CHUNK, ivf=None, negatives=negatives), (pixels, classes)),
        ("upsampled softmax", lambda x: upsampled_softmax_loss(x, mask, (20, 24), 500), (low,)),
    ]


@pytest.mark.parametrize("dtype", LOW)
def test_custom_autograd_functions_compute_in_float32_under_autocast(dtype):
    """Forward and backward (even a backward called inside autocast) give the float32 values; inputs in the
    autocast dtype are taken in float32 and get their gradients back in their own dtype."""
    for name, loss_fn, inputs in _loss_cases(torch.Generator().manual_seed(1)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        expected = loss_fn(*leaves)
        expected_grads = torch.autograd.grad(expected, leaves)
        with torch.autocast("cpu", dtype=dtype):
            got = loss_fn(*leaves)
            got_grads = torch.autograd.grad(got, leaves)
        assert got.dtype == torch.float32 and torch.equal(got, expected), name
        for a, b in zip(got_grads, expected_grads):
            assert torch.equal(a, b), name
        rounded = [x.to(dtype).requires_grad_() for x in inputs]
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(*rounded)
        grads = torch.autograd.grad(loss, rounded)
        assert torch.equal(loss, loss_fn(*[x.float() for x in rounded])), name
        assert all(gr.dtype == dtype and torch.isfinite(gr).all() for gr in grads), name


def _decision(head, output) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's decision for `output` computed in float64: (B, H, W) class ids 1..C and the margin to the runner-up."""
    if isinstance(output, UpsampledLogits):
        h, w = output.crop
        scores = F.interpolate(output.low.double(), size=output.size, mode="bilinear", align_corners=False)[..., :h, :w]
        scores = scores.permute(0, 2, 3, 1)
    elif isinstance(head, SoftmaxHead):
        scores = output.double().permute(0, 2, 3, 1)
    else:  # ESS: the nearest class embedding, scores = -distance
        pixels = output.double().permute(0, 2, 3, 1)
        classes = head.class_embeddings().detach().double()
        scores = -torch.cdist(pixels.reshape(-1, pixels.shape[-1]), classes).view(*pixels.shape[:3], -1)
    top = scores.topk(2, dim=-1)
    return top.indices[..., 0] + 1, top.values[..., 0] - top.values[..., 1]


def _step_and_prediction(head, features: torch.Tensor, mask: torch.Tensor, mixed: Precision) -> dict:
    """One training step of `head` on decoder `features` (loss and backward) and its prediction, in `mixed`."""
    head = copy.deepcopy(head)  # its own IVF index per run
    features = features.detach().requires_grad_()
    torch.manual_seed(1)  # the same random draws (IVF clustering sample) in either precision
    with mixed.autocast():
        output = head(features, tuple(mask.shape[1:]))
        loss = head.loss(output, mask)
    grads = torch.autograd.grad(loss, [features, *head.parameters()])
    with torch.no_grad(), mixed.autocast():
        output = head(features, tuple(mask.shape[1:]))
        prediction = head.predict(output)
    return {"loss": loss, "grads": grads, "prediction": prediction, "decision": _decision(head, output)}


@pytest.mark.parametrize("num_classes", [19, 300, 3000])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_every_head_variant_trains_and_predicts_under_autocast(device, num_classes):
    """bfloat16 on the CPU, float16 on CUDA (ess.device.precision), against float32."""
    g = torch.Generator().manual_seed(num_classes)
    x = torch.randn(2, 3, 64, 64, generator=g).to(device)
    mask = torch.randint(0, num_classes + 1, (2, 64, 64), generator=g).to(device)
    torch.manual_seed(0)
    trunk = Segmenter.from_args(ModelArgs(head="softmax", num_classes=num_classes, encoder="resnet18")).to(device)
    mixed = precision(device, True)
    features = {}
    for run in (precision(device, False), mixed):  # the decoder features each precision hands the head
        torch.manual_seed(2)  # the same ASPP dropout
        with torch.no_grad(), run.autocast():
            features[run] = trunk.decoder(trunk.encoder(x))
    assert features[mixed].dtype == mixed.dtype
    for name in default("speed"):
        torch.manual_seed(3)
        args = ModelArgs(num_classes=num_classes, **VARIANTS[name].options)
        head = build_head(args, features[mixed].shape[1]).to(device)
        full, low = (_step_and_prediction(head, features[run], mask, run) for run in features)
        assert torch.isfinite(low["loss"]) and low["loss"].dtype == torch.float32, name
        assert low["loss"].item() == pytest.approx(full["loss"].item(), rel=loss_rtol(mixed.dtype)), name
        assert all(torch.isfinite(gr).all() for gr in low["grads"]), name
        # The prediction under autocast is the exact decision for the head's own output, float32 ties aside ...
        ids, margin = low["decision"]
        decided = margin > TIE
        assert torch.equal(low["prediction"][decided], ids[decided]), name
        # ... and agrees with float32's on most pixels (at initialisation many pixels' best classes nearly tie).
        assert (low["prediction"] == full["prediction"]).float().mean() > 0.5, name


# --- the training loop -------------------------------------------------------------------------

def _spy_precision(monkeypatch, forced: Precision | None = None) -> list[Precision]:
    """Record what ess.train runs in (or make it run in `forced`, e.g. CUDA's float16 and scaler on the CPU)."""
    seen = []

    def spy(device, amp):
        seen.append(forced or precision(device, amp))
        return seen[-1]

    monkeypatch.setattr("ess.train.precision", spy)
    return seen


def _train_args(data, out, *flags):
    return ["train", "--data", str(data), "--head", "ess", "--preset", "tiny", "--crop", "32", "--batch", "2",
            "--iters", "2", "--device", "cpu", "--quiet", "--out", str(out), *flags]


def test_train_amp_on_the_cpu_is_bfloat16_without_a_scaler_and_resumes(built_train, built_val, tmp_path, monkeypatch):
    seen = _spy_precision(monkeypatch)
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, _train_args(built_train, run, "--amp", "--stop-after", "1"))
    assert result.exit_code == 0, result.output
    assert seen == [Precision("cpu", torch.bfloat16)] and cfg.load(run / "config.yaml").train.amp is True
    assert load_checkpoint(run / "last.pt")["scaler"] == {}  # a disabled scaler has no state
    result = runner.invoke(main, ["train", "--out", str(run), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == Precision("cpu", torch.bfloat16)
    log = pd.read_csv(run / "log.csv")
    assert log["iteration"].tolist() == [1, 2] and np.isfinite(log["loss"]).all()
    metrics = evaluate_run(run, built_val, out=tmp_path / "eval", device="cpu", progress=False)  # in the run's bfloat16
    assert 0 <= metrics["miou"] <= 1
    # The default on the CPU is float32; --no-amp says so explicitly.
    result = runner.invoke(main, _train_args(built_train, tmp_path / "off", "--iters", "1"))
    assert result.exit_code == 0 and seen[-1] == Precision("cpu", None)
    assert cfg.load(tmp_path / "off" / "config.yaml").train.amp is None


def test_float16_with_gradient_scaling_trains_and_resumes_its_scaler(built_train, tmp_path, monkeypatch):
    """CUDA's setting, run on the CPU: the scaler steps the run's optimisers (SGD and the embeddings' Adam), its
    state is checkpointed and resumed, and a run saved without a scaler resumes with a fresh one."""
    _spy_precision(monkeypatch, Precision("cpu", torch.float16))
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(main, _train_args(built_train, run, "--stop-after", "1"))
    assert result.exit_code == 0, result.output
    scaler = load_checkpoint(run / "last.pt")["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] in (0, 1)
    result = runner.invoke(main, ["train", "--out", str(run), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    state = load_checkpoint(run / "last.pt")
    assert state["iteration"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    monkeypatch.undo()
    plain = tmp_path / "plain"  # float32, saved with an empty scaler state, resumed under float16 and a scaler
    assert runner.invoke(main, _train_args(built_train, plain, "--stop-after", "1")).exit_code == 0
    _spy_precision(monkeypatch, Precision("cpu", torch.float16))
    result = runner.invoke(main, ["train", "--out", str(plain), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(plain / "last.pt")["scaler"]["scale"] > 0
