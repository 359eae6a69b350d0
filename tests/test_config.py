import dataclasses

import pytest

from medfedpure.config import ConfigError, ExperimentConfig, apply_overrides, load_preset, preset_names


def test_every_preset_loads_and_validates():
    names = preset_names()
    assert {"demo", "br35h-cpu", "paper-br35h", "paper-cifar10"} <= set(names)
    for name in names:
        cfg = load_preset(name)
        if cfg.data.dataset != "synthetic":
            cfg.data.root = "/some/folder"
        cfg.validate()


def test_paper_presets_use_the_papers_settings():
    br = load_preset("paper-br35h")
    assert (br.data.image_size, br.data.num_clients, br.train.rounds, br.train.local_epochs) == (224, 10, 20, 15)
    assert (br.attack.eps, br.attack.alpha, br.attack.steps, br.attack.norm) == (0.015, 0.003, 7, "linf")
    cifar = load_preset("paper-cifar10")
    assert cifar.attack.alpha == 0.007 and cifar.model.backbone == "resnet18"


def test_overrides_and_round_trip():
    cfg = apply_overrides(load_preset("demo"), ["train.rounds=7", "data.partition=dirichlet", "model.gamma=0.5"])
    assert cfg.train.rounds == 7 and cfg.data.partition == "dirichlet" and cfg.model.gamma == 0.5
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.roundz=3", "train.roundz"),
    ("nosection.x=1", "nosection"),
    ("rounds", "section.field=value"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_preset("demo"), [override])


def test_validation_names_the_field():
    cfg = load_preset("demo")
    cfg.data.partition = "random"
    with pytest.raises(ConfigError, match="data.partition"):
        cfg.validate()
    cfg = load_preset("br35h-cpu")
    with pytest.raises(ConfigError, match="data.root"):
        cfg.validate()
    cfg = load_preset("demo")
    cfg.attack.suite = ["eot-pgd", "eot-pgd:dlr"]
    with pytest.raises(ConfigError, match="attack.suite"):
        cfg.validate()
    cfg.attack.suite = ["eot-pgd", 3]
    with pytest.raises(ConfigError, match="attack.suite"):
        cfg.validate()
    for width in ("model.width=12", "model.width=32"):  # not a multiple of 8; the demo's backbone is small_cnn
        with pytest.raises(ConfigError, match="model.width"):
            apply_overrides(load_preset("demo"), [width]).validate()
    cfg = apply_overrides(load_preset("demo"), ["attack.suite=[eot-pgd, eot-pgd:margin, orthogonal:margin]"])
    assert cfg.attack.suite == ["eot-pgd", "eot-pgd:margin", "orthogonal:margin"]
    cfg.validate()
    cfg.attack.suite = ["eot-pgd:margin@200x20", "bpda@5x2"]  # a budget per entry (the convergence check)
    cfg.validate()
    for bad in (["eot-pgd@200"], ["square@10x2"], ["pgd@5x1"], ["fixed-noise@50x4"]):
        cfg.attack.suite = bad
        with pytest.raises(ConfigError, match="attack.suite"):
            cfg.validate()
    # phase 4 fine-tunes the U-Net the experts were trained through: it needs purify_training
    for overrides, field in ((["defense.purifier.rounds=2"], "defense.purifier.rounds"),
                             (["defense.purify_training=true", "defense.purifier.rounds=-1"], "defense.purifier.rounds"),
                             (["defense.purify_training=true", "defense.purifier.rounds=1",
                               "defense.purifier.clean_weight=-1"], "defense.purifier.clean_weight"),
                             (["defense.purifier.lr=0"], "defense.purifier"),
                             (["defense.purifier.adv_attack=eot-pgd"], "defense.purifier.adv_attack"),
                             (["defense.adv_attack=square"], "defense.adv_attack"),
                             (["attack.norm=l2", "attack.eps=0.5", "defense.adv_attack=n-fgsm"], "defense.adv_attack"),
                             (["defense.purifier.adv_steps=0"], "defense.purifier.adv_steps"),
                             (["defense.adv_raw_share=0.3"], "defense.adv_raw_share"),
                             (["defense.purify_training=true", "defense.adv_share=0.8", "defense.adv_raw_share=0.3"],
                              "defense.adv_raw_share")):
        with pytest.raises(ConfigError, match=field):
            apply_overrides(load_preset("demo"), overrides).validate()
    apply_overrides(load_preset("demo"), ["defense.purify_training=true", "defense.purifier.rounds=1"]).validate()
    # an exponent without a dot is a number, as YAML 1.2 and every user read it (PyYAML alone says string)
    cfg = apply_overrides(load_preset("demo"), ["defense.purifier.lr=3e-4", "train.lr=1E-2"])
    assert (cfg.defense.purifier.lr, cfg.train.lr) == (3e-4, 1e-2)
    with pytest.raises(ConfigError, match="train.rounds"):  # still not an int
        apply_overrides(load_preset("demo"), ["train.rounds=1e3"])


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="demo"):
        load_preset("nope")


