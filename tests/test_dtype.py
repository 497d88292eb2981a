"""The dtype and device policy (stitchvm/value/model.py's docstring): frozen weights in backbone.dtype / reward.dtype,
the value model's trainable parts in float32 master weights under autocast, float32 values and scores, the stitch
search in float64; the `device` setting and --device; the GPU check's CPU smoke (stitchvm/benchmarks/gpu_check.py).

Tolerances of bfloat16 against float32 from the same init (tiny presets; measured on CPU, about 1/5 of each bound):
value 3e-2 relative (measured 3.5e-3), embedding 3e-2, ∇V 1e-1 (1.6e-2 StitchVM, 4.3e-2 Tweedie), 3-step samples
6e-2 (2.2e-2), final training loss 5e-2 (1.3e-3).
"""
import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from stitchvm.config import ConfigError, ModelSpec, Params, RewardSpec, TrainConfig, from_dict
from stitchvm.diffusion.sampling import encode_conditioning, sample
from stitchvm.guidance.dps import dps_stitchvm, dps_tweedie, stitchvm_value_and_grad, tweedie_value_and_grad
from stitchvm.models.backbone import build_backbone
from stitchvm.models.reward import build_reward
from stitchvm.stages.runtime import DEVICE_ENV, resolve_device, stage_device
from stitchvm.value.model import StitchedValueModel
from stitchvm.value.search import NormalEquations, search_stitch
from stitchvm.value.stitching import resample
from stitchvm.value.training import teacher_targets, train_value_model

PROMPTS = ["a red cube", "a blue ball"] * 4
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def models():
    """The tiny presets in float32 and bfloat16 from the same seeds (bf16 = the float32 init, rounded)."""
    return {dt: (build_backbone(ModelSpec("tiny:sd3", dtype=dt)), build_reward(RewardSpec("tiny:clip", dtype=dt)))
            for dt in ("float32", "bfloat16")}


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, 16, 16, generator=g), torch.randn(8, 4, 16, 16, generator=g), torch.rand(8, generator=g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def value_models(models, **kw):
    return {dt: StitchedValueModel(bb, rw, 2, 2, **kw) for dt, (bb, rw) in models.items()}


# ---- where each part lives -------------------------------------------------------------------------------------
def test_bf16_frozen_weights_and_float32_master_weights(models):
    bb, rw = models["bfloat16"]
    for m in (bb.transformer, bb.vae, bb.text_encoder, bb.text_encoder_2, rw.clip):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in m.parameters())
    assert rw.dtype == torch.bfloat16
    vm = StitchedValueModel(bb, rw, 2, 2)
    trainable = {id(p) for p in vm.trainable_parameters()}
    assert trainable and all(p.dtype == torch.float32 and p.requires_grad for p in vm.trainable_parameters())
    frozen = [(n, p) for n, p in vm.named_parameters() if id(p) not in trainable]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for _, p in frozen)
    assert isinstance(vm.autocast(), torch.autocast)
    # float32 models never enter autocast: their numerics are the ones before the policy
    assert isinstance(StitchedValueModel(*models["float32"], 2, 2).autocast(), contextlib.nullcontext)


def test_aesthetic_head_stays_float32_under_a_bf16_clip():
    rw = build_reward(RewardSpec("tiny:clip", kind="aesthetic", head="random", dtype="bfloat16"))
    assert {p.dtype for p in rw.head.parameters()} == {torch.float32} and rw.clip.dtype == torch.bfloat16
    scores = rw.score_pixels(torch.rand(2, 3, 40, 48) * 2 - 1, PROMPTS[:2])  # resized: the float32 resize path
    assert scores.dtype == torch.float32 and scores.isfinite().all()


