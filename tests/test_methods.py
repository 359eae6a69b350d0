"""The baselines (docs/design.md, Baselines): their models, FedEM's EM steps, adversarial training, and each
method trained through a real Flower simulation, with the internal-evasion matrix."""

import json
import math

import numpy as np
import pytest
import torch

from medfedpure.attacks import PGD
from medfedpure.config import ConfigError, ExperimentConfig, ModelConfig, apply_overrides
from medfedpure.data import make_synthetic
from medfedpure.methods import METHODS, parse_methods
from medfedpure.methods.baselines import (ClientTrainingSet, adversarial_batch, adversarial_shares, e_step,
                                          make_adversarial_set, train_fedem, train_plain)
from medfedpure.models import LearnerMixture

from conftest import demo


SMALL = ModelConfig(backbone="small_cnn", head_hidden=16)


def _data(n_per_class=12, size=16):
    return make_synthetic(n_per_class, size, seed=3)


# ----------------------------------------------------------------------------- seeds
def test_no_two_purposes_or_hospitals_share_a_seed():
    """Every seed a hospital draws (task.SEEDS: rounds, phase 4, the transfer matrix, the suite, the
    evaluation, the defense) differs from every other hospital's and purpose's, for 200 hospitals."""
    from medfedpure.methods import task
    cfg = ExperimentConfig()
    seen: dict[int, tuple] = {}
    for client in range(200):
        for purpose, (_, size) in task.SEEDS.items():
            for index in range(size):
                seed = task.client_seed(cfg, client, index, purpose)
                assert seed not in seen, f"{(client, purpose, index)} and {seen[seed]} share seed {seed}"
                seen[seed] = (client, purpose, index)
    assert task.client_seed(cfg, 3, 7) == task.client_seed(cfg, 3, 7, "round")  # a round by default
    with pytest.raises(ValueError, match="outside purpose 'suite'"):
        task.client_seed(cfg, 0, 1, "suite")


# ----------------------------------------------------------------------------- models and registry
def test_every_baseline_is_configurable_on_the_shipped_preset(tmp_path):
    """br35h-cpu ships phase 4 and the defense's shares: a baseline trains with none of them (the
    `train --method fedavg` of the poisoning and privacy measurements was refused when phase 4 shipped)."""
    from medfedpure.config import load_preset

    cfg = apply_overrides(load_preset("br35h-cpu"), [f"data.root={tmp_path}"])
    cfg.data.dataset = "synthetic"
    assert cfg.defense.purifier.rounds > 0
    for name, method in METHODS.items():
        out = method.configure(cfg)
        if not method.defended:
            assert out.defense.purifier.rounds == 0 and not out.defense.enabled, name


def test_registry_and_parse_methods():
    assert list(METHODS) == ["medfedpure", "fedavg", "local", "fedem", "fat", "local-adv", "pfeddef"]
    assert parse_methods("all") == list(METHODS)
    assert parse_methods("pfeddef, medfedpure") == ["medfedpure", "pfeddef"]  # registry order
    with pytest.raises(ValueError, match="fedprox"):
        parse_methods("fedavg,fedprox")
    cfg = ExperimentConfig()
    cfg.method.name = "fedprox"
    with pytest.raises(ConfigError, match="method.name"):
        cfg.validate()


def test_mixture_prediction_is_the_pi_weighted_mixture_of_softmaxes():
    torch.manual_seed(0)
    model = LearnerMixture(3, SMALL, learners=3).eval()
    model.log_pi.copy_(torch.tensor([0.2, 0.5, 0.3]).log())
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        probs = torch.softmax(model.learner_logits(x), dim=-1)
        expected = (torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1) * probs).sum(1).log()
        assert torch.allclose(model(x), expected, atol=1e-5)
        single = LearnerMixture(3, SMALL, learners=1).eval()
        assert torch.allclose(single(x), torch.log_softmax(single.learner_logits(x)[:, 0], dim=-1), atol=1e-6)