def test_yaml_file_with_unknown_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_preset(str(path))


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match="train.rounds"):
        apply_overrides(load_preset("demo"), ["train.rounds=many"])
    with pytest.raises(ConfigError, match="data.augment"):
        apply_overrides(load_preset("demo"), ["data.augment=3"])
    cfg = apply_overrides(load_preset("demo"), ["train.lr=1", "data.max_per_class=null"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.data.max_per_class is None


def test_the_shipped_defense_study_parses():
    from pathlib import Path

    from medfedpure.workflows.compare import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "studies" / "br35h-defenses.yaml")
    assert spec["attacks"] == ["eot-pgd", "eot-pgd:margin", "detector-aware", "orthogonal:margin", "square"]
    assert len({c["name"] for c in spec["candidates"]}) == len(spec["candidates"]) >= 8
    assert spec["candidates"][0]["name"].startswith("FAT")  # every candidate is paired with the first
    paired = load_spec(Path(__file__).resolve().parents[1] / "studies" / "br35h-training-attack.yaml")
    assert paired["attacks"] == ["eot-pgd:margin"] and len(paired["candidates"]) == 2
    assert all(c["run"].startswith(str(Path.home())) for c in paired["candidates"])  # ~ read as a shell would
    headline = load_spec(Path(__file__).resolve().parents[1] / "studies" / "br35h-headline.yaml")
    assert headline["attacks"] == ["eot-pgd:ce", "eot-pgd:margin", "apgd:margin", "fixed-noise:margin"]  # + fixed noise
    assert headline["max_per_client"] is None and headline["candidates"][0]["name"].startswith("FAT")
    assert all(len(c["from"]) == 3 for c in headline["candidates"])
    assert [Path(p).name for p in headline["candidates"][1]["convergence"]] == ["convergence-apgd-margin",
                                                                                "convergence-eot-pgd-margin"]
    phase4 = load_spec(Path(__file__).resolve().parents[1] / "studies" / "br35h-phase4.yaml")
    assert phase4["attacks"] == ["eot-pgd:margin"] and len(phase4["candidates"]) == 4


def test_adversarial_training_attack_is_part_of_a_defended_runs_fingerprint():
    from medfedpure.methods import fingerprint

    cfg = load_preset("br35h-cpu")
    assert (cfg.defense.adv_attack, cfg.method.adv_attack) == ("n-fgsm", "pgd")  # shipped: FAT keeps PGD-7
    shipped, shipped_p4, fat = fingerprint(cfg, "train"), fingerprint(cfg, "purifier"), _fat(cfg)
    cfg.defense.adv_attack = None
    pgd = fingerprint(cfg, "train")
    cfg.method.adv_attack = "n-fgsm"  # as runs made before defense.adv_attack named it: the same weights
    assert (fingerprint(cfg, "train"), fingerprint(cfg, "purifier")) == (shipped, shipped_p4)
    assert _fat(cfg) != fat  # while FAT itself now trains on N-FGSM
    cfg.method.adv_attack, cfg.method.adv_steps = "pgd", 3
    fewer_steps = fingerprint(cfg, "train")
    assert len({pgd, shipped, fewer_steps}) == 3  # a run is never resumed with another training attack
    cfg.method.adv_steps, cfg.attack.channels_last, cfg.attack.eot = None, False, 20
    assert fingerprint(cfg, "train") == pgd  # evaluation-only fields change no weights
    cfg.defense.adv_attack = "n-fgsm"
    assert _fat(cfg) == fat  # the defense's attack is no baseline's business
    cfg.defense.adv_share = 0.0
    no_adv = fingerprint(cfg, "train")
    cfg.defense.adv_attack = None
    assert fingerprint(cfg, "train") == no_adv  # without adversarial training the attack is moot


def _fat(cfg):
    """FAT's phase-3 fingerprint in the experiment of `cfg`."""
    from medfedpure.methods import METHODS

    return METHODS["fat"].fingerprint(dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="fat")),
                                      "train")


