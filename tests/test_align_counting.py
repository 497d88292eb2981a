"""`bench align --count`: the FLOPs of an update composed from its pieces equal the FLOPs of a real update.

The composition in stitchvm/benchmarks/align_counting.py is arithmetic over separately counted pieces; here the
trainers themselves (`train_nft`, `train_draft`) run one update on the tiny models under the same counter, and the
two totals must agree exactly (FLOPs do not depend on the values, only on the shapes). The text encoders, which
run once per prompt in practice (cached) but once per update in the trainers, are counted alone and taken off.
"""
import json

import pytest

from stitchvm.alignment.draft import train_draft
from stitchvm.alignment.nft import NFT_ADAPTERS, train_nft
from stitchvm.benchmarks.align_counting import PROMPT, piece_costs, stopping_steps, update_row
from stitchvm.benchmarks.counting import FlopCounter, FusedAttention
from stitchvm.config import AlignConfig, from_dict
from stitchvm.diffusion.sampling import encode_conditioning
from stitchvm.models.lora import LoraPolicy
from stitchvm.value.model import StitchedValueModel

# 3 sampler steps, CFG 2 (both branches counted), one prompt group of 2; a one-point stopping window so that the
# update's τ is known: NFT+StitchVM stops after 2 steps, DRaFT+StitchVM after 2 with K = 2 (the first differentiable
# step's backward stops at the adapter, the second's reaches z)
CFG = dict(updates=1, prompts_per_update=1, group_size=2, steps=3, guidance_scale=2.0, lora_rank=2, lora_alpha=4.0,
           batch_size=8, eval_every=1, nft=dict(train_times=0, kl_weight=1e-4, tau_window=(2, 2), tau_of=3),
           draft=dict(k=2, reg_weight=0.01, tau_window=(2, 2), tau_of=3))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def tflops(fn) -> float:
    with FusedAttention(), FlopCounter() as flops:
        fn()
    return flops.get_total_flops() / 1e12


@pytest.mark.parametrize("method", ["nft", "nft-stitchvm", "draft", "draft-stitchvm"])
def test_composed_update_flops_equal_a_counted_update_of_the_trainer(method, backbone, reward):
    cfg = from_dict(AlignConfig, {**CFG, "method": method})
    policy = LoraPolicy(backbone, cfg.lora_rank, cfg.lora_alpha, adapters=NFT_ADAPTERS)
    value_model = StitchedValueModel(backbone, reward, 2, 2).eval()  # as the align stage loads it: trainable
    prompts = [PROMPT]  # one prompt: the reward's cached text embedding is the one the pieces warm
    reward.text_embeds(prompts)
    train = train_nft if method.startswith("nft") else train_draft
    real = tflops(lambda: train(policy, reward, prompts, cfg, seed=0,
                                value_model=value_model if method.endswith("stitchvm") else None))
    batch = [PROMPT] * cfg.group_size
    text = tflops(lambda: encode_conditioning(policy.backbone, batch, cfg.guidance_scale))

    costs = piece_costs(policy, [reward], [value_model], backbone.image_size, cfg)
    composed = update_row(method, backbone.image_size, costs, cfg)
    assert composed["mean_tau"] == (2 if method.endswith("stitchvm") else 3)
    assert composed["tflops_per_update"] == pytest.approx(real - text, rel=1e-9)


def test_stitchvm_updates_cost_less_and_the_window_is_the_scaled_one(backbone, reward):
    cfg = from_dict(AlignConfig, {**CFG, "steps": 10, "nft": {**CFG["nft"], "tau_window": (12, 17), "tau_of": 25},
                                  "draft": {**CFG["draft"], "tau_window": (3, 7), "tau_of": 10}})
    assert stopping_steps(cfg, "nft-stitchvm") == [5, 6, 7]  # {12..17} of 25 scaled to 10 steps
    assert stopping_steps(cfg, "draft-stitchvm") == [3, 4, 5, 6, 7]
    assert stopping_steps(cfg, "nft") == [10]
    policy = LoraPolicy(backbone, cfg.lora_rank, cfg.lora_alpha)
    costs = piece_costs(policy, [reward], [StitchedValueModel(backbone, reward, 2, 2)], backbone.image_size, cfg)
    rows = {m: update_row(m, backbone.image_size, costs, cfg)
            for m in ("nft", "nft-stitchvm", "draft", "draft-stitchvm")}
    n, c = cfg.prompts_per_update * cfg.group_size, costs
    # NFT: 10 steps + 10 training terms; NFT+StitchVM: τ of each, τ = 5, 6, 7 equally likely (mean 6)
    assert rows["nft"]["tflops_per_update"] == pytest.approx(n * (10 * c["step"] + c["reward"] + 10 * c["train_pass"]))
    assert rows["nft-stitchvm"]["tflops_per_update"] == pytest.approx(
        n * (6 * c["step"] + c["value"] + 6 * c["train_pass"]))
    # DRaFT-2 + StitchVM: τ = 3..7 (mean 5), the last 2 steps with autograd (+ the regulariser's base pass each)
    assert rows["draft-stitchvm"]["tflops_per_update"] == pytest.approx(
        n * (3 * c["step"] + c["first_grad_step"] + c["grad_step"] + 2 * c["ref_step"] + c["value_grad"]))
    assert rows["draft"]["tflops_per_update"] > rows["draft-stitchvm"]["tflops_per_update"]
    json.dumps(rows)  # the rows are the report's JSON
