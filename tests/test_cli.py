"""The `lightning-compress` command: every recipe runs, user models swap in, the console script works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_compress.callbacks.weight_sharing import WeightSharing
from lightning_compress.cli import main, run_cli
from lightning_compress.examples import DigitsMLP
from lightning_compress.export.lcdc import load_compressed
from tests.helpers import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
# the MiniLM recipes run as written on a random 6-layer BERT 128 wide (whole groups of 128) and a small corpus
# (targets computed once); the pretrained 22.7M-parameter model is tests/examples/test_sentence.py's one smoke test
MINILM_SMALL = ["--data.init_args.max_sentences=48", "--data.init_args.max_length=16", "--data.init_args.batch_size=8",
                "--model.init_args.max_length=16"]
TINY_BERT = {"num_hidden_layers": 6, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256,
             "max_position_embeddings": 32}
RECIPE_PARAMS = [pytest.param(r, id=r.stem) for r in RECIPES]


def _on_tiny_bert(recipe: Path, folder: Path) -> Path:
    """A copy of a MiniLM recipe whose SentenceEncoders (model, teachers) and SentenceDataModule build a random
    BERT of shape ``TINY_BERT`` instead of loading the pretrained weights; everything else as written."""
    config = yaml.safe_load(recipe.read_text())

    def shrink(node: object) -> None:
        if isinstance(node, dict):
            if str(node.get("class_path", "")).endswith((".SentenceEncoder", ".SentenceDataModule")):
                node["init_args"] = {**(node.get("init_args") or {}), "config": TINY_BERT}
            for value in node.values():
                shrink(value)
        elif isinstance(node, list):
            for value in node:
                shrink(value)

    shrink(config)
    out = folder / recipe.name
    out.write_text(yaml.safe_dump(config))
    return out
FAST = [
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
]


def _requires(recipe: Path) -> list[Path]:
    """Recipes that must run first, declared on lines `# requires: recipes/<other>.yaml`."""
    found = re.findall(r"^#\s*requires:\s*(\S+)", recipe.read_text(), flags=re.MULTILINE)
    return [REPO_ROOT / f for f in found]


def test_recipes_exist_and_parse() -> None:
    assert any(r.name == "digits_baseline.yaml" for r in RECIPES)
    for recipe in RECIPES:
        config = yaml.safe_load(recipe.read_text())
        assert "trainer" in config and "model" in config, recipe.name
        for dep in _requires(recipe):
            assert dep.exists(), f"{recipe.name} requires missing {dep}"


@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
def test_every_recipe_runs(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for dep in _requires(recipe):
        run_cli(["fit", "--config", str(dep), *FAST])
    minilm = recipe.stem.startswith("minilm_")
    config = _on_tiny_bert(recipe, tmp_path) if minilm else recipe
    cli = run_cli(["fit", "--config", str(config), *FAST, *(MINILM_SMALL if minilm else [])])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step > 0
    assert (tmp_path / "lightning_logs").is_dir()


# the user's own module and data, written to the folder the command runs from
USER_MODULE = (
    "import torch\n"
    "from torch import nn\n"
    "from torch.utils.data import DataLoader, TensorDataset\n"
    "from lightning.pytorch import LightningModule, LightningDataModule\n"
    "class MyModule(LightningModule):\n"
    "    def __init__(self, width: int = 8, lr: float = 0.1):\n"
    "        super().__init__()\n"
    "        self.save_hyperparameters()\n"
    "        self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))\n"
    "    def training_step(self, batch, batch_idx):\n"
    "        x, y = batch\n"
    "        return nn.functional.cross_entropy(self.net(x), y)\n"
    "    def configure_optimizers(self):\n"
    "        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)\n"
    "class MyData(LightningDataModule):\n"
    "    def __init__(self, batch_size: int = 8, noise: float = 1.0):\n"
    "        super().__init__()\n"
    "        self.batch_size = batch_size\n"
    "    def train_dataloader(self):\n"
    "        g = torch.Generator().manual_seed(0)\n"
    "        return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)), batch_size=self.batch_size)\n"
)


def test_swap_in_user_model_and_data(tmp_path: Path) -> None:
    """--model/--data take the user's own classes by import path (here, a module written to tmp_path)."""
    (tmp_path / "my_pkg.py").write_text(USER_MODULE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [
            sys.executable, "-m", "lightning_compress.cli", "fit",
            "--config", str(REPO_ROOT / "recipes" / "digits_baseline.yaml"),
            "--model", "my_pkg.MyModule", "--model.width=5",
            "--data", "my_pkg.MyData",
            "--trainer.max_epochs=2",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the monitor's table shows the user's layers (widths from --model.width=5)
    assert re.search(r"net\.1\s+20\s+", proc.stdout), proc.stdout[-2000:]
    config = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert config["model"]["class_path"] == "my_pkg.MyModule"


def _console_command() -> list[str]:
    """The installed `lightning-compress` script, or the same entry point run without the cwd on sys.path."""
    exe = Path(sys.executable).with_name("lightning-compress")
    if exe.exists():
        return [str(exe)]
    entry = "import sys; sys.path.remove(''); from lightning_compress.cli import main; sys.exit(main())"
    return [sys.executable, "-c", entry]


def test_own_model_imports_from_the_working_directory_and_recipe_model_settings_are_reported(
    tmp_path: Path,
) -> None:
    """As README shows it: the user's module sits in the folder the command runs from (no PYTHONPATH=.); the
    recipe's settings for the example model go to the user's class only where it takes them, and the command
    says which were applied and which were dropped."""
    (tmp_path / "my_pkg.py").write_text(USER_MODULE)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    recipe = REPO_ROOT / "recipes" / "digits_baseline.yaml"  # model: hidden_sizes, lr; data: batch_size
    args = ["fit", "--config", str(recipe), "--model", "my_pkg.MyModule", "--data", "my_pkg.MyData"]
    proc = subprocess.run(
        [*_console_command(), *args, "--trainer.max_epochs=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(
        r"my_pkg\.MyModule.*applied: lr=0\.001.*dropped: hidden_sizes=\[300, 100\]", proc.stderr
    ), proc.stderr[-3000:]
    assert re.search(r"my_pkg\.MyData.*applied: batch_size=64", proc.stderr), proc.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert config["model"] == {"class_path": "my_pkg.MyModule", "init_args": {"width": 8, "lr": 0.001}}


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("lightning-compress")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_compress.cli"]
    proc = subprocess.run([*cmd, "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--test_after_fit" in proc.stdout and "--model" in proc.stdout


def test_bad_config_is_an_error_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO_ROOT / "recipes" / "digits_baseline.yaml"), "--model.lr=fast"])
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_deep_compression_recipe_and_export_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe prunes, shares and writes its file when training ends; the file loads (strict) into a fresh
    DigitsMLP bit-exactly; `lightning-compress export` on the run's checkpoint writes the same bytes, from the
    config the run saved (console command) and from the recipe (`main` in process)."""
    monkeypatch.chdir(tmp_path)
    recipe = REPO_ROOT / "recipes" / "digits_deep_compression.yaml"
    cli = run_cli(["fit", "--config", str(recipe), *FAST])  # 40 epochs of 3 batches: prune, then share at 63
    sharing = next(cb for cb in cli.trainer.callbacks if isinstance(cb, WeightSharing))
    assert sharing.shared and cli.trainer.global_step == 120
    written = tmp_path / "lightning_logs" / "digits_deep_compression.lcdc"
    reloaded = DigitsMLP()
    load_compressed(written, reloaded)
    for name, value in cli.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    weights = [m.weight for m in reloaded.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == pytest.approx(
        0.97, abs=1e-3
    )
    assert all(len(torch.unique(w[w != 0])) <= 16 for w in weights)
    assert sharing.report is not None and sharing.report.file_bytes == written.stat().st_size

    run_dir = tmp_path / "lightning_logs" / "version_0"
    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    exe = Path(sys.executable).with_name("lightning-compress")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_compress.cli"]
    args = ["export", "--ckpt", str(ckpt), "--config", str(run_dir / "config.yaml"), "--out", "cmd.lcdc"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **total** (file, headers incl.)" in proc.stdout
    assert (tmp_path / "cmd.lcdc").read_bytes() == written.read_bytes()
    args = ["export", "--ckpt", str(ckpt), "--config", str(recipe), "--out", "main.lcdc", "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "main.lcdc").read_bytes() == written.read_bytes()
    with pytest.raises(SystemExit):  # argparse: --out is required
        main(["export", "--ckpt", str(ckpt)])


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_baseline_recipe_runs_at_other_precisions(
    precision: str, dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning's model summary ran the example's float32 `example_input_array` through a bf16/fp64 model
    monkeypatch.chdir(tmp_path)
    recipe = REPO_ROOT / "recipes" / "digits_baseline.yaml"
    cli = run_cli(["fit", "--config", str(recipe), *FAST, "--trainer.max_epochs=1", f"--trainer.precision={precision}"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 3
    assert {p.dtype for p in cli.model.parameters()} == {dtype}
    assert "test/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("recipe", "edit", "args", "message"),
    [
        (
            "digits_gradual_pruning.yaml",
            ("final_sparsity: 0.95", "final_sparsity: 1.5"),
            [],
            r"GradualPruning: `final_sparsity` must be a number in \[0, 1\), got 1.5",
        ),
        (
            "digits_gradual_pruning.yaml",
            None,
            ["--trainer.max_epochs=2"],
            r"GradualPruning: `end_epoch` puts the end of the schedule at optimizer step \d+, but this run has only",
        ),
        (
            "digits_qat_int8.yaml",
            None,
            ["--trainer.fast_dev_run=true"],
            r"QuantizationAwareTraining: .*this run has only 1 optimizer step",
        ),
    ],
    ids=["bad-value", "max-epochs-2", "fast-dev-run"],
)
def test_errors_of_a_recipe_are_a_few_readable_lines_naming_the_callback(
    recipe: str,
    edit: tuple[str, str] | None,
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a bad value printed an 84-line double traceback ending in "Does not validate against any of the Union
    # subtypes"; a schedule too long for the run did not say which callback's schedule it was
    monkeypatch.chdir(tmp_path)
    path = REPO_ROOT / "recipes" / recipe
    if edit is not None:
        (tmp_path / recipe).write_text(path.read_text().replace(*edit))
        path = tmp_path / recipe
    capsys.readouterr()
    assert main(["fit", "--config", str(path), "--trainer.enable_model_summary=false", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4, err[-3000:]