# ---- bfloat16 against float32 -----------------------------------------------------------------------------------
def test_bf16_value_forward_and_gradient_match_float32(models, inputs):
    _, zt, t = inputs
    vms = value_models(models)
    out = {}
    for dt, vm in vms.items():
        z = zt.clone().requires_grad_(True)  # float32 latents: the head casts them to the backbone's dtype
        v = vm(z, t, PROMPTS)
        (g,) = torch.autograd.grad(v.sum(), z)
        out[dt] = v.detach(), g, vm.embed(zt, t)[0].detach()
    (v16, g16, e16), (v32, g32, e32) = out["bfloat16"], out["float32"]
    assert v16.dtype == e16.dtype == torch.float32 and g16.dtype == torch.float32
    assert rel(v16, v32) < 3e-2 and rel(e16, e32) < 3e-2 and rel(g16, g32) < 1e-1


def test_bf16_training_decreases_the_loss_and_keeps_float32_masters(models, inputs):
    z0, _, _ = inputs
    cfg = TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=1, group_size=4, lambda_rank=1.0)
    prompts = PROMPTS * 2
    final = {}
    for dt, vm in value_models(models).items():
        targets = teacher_targets(*models[dt], z0, 8)
        assert targets.embeds.dtype == targets.tokens.dtype == torch.float32
        history = train_value_model(vm, z0, targets, cfg, seed=0, progress=False, prompts=prompts)
        losses = [r["loss"] for r in history]
        assert all(math.isfinite(x) for x in losses) and max(losses[-5:]) < 0.5 * losses[0]
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in vm.trainable_parameters())
        final[dt] = losses[-1]
    assert final["bfloat16"] == pytest.approx(final["float32"], rel=5e-2)


def test_bf16_guided_sampling_and_dps_steps_match_float32(models, inputs):
    _, zt, _ = inputs
    vms = value_models(models)
    samples, steps = {}, {}
    for dt, (bb, rw) in models.items():
        samples[dt] = [sample(bb, PROMPTS[:2], 3, 4.5, torch.Generator().manual_seed(1), guidance=g, eta=1.0)
                       for g in (dps_stitchvm(vms[dt], 2.0), dps_tweedie(rw, 0.5))]
        cond, z = encode_conditioning(bb, PROMPTS[:2], 4.5), zt[:2].to(bb.transformer.dtype)
        t = torch.tensor([0.7, 0.4])
        steps[dt] = [tweedie_value_and_grad(bb, rw, z, t, cond), stitchvm_value_and_grad(vms[dt], bb, z, t, cond)]
    for s16, s32 in zip(samples["bfloat16"], samples["float32"]):
        assert s16.dtype == torch.bfloat16 and s16.isfinite().all() and rel(s16, s32) < 6e-2
    for a, b in zip(steps["bfloat16"], steps["float32"]):
        assert a.value.dtype == torch.float32 and rel(a.value, b.value) < 3e-2
        assert a.grad.isfinite().all() and rel(a.grad, b.grad) < 1e-1
        assert F.cosine_similarity(a.grad.double().flatten(), b.grad.double().flatten(), dim=0) > 0.99


def test_float16_runs_too(inputs):
    _, zt, t = inputs
    bb, rw = build_backbone(ModelSpec("tiny:sd3", dtype="float16")), build_reward(RewardSpec("tiny:clip", dtype="float16"))
    vm = StitchedValueModel(bb, rw, 2, 2)
    assert vm(zt, t, PROMPTS).isfinite().all()
    assert sample(bb, PROMPTS[:2], 2, 4.5, torch.Generator().manual_seed(1), guidance=dps_stitchvm(vm, 2.0),
                  eta=1.0).isfinite().all()