def test_what_travels_and_what_stays_per_method():
    cfg = ExperimentConfig(model=SMALL)
    for name in ("fedavg", "fat", "fedem", "pfeddef"):
        cfg.method.name = name
        model = METHODS[cfg.method.name].build(cfg, 2)
        assert model.expert_state() and all(k.startswith("experts.") for k in model.expert_state())
        assert set(model.gate_state()) == {"log_pi"}, name
        assert model.num_learners == (3 if name in {"fedem", "pfeddef"} else 1)
    for name in ("local", "local-adv"):
        cfg.method.name = name
        model = METHODS[cfg.method.name].build(cfg, 2)
        assert model.expert_state() == {}  # nothing is ever sent
        assert set(model.gate_state()) == set(model.state_dict())
        model.load_gate({k: v.clone() for k, v in model.gate_state().items()})
    with pytest.raises(KeyError):
        LearnerMixture(2, SMALL, learners=2).load_gate({"log_pi": torch.zeros(2), "extra": torch.zeros(1)})


# ----------------------------------------------------------------------------- FedEM
def test_e_step_responsibilities_sum_to_one_and_set_pi():
    torch.manual_seed(0)
    data = _data()
    idx = np.arange(len(data))
    model = LearnerMixture(2, SMALL, learners=3)
    q = e_step(model, ClientTrainingSet(data, idx, augment=False), ExperimentConfig())
    assert q.shape == (len(idx), 3)
    assert torch.allclose(q.sum(1), torch.ones(len(idx)), atol=1e-5)
    assert torch.allclose(model.log_pi.exp(), q.mean(0), atol=1e-5)
    # the E-step formula: q_i(m) proportional to pi_m exp(-loss_m(x_i, y_i))
    model.eval()
    x, y = torch.stack([ClientTrainingSet(data, idx, False)[i][0] for i in range(4)]), torch.from_numpy(data.labels[:4])
    with torch.no_grad():
        losses = model.learner_losses(x, y)
    expected = torch.softmax(torch.full((3,), -math.log(3)) - losses, dim=1)
    assert torch.allclose(q[:4], expected, atol=1e-4)


def test_m_step_weights_each_learner_by_its_responsibility():
    torch.manual_seed(0)
    model = LearnerMixture(2, SMALL, learners=2)
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 0, 1, 0, 1])
    weights = torch.tensor([[1.0, 0.0]] * 6)  # learner 1 owns no sample
    loss, _ = model.loss(x, y, weights=weights)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.experts[1].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.experts[0].parameters())


def test_train_fedem_updates_pi_and_trains():
    torch.manual_seed(0)
    data = _data(20)
    cfg = ExperimentConfig(model=SMALL)
    cfg.train.local_epochs, cfg.train.batch_size = 1, 8
    model = LearnerMixture(2, SMALL, learners=3)
    before = {k: v.clone() for k, v in model.expert_state().items()}
    stats = train_fedem(model, data, np.arange(len(data)), cfg, lr=0.01, seed=0)
    assert stats["train_loss"] > 0 and stats["adv_share"] == 0
    assert abs(float(model.log_pi.exp().sum()) - 1) < 1e-5
    assert any(not torch.equal(before[k], v) for k, v in model.expert_state().items())


# ----------------------------------------------------------------------------- adversarial training
def test_adversarial_batch_replaces_the_share_within_eps():
    torch.manual_seed(0)
    model = LearnerMixture(2, SMALL).eval()
    attack = PGD(model, eps=0.03, alpha=0.01, steps=3)
    x, y = torch.rand(10, 3, 16, 16), torch.randint(0, 2, (10,))
    mixed, k = adversarial_batch(attack, x, y, share=0.4)
    assert k == 4
    delta = (mixed - x).abs().flatten(1).amax(1)
    assert (delta[:4] > 0).all() and (delta[:4] <= 0.03 + 1e-6).all()
    assert torch.equal(mixed[4:], x[4:])
    assert adversarial_batch(attack, x, y, 0.0)[1] == 0


