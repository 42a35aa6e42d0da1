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
# the pretrained MiniLM recipes load a 22.7M-parameter model: slow, and run on a small corpus (targets computed once)
MINILM_SMALL = ["--data.init_args.max_sentences=48", "--data.init_args.max_length=16", "--data.init_args.batch_size=8",
                "--model.init_args.max_length=16"]
RECIPE_PARAMS = [pytest.param(r, id=r.stem, marks=[pytest.mark.slow] if r.stem.startswith("minilm_") else [])
                 for r in RECIPES]
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
    small = MINILM_SMALL if recipe.stem.startswith("minilm_") else []
    cli = run_cli(["fit", "--config", str(recipe), *FAST, *small])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step > 0
    assert (tmp_path / "lightning_logs").is_dir()


def test_swap_in_user_model_and_data(tmp_path: Path) -> None:
    """--model/--data take the user's own classes by import path (here, a module written to tmp_path)."""
    (tmp_path / "my_pkg.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from lightning.pytorch import LightningModule, LightningDataModule\n"
        "class MyModule(LightningModule):\n"
        "    def __init__(self, width: int = 8):\n"
        "        super().__init__()\n"
        "        self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))\n"
        "    def training_step(self, batch, batch_idx):\n"
        "        x, y = batch\n"
        "        return nn.functional.cross_entropy(self.net(x), y)\n"
        "    def configure_optimizers(self):\n"
        "        return torch.optim.SGD(self.parameters(), lr=0.1)\n"
        "class MyData(LightningDataModule):\n"
        "    def train_dataloader(self):\n"
        "        g = torch.Generator().manual_seed(0)\n"
        "        return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)), batch_size=8)\n"
    )
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