# ---- the stitch search in float64 -------------------------------------------------------------------------------
def test_search_accumulates_in_float64_where_float32_fails():
    # tokens with a large mean and a small spread: [x, 1] is nearly collinear, XᵀX has condition ~1e10
    g = torch.Generator().manual_seed(0)
    x = (1000 + 4 * torch.randn(4096, 6, generator=g)).bfloat16()  # bf16 inputs, exactly representable
    w, b = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    y = x.double() @ w + b  # exact targets
    fit = NormalEquations(6, [3])
    for k in range(0, len(x), 1024):  # streamed, as the search streams batches
        fit.add(x[k:k + 1024], [y[k:k + 1024]])
    assert fit.xtx.dtype == fit.xty.dtype == torch.float64
    (sol, err), = fit.solve()
    assert torch.allclose(sol[:-1], w, atol=1e-5) and torch.allclose(sol[-1], b, atol=1e-2) and err < 1e-8
    # the same normal equations summed in float32: the fit is lost (this is what the test guards against)
    x1 = torch.cat([x.float(), torch.ones(len(x), 1)], 1)
    sol32 = torch.linalg.lstsq(x1.T @ x1, x1.T @ y.float(), driver="gelsd").solution
    assert (sol32[:-1].double() - w).abs().max() > 1e-2


def test_search_on_bf16_models(models, inputs):
    z0, zt, t = inputs
    (bb, rw), (bb32, rw32) = models["bfloat16"], models["float32"]
    res = search_stitch(bb, rw, z0[:8], 0.5 * z0[:8] + 0.5 * zt, t, j_max=2, batch_size=4, progress=False)
    ref = search_stitch(bb32, rw32, z0[:8], 0.5 * z0[:8] + 0.5 * zt, t, j_max=2, batch_size=4, progress=False)
    assert res.weight.dtype == torch.float64 and res.weight.isfinite().all()
    errors = torch.tensor([r["error"] for r in res.table])
    assert ((errors >= 0) & (errors <= 1.5)).all()
    assert errors.tolist() == pytest.approx([r["error"] for r in ref.table], abs=5e-2)


# ---- U where the token grid is finer ----------------------------------------------------------------------------
def test_resample_averages_when_the_token_grid_is_twice_as_fine():
    fmap = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = resample(fmap, (4, 4))
    assert torch.allclose(out, F.avg_pool2d(fmap, 2))  # each patch: the mean of its 2×2 tokens
    (grad,) = torch.autograd.grad(out.sum(), fmap)
    assert (grad > 0).all()  # every token reaches the reward (bilinear at 4× reads half of them)
    big = torch.randn(1, 1, 16, 16, requires_grad=True)
    (g_bil,) = torch.autograd.grad(F.interpolate(big, size=(4, 4), mode="bilinear", align_corners=False).sum(), big)
    (g_res,) = torch.autograd.grad(resample(big, (4, 4)).sum(), big)
    assert (g_bil == 0).any() and (g_res > 0).all()
    # less than twice as fine (8 -> 6, the tiny presets) and enlarging stay bilinear, as before
    small = torch.randn(1, 2, 8, 8)
    for grid in ((6, 6), (12, 12)):
        assert torch.equal(resample(small, grid), F.interpolate(small, size=grid, mode="bilinear", align_corners=False))


# ---- the device setting -----------------------------------------------------------------------------------------
def test_device_setting(monkeypatch):
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"device 'gpu' is not auto, cpu, cuda or cuda:N"):
        from_dict(Params, {"device": "gpu"})
    params = from_dict(Params, {"device": "cpu"})
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert stage_device(params) == "cpu" and stage_device(Params()) == resolve_device("auto")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert stage_device(Params(device="auto")) == "cpu"