def test_defense_in_depth_batch_keeps_raw_attacks_raw_and_labels_in_place():
    """defense.adv_raw_share: after the scans attacked through the purifier (then purified) come
    those attacked on the classifier alone, left raw; then half of the rest purified, half clean.
    Every scan stays at its label's position; without it the batch is what it was."""
    from medfedpure.defense import build_diffusion
    from medfedpure.methods.medfedpure import defended_training_batch

    cfg = demo()
    diffusion = build_diffusion(cfg).eval()
    x, y = torch.rand(10, 3, 32, 32), torch.arange(10) % 2
    through = lambda xb, yb: (xb + 0.01).clamp(0, 1)  # noqa: E731 (stand-ins that mark their scans)
    raw = lambda xb, yb: 1 - xb  # noqa: E731
    out = defended_training_batch(x, y, diffusion, through, 0.2, cfg, torch.Generator().manual_seed(0), raw, 0.3)
    assert out.shape == x.shape
    assert torch.equal(out[2:5], 1 - x[2:5])  # raw: the attack on the classifier alone, not purified
    assert torch.equal(out[7:], x[7:])  # the clean half of the rest
    assert not torch.equal(out[:2], x[:2] + 0.01) and not torch.equal(out[5:7], x[5:7])  # purified
    plain = defended_training_batch(x, y, diffusion, through, 0.2, cfg, torch.Generator().manual_seed(0))
    again = defended_training_batch(x, y, diffusion, through, 0.2, cfg, torch.Generator().manual_seed(0), raw, 0.0)
    assert torch.equal(plain, again) and torch.equal(plain[6:], x[6:])


def test_the_defenses_training_attack_is_defense_adv_attack_where_set(monkeypatch):
    """defense.adv_attack names the attack of MedFedPure's adversarial shares (both of them), so the
    defense can train on N-FGSM while FAT keeps method.adv_attack's PGD; unset, it is method.adv_attack."""
    from medfedpure.defense import build_diffusion
    from medfedpure.methods import medfedpure, new_model

    made = []

    def record(model, cfg, seed):  # the attack each share is crafted with, then a no-op in its place
        made.append(cfg.method.adv_attack)
        return lambda xb, yb: xb

    monkeypatch.setattr(medfedpure, "make_training_attack", record)
    cfg = demo("defense.purify_training=true", "defense.adv_share=0.25", "defense.adv_raw_share=0.25",
               "train.local_epochs=1")
    model, diffusion = new_model(cfg, 2, 0), build_diffusion(cfg).eval()
    batches = [(torch.rand(8, 3, 32, 32), torch.arange(8) % 2)]
    medfedpure.train_local(model, batches, cfg, purifier=diffusion)
    cfg.defense.adv_attack = "n-fgsm"
    medfedpure.train_local(model, batches, cfg, purifier=diffusion)
    assert made == ["pgd", "pgd", "n-fgsm", "n-fgsm"] and cfg.method.adv_attack == "pgd"


def test_pfeddef_replaces_share_g_of_the_scans_with_pgd_examples():
    torch.manual_seed(0)
    data = _data(15)
    idx = np.arange(5, len(data))  # positions within the split, not dataset indices
    cfg = ExperimentConfig(model=SMALL)
    cfg.method.name, cfg.method.adv_data_share = "pfeddef", 0.4
    cfg.attack.eps, cfg.attack.alpha, cfg.attack.steps = 0.03, 0.01, 3
    model = LearnerMixture(2, SMALL, learners=2)
    adv = make_adversarial_set(model, data, idx, cfg, seed=1, rnd=1)
    assert len(adv.index) == math.ceil(0.4 * len(idx)) and len(set(adv.index.tolist())) == len(adv.index)
    clean = ClientTrainingSet(data, idx, augment=False)
    replaced = ClientTrainingSet(data, idx, augment=False, replaced=adv)
    for k, pos in enumerate(adv.index.tolist()):
        x_clean, x_adv = clean[pos][0], replaced[pos][0]
        assert torch.equal(x_adv, adv.images[k])
        assert 0 < (x_adv - x_clean).abs().max() <= 0.03 + 1e-6
    untouched = next(i for i in range(len(idx)) if i not in set(adv.index.tolist()))
    assert torch.equal(clean[untouched][0], replaced[untouched][0])
    # a separate adversarial-training budget is honoured and recorded
    cfg.method.adv_eps, cfg.method.adv_norm = 0.5, "l2"
    assert cfg.adversarial_training_attack().eps == 0.5 and cfg.adversarial_training_attack().norm == "l2"
    assert cfg.attack.eps == 0.03
    # a client's solved share h_i replaces G
    assert len(make_adversarial_set(model, data, idx, cfg, seed=1, rnd=1, share=0.1).index) == math.ceil(0.1 * len(idx))


