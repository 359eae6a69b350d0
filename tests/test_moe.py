import pytest
import torch

from medfedpure.config import ModelConfig
from medfedpure.models import PersonalizedMoE, build_backbone


def tiny(**kw) -> PersonalizedMoE:
    torch.manual_seed(0)
    return PersonalizedMoE(4, ModelConfig(backbone="small_cnn", num_experts=3, **kw))


def test_gate_sums_to_one_and_mixture_is_a_distribution():
    model = tiny().eval()
    out = model.details(torch.rand(5, 3, 32, 32))
    assert out.gate.shape == (5, 3) and out.expert_logits.shape == (5, 3, 4)
    assert torch.allclose(out.gate.sum(1), torch.ones(5), atol=1e-6)
    assert torch.allclose(out.log_probs.exp().sum(1), torch.ones(5), atol=1e-5)
    manual = (out.gate.unsqueeze(-1) * out.expert_logits.softmax(-1)).sum(1)
    assert torch.allclose(out.log_probs.exp(), manual, atol=1e-6)


def test_loss_terms_and_entropy_sign():
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 4, (6,))
    base = tiny(beta=0.0, gamma=0.0).train()
    torch.manual_seed(1)
    loss0, parts = base.loss(x, y)
    assert parts["gate_entropy"] > 0
    withent = tiny(beta=0.0, gamma=0.5).train()
    torch.manual_seed(1)
    loss1, parts1 = withent.loss(x, y)
    # + gamma * H(alpha): the entropy term adds, so minimising the loss sharpens the gate
    assert loss1.item() == pytest.approx(loss0.item() + 0.5 * parts1["gate_entropy"], rel=1e-5)
    withl2 = tiny(beta=0.1, gamma=0.0).train()
    torch.manual_seed(1)
    loss2, parts2 = withl2.loss(x, y)
    assert loss2.item() == pytest.approx(loss0.item() + 0.1 * parts2["attention_l2"], rel=1e-5)


def test_label_smoothing_smooths_the_mixtures_targets_as_cross_entropy_does():
    """train.label_smoothing on Eq. 9's NLL: the mixture's log-probabilities against smoothed targets,
    F.cross_entropy's label_smoothing on them (they are normalized, so they are their own log-softmax)."""
    import torch.nn.functional as F

    from medfedpure.models.mixture import LearnerMixture

    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 4, (6,))
    model = tiny(beta=0.0, gamma=0.0).eval()
    log_probs = model.details(x).log_probs
    plain, _ = model.loss(x, y)
    smoothed, parts = model.loss(x, y, 0.2)
    assert smoothed.item() == pytest.approx(F.cross_entropy(log_probs, y, label_smoothing=0.2).item(), rel=1e-5)
    assert parts["nll"] == pytest.approx(smoothed.item(), rel=1e-5) and smoothed.item() != pytest.approx(plain.item())
    torch.manual_seed(0)
    learners = LearnerMixture(4, ModelConfig(backbone="small_cnn"), learners=2, shared=True).eval()
    logits = learners.learner_logits(x)
    expected = torch.stack([F.cross_entropy(logits[:, k], y, reduction="none", label_smoothing=0.2) for k in range(2)], 1)
    assert torch.allclose(learners.learner_losses(x, y, 0.2), expected, atol=1e-6)
    assert not torch.allclose(learners.learner_losses(x, y), expected)  # the E-step's likelihood stays plain


def test_entropy_term_makes_the_gate_sharper():
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 4, (16,))
    model = tiny(beta=0.0, gamma=5.0).train()
    opt = torch.optim.SGD(model.attention.parameters(), lr=0.5)
    start = model.loss(x, y)[1]["gate_entropy"]
    for _ in range(30):
        loss, _ = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.loss(x, y)[1]["gate_entropy"] < start - 0.1


