"""The AlexNet-style branched CNN (branchnet.models.alexnet) and the plain classifier experiment
(branchnet.classifier, ``branchnet model fit`` / ``model eval``): shapes, grouped parameter
counts, branch isolation of conv2, spec round trip, a run folder end to end on digits, reloading
the saved model, and the error messages and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from branchnet import models
from branchnet.classifier import ClassifierExperiment, evaluate_model
from branchnet.data import Split
from branchnet.errors import ConfigError
from branchnet.runs import Run
from branchnet.saved_model import load_model, predict_proba
from branchnet.taps import extract
from cli_helpers import run_cli, write_config

WIDTHS = (8, 12, 16)

TINY_CONFIG: dict[str, Any] = {
    "name": "tinyclf",
    "seed": 0,
    "data": {"source": "digits", "val_fraction": 0.25, "test_fraction": 0.2, "max_per_class": 40},
    "model": {"kind": "mlp", "sizes": ["auto", 32], "dropout": 0.1},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
    "progress": False,
}




# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("groups", [1, 2])
def test_alexnet_shapes(groups: int) -> None:
    torch.manual_seed(0)
    net = models.alexnet(num_classes=7, groups=groups, widths=WIDTHS, hidden=20)
    x = torch.randn(3, 3, 32, 32)
    assert net(x).shape == (3, 7)
    acts = {name: extract(net, name, x) for name in ("pool1", "pool2", "relu3", "pool3", "fc1")}
    assert acts["pool1"].shape == (3, 8, 16, 16)
    assert acts["pool2"].shape == (3, 12, 8, 8)
    assert acts["relu3"].shape == (3, 16, 8, 8)
    assert acts["pool3"].shape == (3, 16, 4, 4)
    assert acts["fc1"].shape == (3, 20)
    assert net.conv1.groups == 1 and net.conv2.groups == groups and net.conv3.groups == groups
    small = models.alexnet(num_classes=3, groups=groups, widths=WIDTHS, in_channels=1,
                           image_size=8)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="expects images"):
        net(torch.randn(2, 3, 28, 28))


def test_grouping_halves_conv2_and_conv3_parameters() -> None:
    one = models.alexnet(groups=1, widths=WIDTHS)
    two = models.alexnet(groups=2, widths=WIDTHS)
    assert two.conv2.weight.numel() * 2 == one.conv2.weight.numel()
    assert two.conv3.weight.numel() * 2 == one.conv3.weight.numel()
    # conv1, fc1 and head are the same size: groups=1 is the unbranched control
    for name in ("conv1", "fc1", "head"):
        assert getattr(one, name).weight.shape == getattr(two, name).weight.shape
    with pytest.raises(ValueError, match="divisible by groups"):
        models.alexnet(groups=2, widths=(9, 12, 16))


@pytest.mark.parametrize("g", [0, 1])
def test_conv2_branch_reads_only_its_block_of_conv1(g: int) -> None:
    torch.manual_seed(1)
    net = models.alexnet(groups=2, widths=WIDTHS).eval()
    h1 = net.pool1(net.relu1(net.conv1(torch.randn(4, 3, 32, 32))))
    half1, half2 = WIDTHS[0] // 2, WIDTHS[1] // 2
    mine = slice(g * half1, (g + 1) * half1)
    other = torch.zeros_like(h1)
    other[:, mine] = h1[:, mine]          # the other branch's conv1 activations zeroed
    out, out_zeroed = net.conv2(h1), net.conv2(other)
    own = slice(g * half2, (g + 1) * half2)
    torch.testing.assert_close(out[:, own], out_zeroed[:, own])
    assert not torch.allclose(out, out_zeroed)   # the other half does change
    # the unbranched control mixes both blocks
    control = models.alexnet(groups=1, widths=WIDTHS).eval()
    assert not torch.allclose(control.conv2(h1)[:, own], control.conv2(other)[:, own])


def test_alexnet_spec_round_trip() -> None:
    torch.manual_seed(0)
    net = models.alexnet(num_classes=5, groups=2, widths=WIDTHS, hidden=24, dropout=0.25)
    spec = models.spec_of(net)
    assert spec is not None and spec["kind"] == "alexnet" and spec["groups"] == 2
    again = models.build(json.loads(json.dumps(spec)))
    assert type(again) is models.AlexNetSmall and again.spec == net.spec
    again.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), net.eval()(x))


# ---------------------------------------------------------------- model fit / eval


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("clf")
    cfg = write_config(root / "tiny.yaml", TINY_CONFIG)
    code, out, err = run_cli(["model", "fit", str(cfg), "--out", str(root / "runs"),
                              "--set", "train.lr=0.005", "--no-progress"])
    assert code == 0, err
    runs = sorted((root / "runs").glob("tinyclf-s0-*"))
    assert len(runs) == 1, runs
    return runs[0], out


def test_model_fit_writes_a_complete_run_folder(fitted: tuple[Path, str]) -> None:
    run, out = fitted
    assert f"run folder: {run}" in out and "accuracy" in out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 0.005 and cfg["train"]["epochs"] == 2   # --set, config
    assert cfg["data"]["label_set"] == "fine"                            # a default
    m = json.loads((run / "metrics.json").read_text())
    assert 0 <= m["accuracy"] <= 1 and m["nll"] > 0 and 0 <= m["ece"] <= 1
    assert len(m["per_class"]) == 10 and m["fit"]["epochs_run"] == 2
    assert m["accuracy"] > 0.3          # 2 epochs on digits already learn something
    html = (run / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64" in html
    assert (run / "figures" / "training.png").is_file()
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["spec"]["kind"] == "mlp" and meta["spec"]["sizes"] == [64, 32]
    assert meta["classes"] == [str(i) for i in range(10)]
    assert "hidden.0.linear" in meta["layers"] and meta["preprocessing"]["input_shape"] == [1, 8, 8]
    assert (run / "model" / "weights.safetensors").is_file()


def test_load_model_reproduces_the_test_predictions(fitted: tuple[Path, str]) -> None:
    run, _ = fitted
    model, meta = load_model(run)
    cfg = Run.open(run).read_config()
    cfg["progress"] = False
    data = ClassifierExperiment(cfg).load_data()
    pred = predict_proba(model, data.test.x).argmax(1)
    acc = float((pred == data.test.y).double().mean())
    assert acc == pytest.approx(json.loads((run / "metrics.json").read_text())["accuracy"])
    assert load_model(run / "model")[1]["spec"] == meta["spec"]


def test_model_eval(fitted: tuple[Path, str]) -> None:
    run, _ = fitted
    code, out, err = run_cli(["model", "eval", str(run)])
    assert code == 0, err
    saved = sorted(run.glob("eval-test-*.json"))
    assert saved and "metrics written to" in out
    accuracy = json.loads(saved[-1].read_text())["accuracy"]
    assert accuracy == pytest.approx(json.loads((run / "metrics.json").read_text())["accuracy"])


def test_model_fit_alexnet_on_digits(tmp_path: Path) -> None:
    cfg = {**TINY_CONFIG, "name": "alex",
           "model": {"kind": "alexnet", "groups": 2, "widths": list(WIDTHS), "hidden": 16},
           "train": {"epochs": 1, "batch_size": 32}}
    code, _, err = run_cli(["model", "fit", str(write_config(tmp_path / "a.yaml", cfg)),
                            "--out", str(tmp_path / "runs")])
    assert code == 0, err
    model, meta = load_model(next((tmp_path / "runs").glob("alex-s0-*")))
    assert type(model) is models.AlexNetSmall and meta["spec"]["image_size"] == [8, 8]
    assert meta["spec"]["in_channels"] == 1 and "conv2" in meta["layers"]


def test_model_fit_fast_resnet_recipe_on_digits(tmp_path: Path) -> None:
    """The fast recipe's options through the CLI: a ResNet run with the test split monitored
    (time curve), flip test-time augmentation, and a saved model that reloads and evaluates."""
    cfg = {**TINY_CONFIG, "name": "res", "model": {"kind": "resnet", "depth": 8, "width": 4},
           "train": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.05,
                     "momentum": 0.9, "nesterov": True, "lr_schedule": "onecycle",
                     "warmup_epochs": 0.5, "label_smoothing": 0.1, "augment": "flip-crop",
                     "crop_padding": 1, "precision": "bf16"},
           "monitor_test": True, "test_flip": True}
    code, out, err = run_cli(["model", "fit", str(write_config(tmp_path / "r.yaml", cfg)),
                              "--out", str(tmp_path / "runs")])
    assert code == 0, err
    run = next((tmp_path / "runs").glob("res-s0-*"))
    m = json.loads((run / "metrics.json").read_text())
    assert 0 <= m["accuracy_single_view"] <= 1 and "accuracy_single_view" in out
    assert all("monitor_acc" in r for r in m["fit"]["history"])
    assert len(m["fit"]["epoch_seconds"]) == 2 and (run / "figures" / "time_curve.png").is_file()
    model, _ = load_model(run)
    assert type(model) is models.ResNet
    code, _, err = run_cli(["model", "eval", str(run)])
    assert code == 0, err
    saved = json.loads(sorted(run.glob("eval-test-*.json"))[-1].read_text())
    assert saved["accuracy"] == pytest.approx(m["accuracy"])


def test_flip_needs_images() -> None:
    split = Split(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"test_flip needs image inputs \[N, C, H, W\], got "
                                          r"inputs of shape \(6, 4\)"):
        evaluate_model(torch.nn.Linear(4, 2), split, ["a", "b"], flip=True)


@pytest.mark.parametrize(("change", "message"), [
    ({"modle": {"kind": "mlp"}}, "unknown config key 'modle'"),
    ({"train": {"epoch": 3}}, "unknown config key 'train.epoch'"),
    ({"model": {"kind": "vresnet"}},
     "model.kind must be one of ['alexnet', 'cnn', 'mlp', 'resnet'], got 'vresnet'"),
    ({"model": {"kind": "alexnet", "widht": [8, 8, 8]}}, "unknown option(s) ['widht']"),
])
def test_config_errors_exit_with_code_2(tmp_path: Path, change: dict[str, Any],
                                        message: str) -> None:
    cfg = write_config(tmp_path / "bad.yaml", {**TINY_CONFIG, **change})
    code, _, err = run_cli(["model", "fit", str(cfg), "--out", str(tmp_path / "runs")])
    assert code == 2
    assert err.startswith("branchnet: error:") and message in err


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    run = Run.create(tmp_path, "empty")
    run.write_config(TINY_CONFIG)
    code, _, err = run_cli(["model", "eval", str(run.path)])
    assert code == 2 and "has no saved model" in err and "--resume" in err
    (run.path / "model").mkdir()
    (run.path / "model" / "model.json").write_text("{not json")
    code, _, err = run_cli(["model", "eval", str(run.path)])
    assert code == 2 and "is damaged" in err
