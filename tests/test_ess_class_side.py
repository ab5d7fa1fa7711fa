"""The class side of ESS: where the pixel embedding is normalised, prototype class embeddings, the pixel-mean
readout and the published optimiser's LR floor, each against a direct computation."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ess_head


def test_normalising_at_decoder_resolution_then_upsampling():
    torch.manual_seed(0)
    head = ess_head(8, 30, embed_dim=6, normalize_at="decoder")
    features = torch.randn(2, 8, 5, 7)
    out = head(features, (20, 28))
    low = F.normalize(head.projection(features), dim=1)
    torch.testing.assert_close(out, F.interpolate(low, size=(20, 28), mode="bilinear", align_corners=False))
    norms = out.norm(dim=1)
    assert norms.max() <= 1 + 1e-5 and norms.min() < 0.999  # unit at decoder resolution, shorter in between
    after = ess_head(8, 30, embed_dim=6)  # the default: every output pixel unit length
    after.load_state_dict(head.state_dict())
    torch.testing.assert_close(after(features, (20, 28)).norm(dim=1), torch.ones(2, 20, 28))


def class_means(pixels, target, num_classes):
    """Brute force: per class, the mean of its normalised pixel embeddings (None where absent)."""
    unit = F.normalize(pixels.double(), dim=1)
    return [unit[target == c].mean(0) if (target == c).any() else None for c in range(num_classes)]


@pytest.mark.parametrize("normalize", [True, False])
def test_prototypes_are_running_means_of_their_pixels_then_a_moving_average(normalize):
    torch.manual_seed(1)
    head = ess_head(4, 6, embed_dim=3, class_update="prototype", proto_momentum=0.6, normalize=normalize).train()
    assert not any(p is head.embeddings for p in head.parameters())  # a buffer: no gradient, no optimiser
    start = head.embeddings.clone()
    batches = [(torch.randn(50, 3), torch.randint(0, 5, (50,))) for _ in range(4)]  # class 5 never appears
    expected = [start[c].double() for c in range(6)]
    seen = [0] * 6
    for pixels, target in batches:
        head.update_prototypes(pixels, target)
        for c, mean in enumerate(class_means(pixels, target, 6) if normalize else
                                 [pixels[target == c].double().mean(0) if (target == c).any() else None
                                  for c in range(6)]):
            if mean is None:
                continue
            seen[c] += 1
            m = min(0.6, 1 - 1 / seen[c])  # 0, 0.5, then the momentum's 0.6
            expected[c] = m * expected[c] + (1 - m) * mean
            if normalize:
                expected[c] = F.normalize(expected[c], dim=0)
    torch.testing.assert_close(head.embeddings.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert torch.equal(head.embeddings[5], start[5]) and head.proto_batches.tolist() == seen


def test_prototype_head_trains_its_pixels_only_and_skips_the_regulariser():
    torch.manual_seed(2)
    head = ess_head(8, 12, embed_dim=4, class_update="prototype", margin=5.0).train()
    features = torch.randn(2, 8, 4, 4, requires_grad=True)
    mask = torch.randint(0, 13, (2, 16, 16))
    before = head.embeddings.clone()
    loss = head.loss(head(features, (16, 16)), mask)
    loss.backward()
    assert features.grad.abs().sum() > 0 and not torch.equal(head.embeddings, before)
    head.eval()  # no update outside training
    frozen = head.embeddings.clone()
    head.loss(head(features, (16, 16)), mask)
    assert torch.equal(head.embeddings, frozen)


def test_prototype_state_is_checkpointed(tmp_path):
    from ess.checkpoint import load_model, save_checkpoint
    from ess.model import build_model

    torch.manual_seed(3)
    model = build_model("ess", 9, encoder="resnet18", embed_dim=4, class_update="prototype").train()
    model.loss(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 10, (2, 32, 32)))
    assert "class_embeddings" not in model.param_groups()
    save_checkpoint(tmp_path / "p.pt", {"iteration": 1, "model_args": model.args.__dict__, "model": model.state_dict(),
                                        "config": {}})
    loaded, _ = load_model(tmp_path / "p.pt")
    assert torch.equal(loaded.head.embeddings, model.head.embeddings)
    assert torch.equal(loaded.head.proto_batches, model.head.proto_batches)


def test_lr_floor():
    from ess.optim import set_lr

    group = {"name": "decoder", "base_lr": 0.02, "power": 0.9}

    class Opt:
        param_groups = [group]

    assert set_lr(Opt, 50, 100, 1e-6) == pytest.approx(0.02 * 0.5 ** 0.9)
    assert set_lr(Opt, 100, 100, 1e-6) == 1e-6 and set_lr(Opt, 100, 100, 0.0) == 0.0


def test_pixel_mean_readout_equals_the_class_means_of_the_training_images(tiny_runs, built_train, built_val):
    from cocolvis.dataset import BuiltDataset
    from ess.data import EvalSamples
    from ess.readout import pixel_mean_readout
    from ess.run import load_run

    run = load_run(tiny_runs["ess"], device="cpu")
    train = BuiltDataset(built_train)
    readout = pixel_mean_readout(run.model, train, torch.device("cpu"))
    sums = torch.zeros(train.num_classes, run.model.head.embeddings.shape[1], dtype=torch.float64)
    counts = torch.zeros(train.num_classes, dtype=torch.float64)
    with torch.no_grad():
        for image, mask, _ in EvalSamples(train):
            out = F.normalize(run.model(image[None])[0].double(), dim=0)
            for c in mask.unique().tolist():
                if c > 0:
                    sums[c - 1] += out[:, mask == c].sum(1)
                    counts[c - 1] += (mask == c).sum()
    seen = counts > 0
    torch.testing.assert_close(readout.head.embeddings[seen].double(), sums[seen] / counts[seen, None],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(readout.head.embeddings[~seen], run.model.head.embeddings[~seen])  # unseen: learned kept
    assert not torch.equal(readout.head.embeddings, run.model.head.embeddings)  # the run itself is untouched


def test_eval_with_the_pixel_mean_readout(tiny_runs, built_val, tmp_path):
    import json

    from click.testing import CliRunner

    from ess.cli import main

    result = CliRunner().invoke(main, ["eval", "--run", str(tiny_runs["ess"]), "--data", str(built_val),
                                       "--readout", "pixel-mean", "--out", str(tmp_path / "pm"), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "pm" / "metrics.json").read_text())
    assert metrics["readout"] == "pixel-mean" and 0 <= metrics["miou"] <= 1
    refused = CliRunner().invoke(main, ["eval", "--run", str(tiny_runs["softmax"]), "--data", str(built_val),
                                        "--readout", "pixel-mean", "--out", str(tmp_path / "sm"), "--quiet"])
    assert refused.exit_code == 1 and "needs an ESS run" in refused.output and "Traceback" not in refused.output