def test_only_experts_are_shared():
    model = tiny()
    shared, gate = model.expert_state(), model.gate_state()
    assert shared and all(k.startswith("experts.") for k in shared)
    assert gate and all(k.startswith("attention.") for k in gate)
    assert any("running_mean" in k for k in shared)  # BatchNorm buffers travel with the experts
    assert set(shared) | set(gate) == set(model.state_dict())
    other = tiny()
    other.load_experts({k: v + 1 for k, v in shared.items() if v.is_floating_point()} |
                       {k: v for k, v in shared.items() if not v.is_floating_point()})
    with pytest.raises(KeyError):
        other.load_experts({"experts.0.nope": torch.zeros(1)})


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("mobilenet_v2", 1280), ("small_cnn", 64)])
def test_backbones(name, dim):
    net, d = build_backbone(name)
    assert d == dim
    assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, dim)


def test_narrow_resnet18_has_the_same_layout_at_a_fraction_of_the_weights():
    full, _ = build_backbone("resnet18")
    narrow, dim = build_backbone("resnet18", width=32)
    assert dim == 256 and narrow.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 256)
    assert [n for n, _ in narrow.named_children()][:4] == ["conv1", "bn1", "act1", "maxpool"]
    assert [len(getattr(narrow, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]  # ResNet-18's blocks
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert 0.2 < count(narrow) / count(full) < 0.3
    grouped, _ = build_backbone("resnet18", width=32, norm="group", small_input_stem=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in grouped.modules())
    assert grouped.conv1.stride == (1, 1) and grouped.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 256)
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", pretrained_weights="imagenet", width=32)
    with pytest.raises(ValueError, match="width"):
        build_backbone("mobilenet_v2", width=32)
    model = PersonalizedMoE(2, ModelConfig(backbone="resnet18", num_experts=2, width=32))
    assert all(e.backbone.layer4[-1].conv2.out_channels == 256 for e in model.experts)


@pytest.mark.parametrize("name, last_block, side", [("resnet18", "layer4", 4), ("mobilenet_v2", "features", 2)])
def test_small_input_stem_keeps_resolution(name, last_block, side):
    sizes = {}
    for small in (False, True):
        net, dim = build_backbone(name, small_input_stem=small)
        getattr(net, last_block).register_forward_hook(lambda m, i, o, s=small: sizes.__setitem__(s, o.shape[-1]))
        assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, dim)
    assert sizes == {False: 1, True: side}


def test_small_input_stem_reaches_the_model():
    cfg = ModelConfig(backbone="mobilenet_v2", num_experts=2, small_input_stem=True)
    model = PersonalizedMoE(10, cfg)
    assert all(e.backbone.features[0][0].stride == (1, 1) for e in model.experts)
    with pytest.raises(ValueError, match="small_input_stem"):
        build_backbone("small_cnn", small_input_stem=True)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_group_norm_backbone_has_no_running_statistics(name):
    net, dim = build_backbone(name, norm="group", small_input_stem=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert not any("running" in k for k in net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(net.train()(x), net.eval()(x), atol=1e-5)  # no train/eval gap to average away
    with pytest.raises(ValueError, match="model.norm"):
        build_backbone(name, pretrained_weights="imagenet", norm="group")


def test_local_weights_file(tmp_path):
    from torchvision.models import resnet18
    ref = resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    net, _ = build_backbone("resnet18", str(tmp_path / "r18.pth"))
    assert torch.equal(net.conv1.weight, ref.conv1.weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_resnet9_is_page_s_layout_and_takes_a_width():
    """ResNet-9 (the fast CIFAR-10 network): 8w features from any image size, residual stages, a
    quarter of the weights at half the width; refused with pretrained weights or the 32-px stem switch."""
    net, dim = build_backbone("resnet9")
    assert dim == 512 and net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 512)
    half, dim = build_backbone("resnet9", width=32)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert dim == 256 and 6.4e6 < count(net) < 6.7e6 and count(half) == pytest.approx(count(net) / 4, rel=0.01)
    grouped, _ = build_backbone("resnet9", norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in grouped.modules())
    for bad in ({"pretrained_weights": "imagenet"}, {"small_input_stem": True}):
        with pytest.raises(ValueError, match="resnet9"):
            build_backbone("resnet9", **bad)