def test_the_fast_training_recipe_is_validated_and_in_the_fingerprint_only_off_its_defaults():
    """train.schedule / warmup / nesterov / label_smoothing and data.augmentation (issue 28): a bad
    value names its field; at their defaults a run keeps the fingerprint it had before they existed."""
    from medfedpure.methods import fingerprint

    for overrides, field in ((["train.schedule=cosine"], "train.schedule"),
                             (["train.schedule=linear", "train.lr_decay=0.9"], "train.lr_decay"),
                             (["train.warmup=1"], "train.warmup"),
                             (["train.label_smoothing=1"], "train.label_smoothing"),
                             (["train.label_smoothing=-0.1"], "train.label_smoothing"),
                             (["train.optimizer=adam", "train.nesterov=true"], "train.nesterov"),
                             (["train.momentum=0", "train.nesterov=true"], "train.nesterov"),
                             (["data.augmentation=jpeg"], "data.augmentation")):
        with pytest.raises(ConfigError, match=field):
            apply_overrides(load_preset("demo"), overrides).validate()
    cfg = load_preset("br35h-cpu")
    before = {phase: fingerprint(cfg, phase) for phase in ("diffusion", "mae", "train", "purifier")}
    same = apply_overrides(cfg, ["train.warmup=0.5", "data.augmentation=mri", "train.schedule=step"])
    assert {phase: fingerprint(same, phase) for phase in before} == before  # warmup: only the linear schedule's
    for change in ("train.schedule=linear", "train.nesterov=true", "train.label_smoothing=0.2",
                   "data.augmentation=cifar"):
        assert fingerprint(apply_overrides(cfg, [change]), "train") != before["train"], change
    cifar = apply_overrides(cfg, ["data.augmentation=cifar"])
    assert fingerprint(cifar, "diffusion") != before["diffusion"]  # the U-Net trains on augmented scans too
    assert fingerprint(apply_overrides(cfg, ["data.augment=false", "data.augmentation=cifar"]), "train") == \
        fingerprint(apply_overrides(cfg, ["data.augment=false"]), "train")  # no augmentation: its kind is moot
    linear = apply_overrides(cfg, ["train.schedule=linear"])
    assert fingerprint(apply_overrides(linear, ["train.warmup=0.1"]), "train") != fingerprint(linear, "train")


def test_per_method_rounds_give_each_method_its_own_and_leave_other_fingerprints_alone(tmp_path):
    """method.rounds (issue 28: one time budget for all methods): a named method trains that many rounds
    and records them as its train.rounds, the others keep train.rounds; the mapping itself is in no
    fingerprint (FAT's run is the same whether FedAvg's entry exists), and a bad entry names the field."""
    from medfedpure.methods import METHODS, fingerprint

    cfg = apply_overrides(load_preset("demo"), [f"data.root={tmp_path}"])
    budget = apply_overrides(cfg, ["method.rounds={fedavg: 7, fat: 3}"])
    configured = {name: METHODS[name].configure(budget) for name in ("fedavg", "fat", "local", "medfedpure")}
    assert {name: c.train.rounds for name, c in configured.items()} == \
        {"fedavg": 7, "fat": 3, "local": cfg.train.rounds, "medfedpure": cfg.train.rounds}
    assert all(c.method.rounds == {} for c in configured.values())
    fat = fingerprint(configured["fat"], "train")
    assert fat == fingerprint(METHODS["fat"].configure(apply_overrides(cfg, ["train.rounds=3"])), "train")
    assert fat != fingerprint(METHODS["fat"].configure(apply_overrides(budget, ["method.rounds={fat: 4}"])), "train")
    assert fingerprint(METHODS["local"].configure(budget), "train") == \
        fingerprint(METHODS["local"].configure(cfg), "train")
    for override, message in (("method.rounds={fedprox: 3}", "method names"), ("method.rounds={fat: 0}", ">= 1"),
                              ("method.rounds={fat: many}", "dict"), ("method.rounds=3", "dict")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(cfg, [override]).validate()


def test_the_table1_preset_gives_every_method_its_own_share_of_one_time_budget(tmp_path):
    """Table I at CPU scale (issue 28): the whole data on the fast ResNet-9, FedAvg and Local 100 rounds,
    each costlier method fewer (its measured round cost into the same 60 minutes)."""
    from medfedpure.methods import METHODS

    cfg = apply_overrides(load_preset("cifar10-table1-cpu"), [f"data.root={tmp_path}"])
    assert cfg.data.max_per_class is None and (cfg.model.backbone, cfg.model.width) == ("resnet9", 16)
    rounds = {name: METHODS[name].configure(cfg).train.rounds for name in METHODS}
    assert rounds["fedavg"] == rounds["local"] == 100
    assert all(1 <= r < 100 for name, r in rounds.items() if name not in ("fedavg", "local")), rounds


def test_the_table2_preset_is_the_fast_resnet9_on_the_whole_data_dealt_iid_with_the_shipped_defense(tmp_path):
    """Table II's CIFAR-10 row (issue 28): IID over 10 hospitals, the same backbone and recipe as Table I,
    the l_inf budget of the paper's Table II, and br35h-cpu's adversarial training through the purifier."""
    cfg = apply_overrides(load_preset("cifar10-cpu"), [f"data.root={tmp_path}"])
    cfg.validate()
    assert (cfg.data.partition, cfg.data.max_per_class) == ("iid", None)
    assert (cfg.model.backbone, cfg.model.width) == ("resnet9", 16)
    assert (cfg.attack.norm, cfg.attack.eps, cfg.attack.alpha, cfg.attack.steps) == ("linf", 0.015, 0.007, 7)
    assert cfg.defense.purify_training and (cfg.defense.adv_share, cfg.defense.adv_attack) == (0.5, "n-fgsm")
    assert set(cfg.attack.headline) == {"eot-pgd", "eot-pgd:margin"}