@no_cuda
def test_cuda_without_cuda_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from stitchvm.__main__ import main

    with pytest.raises(ValueError, match=r"^device 'cuda:1': torch .* sees 0 CUDA device"):
        resolve_device("cuda:1")
    prof = tmp_path / "tiny.yaml"
    prof.write_text(yaml.safe_dump({"device": "cuda", "backbone": {"source": "tiny:sd3"},
                                    "reward": {"source": "tiny:clip"}}))
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    # params' device: the first model build fails in one line (the bench's exit 1)
    assert main(["bench", "guidance", "--profile", str(prof), "--out", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees 0 CUDA device" in err[0]
    # --device: refused before anything runs (exit 2)
    assert main(["prompts", "--device", "cuda", "--params", str(prof)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stitchvm: device 'cuda': torch " + torch.__version__ + " sees 0 CUDA device(s) (a CPU build of "
                   "torch sees none; use --device cpu or auto)"]
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "guidance", "--device", "gpu"])
    assert exit_.value.code == 2


# ---- the arch profile's counting mode in bfloat16 ------------------------------------------------------------------
def test_arch_profile_counts_in_bf16(tmp_path):
    from stitchvm.benchmarks.guidance import run as bench

    report = bench("profiles/arch.yaml", str(tmp_path / "count.json"), count=True, progress=False, resolutions=(64,),
                   methods=("dps-tweedie", "dps-stitchvm"))
    assert "bfloat16 bytes" in report["device"] and report["backbone"] == "arch:sd3.5-medium"
    for row in report["rows"]:
        assert math.isfinite(row["tflops_per_step"]) and row["tflops_per_step"] > 0 and row["saved_activation_gb"] > 0


# ---- the GPU check ------------------------------------------------------------------------------------------------
@no_cuda
def test_gpu_check_refuses_without_cuda(capsys, monkeypatch):
    from stitchvm.benchmarks.gpu_check import main

    monkeypatch.setenv(DEVICE_ENV, "cpu")  # not read: the CPU smoke needs --device cpu
    assert main(["--out", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-check: torch") and "no CUDA device" in err[0]


def test_gpu_check_cpu_smoke_writes_the_report(tmp_path):
    from stitchvm.benchmarks import gpu_check

    prof = tmp_path / "tiny_bf16.yaml"
    prof.write_text(yaml.safe_dump({"backbone": {"source": "tiny:sd3", "dtype": "bfloat16"},
                                    "reward": {"source": "tiny:clip", "dtype": "bfloat16"},
                                    "guidance": {"value_i": 2, "value_j": 2}}))
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--profile", str(prof), "--device", "cpu", "--resolutions", "32,64", "--steps", "2",
                           "--train-steps", "2", "--train-warmup", "1", "--train-batch", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "cuda", "profile", "backbone", "reward", "dtype", "pair", "guidance_scale", "steps",
            "resolutions", "rows", "train", "ratios", "build_s", "wall_s"} <= set(report)
    assert report["dtype"] == {"backbone": "bfloat16", "reward": "bfloat16", "value_model_master": "float32"}
    assert [(r["resolution"], r["method"]) for r in report["rows"]] == [
        (res, m) for res in (32, 64) for m in gpu_check.METHODS]
    for row in report["rows"]:
        assert set(gpu_check.SAMPLE_COLUMNS) <= set(row) and row["sec_per_sample"] > 0
    assert [r["resolution"] for r in report["train"]] == [32, 64]
    for row in report["train"]:
        assert set(gpu_check.TRAIN_COLUMNS) <= set(row) and row["samples_per_s"] > 0 and row["batch_size"] == 4
    assert set(report["ratios"]) == {"32", "64"}
    assert set(report["ratios"]["64"]) == {"tweedie_over_stitchvm_time", "stitchvm_over_unguided_time",
                                           "stitchvm_over_tweedie_peak"}


# ---- on a GPU (skipped without one) ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_value_model_and_dps_on_cuda(inputs):
    _, zt, t = inputs
    bb = build_backbone(ModelSpec("tiny:sd3", dtype="bfloat16"), "cuda")
    rw = build_reward(RewardSpec("tiny:clip", dtype="bfloat16"), "cuda")
    vm = StitchedValueModel(bb, rw, 2, 2)
    assert vm.class_token.device.type == "cuda" and vm(zt.cuda(), t.cuda(), PROMPTS).dtype == torch.float32
    z = sample(bb, PROMPTS[:2], 2, 4.5, torch.Generator().manual_seed(1), guidance=dps_stitchvm(vm, 2.0), eta=1.0)
    assert z.device.type == "cuda" and z.isfinite().all()
