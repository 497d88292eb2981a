"""The wheel ships the embedded world: built as `python -m build` builds it (the sdist, then the wheel from the
unpacked sdist, through setuptools' PEP 517 hooks without isolation, so offline), it must hold every file of
stitchvm/world/pretrained/ and stitchvm/world/assets/, and installed alone into a fresh venv it must load
`world:sd3` and `world:clip` from its own copy.

The fresh venv borrows the dependencies (torch, diffusers, transformers, ...) of the interpreter running the tests
through a .pth file listing that interpreter's site-packages. Plain path lines in a .pth are only appended to
sys.path (the .pth files inside them are not executed), so the project venv's editable-install finder
(`__editable__*.pth`) never runs, and the fresh venv's own site-packages, holding the wheel, comes first. The
check runs with `python -I` from an empty folder, so neither the source tree nor PYTHONPATH is importable.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "stitchvm" / "world"
# what the world loaders need (stitchvm/models/world_source.py), listed so that an empty checkout cannot pass
REQUIRED = [
    "pretrained/aesthetic.safetensors",
    "pretrained/clip/config.json", "pretrained/clip/model.safetensors",
    "pretrained/clip/tokenizer.json", "pretrained/clip/tokenizer_config.json",
    "pretrained/vae/config.json", "pretrained/vae/diffusion_pytorch_model.safetensors",
    "pretrained/transformer/config.json", "pretrained/transformer/diffusion_pytorch_model.safetensors",
    "pretrained/scheduler/scheduler_config.json",
    "pretrained/tokenizer/tokenizer.json", "pretrained/tokenizer/tokenizer_config.json",
    "assets/bpe_simple_vocab_16e6.txt.gz", "assets/LICENSE-openai-clip-bpe.txt",
]
TIMEOUT = 300

# runs inside the fresh venv: argv[1] is the venv's root
CHECK = textwrap.dedent("""
    import gzip, json, sys
    from pathlib import Path

    import torch

    import stitchvm
    from stitchvm.config import ModelSpec, RewardSpec
    from stitchvm.models.backbone import build_backbone
    from stitchvm.models.reward import build_reward
    from stitchvm.models.world_source import world_dir

    venv = Path(sys.argv[1]).resolve()
    package = Path(stitchvm.__file__).resolve().parent
    assert venv in package.parents, f"stitchvm imported from {package}, not from the fresh venv {venv}"
    assert venv in world_dir().resolve().parents, f"the world is read from {world_dir()}"
    editable = [m for m in sys.modules if m.startswith("__editable__")]
    assert not editable, f"the editable install's finder was loaded: {editable}"

    torch.manual_seed(0)
    with torch.no_grad():
        backbone = build_backbone(ModelSpec("world:sd3"))
        prompt = ["a red circle"]
        embeds, pooled = backbone.encode_prompts(prompt)
        size = backbone.image_size // backbone.vae_scale
        noise = torch.randn(1, backbone.latent_channels, size, size)
        v = backbone.velocity(noise, torch.ones(1), embeds, pooled)
        pixels = backbone.decode(noise - v)  # one Euler step from t = 1 to 0
        assert pixels.shape == (1, 3, backbone.image_size, backbone.image_size), pixels.shape
        assert torch.isfinite(pixels).all()

        reward = build_reward(RewardSpec("world:clip"))
        image_embeds, _ = reward.image_features(pixels)
        clip_score = reward.score(image_embeds, reward.text_embeds(prompt))
        aesthetic = build_reward(RewardSpec("world:clip", kind="aesthetic", head="world"))
        aesthetic_score = aesthetic.score(aesthetic.image_features(pixels)[0])
        assert torch.isfinite(clip_score).all() and torch.isfinite(aesthetic_score).all()

    merges = gzip.open(package / "world" / "assets" / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8")
    print(json.dumps({"stitchvm": str(package), "image": list(pixels.shape), "clip": clip_score.tolist(),
                      "aesthetic": aesthetic_score.tolist(), "bpe_lines": merges.count(chr(10))}))
""")


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


def shipped_files() -> list[str]:
    """The world's data files in the checkout, relative to stitchvm/world/."""
    files = [p for folder in ("pretrained", "assets") for p in (WORLD / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    return sorted(p.relative_to(WORLD).as_posix() for p in files)


def build_wheel(tmp: Path) -> Path:
    """sdist from a copy of the sources (the checkout's top-level packages and build files, so the checkout gets no
    build/ or egg-info), then the wheel from the unpacked sdist; returns the wheel's path."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "setup.cfg", "setup.py", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for package in sorted(p for p in ROOT.iterdir() if (p / "__init__.py").is_file()):  # stitchvm and the rest
        shutil.copytree(package, src / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    hook = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    sdist = tmp / "sdist" / run([sys.executable, "-c", hook, "build_sdist", tmp / "sdist"], src).split()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = run([sys.executable, "-c", hook, "build_wheel", tmp / "dist"], unpacked).split()[-1]
    return tmp / "dist" / wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv holding only the wheel, with this interpreter's site-packages appended for the dependencies."""
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
         "--no-cache-dir", wheel], tmp)
    own = Path(run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    assert not any(Path(d).resolve() == ROOT for d in deps)
    (own / "_stitchvm_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return venv


@pytest.mark.e2e
def test_wheel_ships_and_loads_the_world(tmp_path):
    shipped = shipped_files()
    missing_here = sorted(set(REQUIRED) - set(shipped))
    assert not missing_here, f"the checkout lacks {missing_here}"

    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as whl:
        sizes = {info.filename: info.file_size for info in whl.infolist()}
    for rel in shipped:
        name = f"stitchvm/world/{rel}"
        assert name in sizes, f"{name} is not in the wheel {wheel.name}"
        assert sizes[name] == (WORLD / rel).stat().st_size, f"{name} differs in size from the checkout's"

    venv = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"  # cwd: neither the repo nor anything importable
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STITCHVM_WORLD", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    out = run([venv / "bin" / "python", "-I", "-c", CHECK, venv], elsewhere, env)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["image"][1] == 3 and result["bpe_lines"] > 40_000, result