def test_resource_aware_shares_meet_g_within_the_caps():
    assert adversarial_shares(0.4, [10, 20, 30], None) == [0.4] * 3
    assert adversarial_shares(0.4, [10, 20, 30], 0.9) == pytest.approx([0.4] * 3)  # caps above G: no change
    # clients short of resources take their cap; the others cover the rest, equally
    shares = adversarial_shares(0.4, [100, 100, 100, 100], [0.0, 0.1, 1.0, 1.0])
    assert shares == pytest.approx([0.0, 0.1, 0.75, 0.75])
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(1, 500, size=8)
        caps = rng.uniform(0, 1, size=8)
        g = float(rng.uniform(0, 0.6))
        h = np.array(adversarial_shares(g, sizes, caps.tolist()))
        assert np.all(h <= caps + 1e-12) and np.all(h >= 0)
        reached = float(h @ sizes / sizes.sum())
        if caps @ sizes / sizes.sum() >= g:
            assert reached == pytest.approx(g)
            # as equal as the caps allow: whoever is below the top share is at its cap
            assert np.all((h >= h.max() - 1e-9) | (np.abs(h - caps) < 1e-9))
        else:
            assert np.allclose(h, caps)  # infeasible: everyone at its cap


def test_resource_caps_are_validated():
    cfg = ExperimentConfig()
    cfg.data.num_clients = 3
    cfg.method.adv_resources = [0.5, 0.5]
    with pytest.raises(ConfigError, match="method.adv_resources"):
        cfg.validate()
    cfg.method.adv_resources = 1.5
    with pytest.raises(ConfigError, match="method.adv_resources"):
        cfg.validate()
    cfg.method.adv_resources = [0.1, 0.5, 1]
    cfg.validate()


