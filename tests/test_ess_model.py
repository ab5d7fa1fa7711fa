"""Segmenter shapes, prediction rule, GroupNorm conversion, and the offline --pretrained error."""
import pytest
import torch
import torch.nn as nn

from ess.model import PretrainedWeightsError, build_model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {head: build_model(head, 17, encoder="resnet18").eval() for head in ("softmax", "ess")}


@pytest.mark.parametrize("size", [(64, 64), (50, 77)])
def test_output_at_input_resolution(models, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = models["softmax"](x)
        emb = models["ess"](x)
    assert logits.shape == (2, 17, *size)
    assert emb.shape == (2, 12, *size)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2, *size), atol=1e-5)
    for head, out in (("softmax", logits), ("ess", emb)):
        pred = models[head].predict(out)
        assert pred.shape == (2, *size) and pred.dtype == torch.int64
        assert pred.min() >= 1 and pred.max() <= 17


@pytest.mark.parametrize("knn", ["torch", "faiss"])
def test_ess_prediction_is_the_nearest_class(models, knn):
    head = models["ess"].head
    head.knn = knn
    torch.manual_seed(1)
    out = nn.functional.normalize(torch.randn(2, 12, 9, 11), dim=1)
    pred = head.predict(out)
    classes = head.class_embeddings()
    dist = torch.cdist(out.permute(0, 2, 3, 1).reshape(-1, 12).double(), classes.double())
    assert torch.equal(pred.flatten(), dist.argmin(1) + 1)


def test_softmax_prediction_is_the_argmax(models):
    logits = torch.randn(1, 17, 5, 6)
    assert torch.equal(models["softmax"].predict(logits), logits.argmax(1) + 1)


def test_class_embeddings_interface():
    torch.manual_seed(0)
    m = build_model("ess", 40, encoder="resnet18", embed_dim=5)
    raw = m.head.embeddings
    assert isinstance(raw, nn.Parameter) and raw.shape == (40, 5)
    assert raw.min() >= -1 and raw.max() <= 1  # initialised uniform in [-1, 1]
    assert torch.allclose(m.head.class_embeddings(), nn.functional.normalize(raw, dim=1))
    plain = build_model("ess", 40, encoder="resnet18", embed_dim=5, normalize=False)
    assert torch.equal(plain.head.class_embeddings(), plain.head.embeddings)
    out = plain.eval()(torch.randn(1, 3, 32, 32))
    assert not torch.allclose(out.norm(dim=1), torch.ones(1, 32, 32))


def test_deeplab_settings_and_encoder_bn_momentum():
    m = build_model("softmax", 3, encoder="resnet18")
    rates = [conv[0][0].dilation[0] for conv in list(m.decoder.aspp[0].convs)[1:4]]
    assert rates == [6, 12, 18]
    assert all(bn.momentum == 0.01 for bn in m.encoder.modules() if isinstance(bn, nn.BatchNorm2d))
    assert m.output_stride == 16
    dropouts = [d.p for d in m.decoder.modules() if isinstance(d, nn.Dropout)]
    assert dropouts == [0.5]  # the ASPP projection's, segmentation-models-pytorch's default
    off = build_model("softmax", 3, encoder="resnet18", aspp_dropout=0.0)
    assert [d.p for d in off.decoder.modules() if isinstance(d, nn.Dropout)] == [0.0]


@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v2"])
def test_groupnorm_replaces_every_batchnorm(encoder):
    m = build_model("ess", 5, encoder=encoder, norm="gn")
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert any(isinstance(x, nn.GroupNorm) for x in m.modules())
    m.train()
    out = m(torch.randn(1, 3, 32, 32))  # batch 1 trains with GroupNorm
    m.loss(out, torch.randint(0, 6, (1, 32, 32))).backward()


def test_pretrained_offline_is_one_clear_error(monkeypatch):
    import segmentation_models_pytorch as smp

    def offline(*args, **kwargs):
        if kwargs.get("encoder_weights"):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file\nmore detail")
        return real(*args, **kwargs)

    real = smp.DeepLabV3Plus
    monkeypatch.setattr(smp, "DeepLabV3Plus", offline)
    with pytest.raises(PretrainedWeightsError) as e:
        build_model("softmax", 3, encoder="resnet18", pretrained=True)
    assert "resnet18" in str(e.value) and "\n" not in str(e.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="option 'head' must be one of"):
        build_model("crf", 3)
    with pytest.raises(ValueError, match="option 'encoder' must be one of"):
        build_model("ess", 3, encoder="vgg11")
    with pytest.raises(TypeError, match="temperature"):
        build_model("ess", 3, encoder="resnet18", temperature=3)