# ----------------------------------------------------------------------------- through Flower
BASELINES = ["fedavg", "local", "fedem", "fat", "local-adv", "pfeddef"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from medfedpure.workflows.training import run_federated

    cfg = demo()
    cfg.data.num_clients = 2
    cfg.data.partition = "dirichlet"  # alpha 100: classes near 50/50 (chance), but unequal n_i
    cfg.data.dirichlet_alpha = 100.0
    cfg.data.synthetic_per_class = 400
    cfg.train.rounds = 2
    cfg.train.local_epochs = 3
    cfg.attack.max_eval_per_client = 24
    cfg.method.adv_every = 1
    cfg.method.adv_steps = 2  # cheaper adversarial training; the evaluation attack keeps 7 steps
    cfg.method.adv_resources = [0.2, 1.0]  # pFedDef: client 0 can afford 20%, client 1 covers the rest of G
    root = tmp_path_factory.mktemp("methods")
    return {m: run_federated(METHODS[m].configure(cfg), root / m, keep_client_arrays=(m == "fedem"), progress=False)
            for m in BASELINES}


def _majority_rate(run_dir) -> float:
    """Accuracy of always answering each client's most common test class."""
    clients = json.loads((run_dir / "partition.json").read_text())["clients"]
    return sum(max(c["test_class_counts"]) for c in clients) / sum(c["n_test"] for c in clients)


@pytest.mark.slow
def test_every_baseline_trains_through_flower_and_beats_chance(trained):
    majority = _majority_rate(next(iter(trained.values())).out_dir)
    for name, run in trained.items():
        assert len(run.history) == 2, name
        assert run.final["clean_acc"] > max(0.62, majority + 0.06), (name, run.final, majority)


@pytest.mark.slow
def test_local_methods_send_nothing_and_shared_ones_only_experts(trained):
    for name, run in trained.items():
        for rec in run.history.values():
            if name.startswith("local"):
                assert rec["sent_keys"] == [] and all(c["received_keys"] == [] for c in rec["clients"].values())
            else:
                assert rec["sent_keys"] and all(k.startswith("experts.") for k in rec["sent_keys"])


@pytest.mark.slow
def test_fedem_keeps_pi_on_the_client_and_averages_each_learner_by_n(trained):
    from safetensors.torch import load_file

    run = trained["fedem"]
    pis = [load_file(str(run.out_dir / "clients" / f"client_{i:02d}" / "gate.safetensors"))["log_pi"].exp()
           for i in range(2)]
    assert all(abs(float(p.sum()) - 1) < 1e-5 for p in pis)
    assert not torch.allclose(pis[0], pis[1])  # personal mixture weights
    rec = run.history[2]
    clients = list(rec["clients"].values())
    n = np.array([c["n_train"] for c in clients], dtype=np.float64)
    assert len(set(n)) > 1
    for key in ("experts.0.head.2.weight", "experts.2.head.2.weight"):
        expected = sum(w * c["arrays"][key] for w, c in zip(n / n.sum(), clients))
        plain = sum(c["arrays"][key] for c in clients) / len(clients)
        error = np.abs(rec["aggregated"][key] - expected).max()
        assert error < 1e-6 and np.abs(rec["aggregated"][key] - plain).max() > 100 * error + 1e-6


@pytest.mark.slow
def test_adversarial_methods_really_train_on_pgd(trained):
    for name, share in (("fat", 0.5), ("local-adv", 0.5)):
        for rec in trained[name].history.values():
            for c in rec["clients"].values():
                assert abs(c["adv_share"] - share) < 0.06, (name, c["adv_share"])
    # pFedDef with caps [0.2, 1.0]: client 0 at its cap, client 1 above G, n-weighted mean G = 0.4
    for rec in trained["pfeddef"].history.values():
        n = np.array([rec["clients"][i]["n_train"] for i in (0, 1)], dtype=float)
        h = np.array([rec["clients"][i]["adv_share"] for i in (0, 1)])
        assert abs(h[0] - 0.2) < 0.02 and h[1] > 0.5, h
        assert abs(h @ n / n.sum() - 0.4) < 0.02
    for name in ("fedavg", "local", "fedem"):
        assert all(c["adv_share"] == 0 for rec in trained[name].history.values() for c in rec["clients"].values())
    saved = trained["pfeddef"].out_dir / "clients" / "client_00" / "adversarial_scans.safetensors"
    assert saved.is_file()


@pytest.mark.slow
def test_transfer_matrix_shape_and_white_box_diagonal(trained):
    from medfedpure.config import ExperimentConfig
    from medfedpure.evaluation.transfer import transfer_done, transfer_matrix

    for name in ("local", "pfeddef"):
        run = trained[name]
        cfg = ExperimentConfig.from_dict(json.loads((run.out_dir / "config.json").read_text()))
        result = transfer_matrix(run.out_dir, progress=False)
        matrix = np.array(result["bare"]["matrix"])
        assert matrix.shape == (2, 2)
        white_box = {c: m["adv_acc"] for c, m in run.history[2]["clients"].items()}
        np.testing.assert_allclose(np.diag(matrix), [white_box[c] for c in range(2)], atol=1e-6)
        # the unattacked floor: its diagonal is each client's clean accuracy on the scans it attacked
        clean = np.array(result["bare"]["clean_matrix"])
        on_attacked = {c: m["clean_acc_attacked"] for c, m in run.history[2]["clients"].items()}
        np.testing.assert_allclose(np.diag(clean), [on_attacked[c] for c in range(2)], atol=1e-6)
        off_diagonal = clean[~np.eye(2, dtype=bool)].mean()
        assert result["bare"]["clean_off_diagonal_mean"] == pytest.approx(off_diagonal, abs=1e-6)
        assert "defended" not in result
        saved = json.loads((run.out_dir / "transfer.json").read_text())
        assert saved["bare"]["diagonal_mean"] == pytest.approx(np.diag(matrix).mean(), abs=1e-6)  # saved to 6 places
        assert (run.out_dir / "transfer.png").is_file()
        assert transfer_done(run.out_dir, cfg)
        # a matrix saved before the clean floor existed is redone
        del saved["bare"]["clean_matrix"]
        (run.out_dir / "transfer.json").write_text(json.dumps(saved))
        assert not transfer_done(run.out_dir, cfg)


@pytest.mark.slow
def test_experiment_compares_methods_and_resumes(tmp_path):
    from medfedpure.workflows.experiment import run_experiment

    cfg = demo()
    cfg.data.num_clients = 2
    cfg.data.synthetic_per_class = 60
    cfg.train.rounds = 1
    cfg.attack.max_eval_per_client = 8
    # beside the suite: the headline attacks on every test scan, and the convergence check on 2 per client
    cfg.attack.headline, cfg.attack.convergence, cfg.attack.convergence_max_per_client = ["eot-pgd"], [
        "eot-pgd", "eot-pgd@3x1"], 2
    tables = run_experiment(cfg, tmp_path, progress=False, methods=["fat", "local"])
    rows = {r["method"]: r for r in tables["rows"]}
    assert set(rows) == {"FAT", "Local"} and all(r["clean"] is not None for r in rows.values())
    assert {r["method"] for r in tables["transfer"]} == {"FAT", "Local"}
    assert (tmp_path / "methods.png").is_file() and (tmp_path / "tables.md").is_file()
    # every own-test evaluation ran, each in its folder; the table's adaptive column is the headline's
    local = tmp_path / "baselines" / "local" / "evaluations"
    assert {p.name for p in local.iterdir()} >= {"own-test-suite", "own-test-headline", "own-test-convergence"}
    kinds = {(m["method"], m["kind"]): m for m in tables["suites"]}
    n_test = sum(c["n_test"] for c in json.loads((local.parent / "summary.json").read_text())["clients"])
    assert kinds[("Local", "headline")]["scans"] == n_test and kinds[("Local", "convergence")]["scans"] == 4
    # the headline runs its attacks and, after them, the strongest the suite found (where it is another)
    asked = json.loads((local / "own-test-headline" / "request.json").read_text())["attacks"]
    assert set(asked) == {"eot-pgd", kinds[("Local", "suite")]["headline"]["attack"]} and asked[0] == "eot-pgd"
    assert rows["Local"]["adaptive_attack"].endswith(f"{n_test} scans")
    (c,) = kinds[("Local", "convergence")]["convergence"]
    assert (c["attack"], c["stronger"]) == ("eot-pgd", "eot-pgd@3x1")
    assert kinds[("Local", "headline")]["paired"]["n"] == n_test  # paired with FAT's headline, same scans
    # every other method's suite is paired with FAT's on the same scans (McNemar), in the tables
    suites = {m["method"]: m for m in tables["suites"] if m["kind"] == "suite"}
    p = suites["Local"]["paired"]
    assert "paired" not in suites["FAT"] and p["against"] == "FAT" and p["attack"] == suites["Local"]["headline"]["attack"]
    outcomes = suites["Local"]["suite"][p["attack"]]["outcomes"]["first"]
    assert p["n"] == len(outcomes) == suites["Local"]["scans"] and p["b_correct"] == outcomes.count("1")
    assert p["beats"] == (p["b_correct"] > p["a_correct"] and p["p_value"] < 0.05)
    text = (tmp_path / "tables.md").read_text()
    assert "Paired with FAT" in text and "*worst of N* the share right on every one" in text
    summary = tmp_path / "baselines" / "local" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    again = run_experiment(cfg, tmp_path, progress=False, methods=["fat", "local"])
    assert summary.stat().st_mtime_ns == stamp  # nothing retrained
    assert again["rows"] == tables["rows"]


@pytest.mark.parametrize("name", ["medfedpure", "fat"])
def test_a_round_trains_in_channels_last_and_leaves_the_default_layout(name):
    """train.channels_last changes the layout, not the recipe: a training step's loss and gradients
    agree with the default layout's to float rounding (over a round, training amplifies rounding, so
    whole rounds are not compared); the round runs in that layout and the model leaves contiguous
    (it is shared and saved)."""
    from medfedpure.loop import channels_last
    from medfedpure.methods import LocalRound, method_of, new_model

    cfg = demo()
    cfg.method.name, cfg.data.num_clients, cfg.defense.purify_training = name, 2, False
    cfg.model.backbone, cfg.model.width = "resnet18", 8  # ResNet-18's layout at demo size
    cfg.train.local_epochs = 1
    for layout in (False, True):
        cfg.train.channels_last = layout
        model = new_model(cfg, 2, 0)
        seen = []
        conv = model.experts[0].backbone.conv1
        conv.register_forward_pre_hook(lambda m, _: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
        method_of(cfg).train_round(model, LocalRound(cfg, 0, 1))
        assert seen and all(s == layout for s in seen)
        assert all(t.is_contiguous() for t in model.state_dict().values())
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 2, (8,))
    models = [new_model(cfg, 2, 0) for _ in range(2)]
    channels_last(models[1])
    losses = []
    for m in models:
        loss = m.train().loss(x, y)[0] if name == "medfedpure" else torch.nn.functional.cross_entropy(m.train()(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (key, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-5), key


def test_the_linear_schedule_warms_up_then_decays_to_zero_over_every_rounds_steps_in_order():
    """train.schedule=linear: round r's local steps continue where round r-1's stopped, the rate rising
    linearly over the first train.warmup of the run's steps, then falling to 0 at its last; a round
    trains through it (the optimizer's rate after the round is the schedule's next step)."""
    from medfedpure.methods.task import linear_factor, round_schedule

    cfg = apply_overrides(ExperimentConfig(), ["train.schedule=linear", "train.rounds=4", "train.warmup=0.25",
                                               "train.local_epochs=2", "train.lr=0.1"]).validate()
    steps = 5  # a round: 2 epochs of 5 batches: 10 steps, 40 in the run
    factors = [linear_factor(cfg, r, s, 2 * steps) for r in range(1, 5) for s in range(2 * steps)]
    peak = factors.index(max(factors))  # at a quarter of the run's 40 steps
    assert peak in (9, 10) and 0.95 <= factors[peak] <= 1 and factors[0] == pytest.approx(0.5 / 10)
    assert factors[-1] == pytest.approx(0.5 / 30) and min(factors) > 0  # no step of rate 0
    assert all(a < b for a, b in zip(factors[:peak], factors[1:peak + 1]))
    assert all(a > b for a, b in zip(factors[peak:], factors[peak + 1:]))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    schedule = round_schedule(cfg, optimizer, 3, steps)
    seen = []
    for _ in range(2 * steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.1 * f for f in factors[20:30]])
    step_cfg = apply_overrides(ExperimentConfig(), ["train.lr_decay=0.5"])
    assert round_schedule(step_cfg, optimizer, 3, steps) is None  # the step schedule: fixed within a round
    # train_plain and train_fedem take the round and train through it
    data = make_synthetic(10, 16, seed=0)
    small = apply_overrides(cfg, ["model.backbone=small_cnn", "train.batch_size=8", "train.label_smoothing=0.1",
                                  "train.nesterov=true", "data.augmentation=cifar"]).validate()
    torch.manual_seed(0)
    learners = LearnerMixture(2, small.model)
    stats = train_plain(learners, data, np.arange(len(data)), small, lr=0.1, seed=0, server_round=4)
    assert math.isfinite(stats["train_loss"])
