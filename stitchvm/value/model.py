"""The stitched value model V_{i,j}(z_t, t, prompt) = r_{≥j}(s_ψ(u_{≤i}(z_t, t, ∅)), prompt).

With `context="prompt"` the head reads the conditional branch, u_{≤i}(z_t, t, prompt), instead of the empty-prompt one
(backbone_head.py says why).

Trainable: the stitching layer, the class token, the position embeddings and a copy of the reward tail r_{≥j}.
Frozen and shared (never serialised, rebuilt from their specs): the backbone head and the reward model (the teacher,
its text tower and any score head).

Precision: the frozen parts run in their specs' dtype (backbone.dtype, reward.dtype: float32, bfloat16 or float16);
the trainable parts hold float32 master weights and, when the reward runs in a lower dtype, compute under
`torch.autocast` in that dtype (`autocast`). The stitch casts at its boundaries (backbone tokens in, float32 out);
embeddings, tokens and values leave the model in float32. With a float32 reward no autocast is entered at all.
"""
from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stitchvm.models.backbone import Backbone, build_backbone, seeded, upcast
from stitchvm.value.head import BackboneHead
from stitchvm.config import ModelSpec, RewardSpec, from_dict, to_dict
from stitchvm.models.reward import ClipReward, build_reward
from stitchvm.value.stitching import StitchingLayer

FORMAT = "stitchvm-value/1"
TRAINABLE = ("stitch.", "class_token", "position_embedding", "tail.")


class StitchedValueModel(nn.Module):
    def __init__(self, backbone: Backbone, reward: ClipReward, i: int, j: int,
                 class_token: torch.Tensor | None = None, seed: int = 0, factor: int = 1, context: str = "empty",
                 master_dtype: torch.dtype | None = None, kernel: int = 1, residual_width: int | None = None,
                 residual_kernel: int = 1):
        """`kernel`, `residual_width`, `residual_kernel`: the stitch's F and G (stitching.py). `master_dtype`: the trainable parts' weights; default float32, or the reward's dtype if wider (a float64
        test model). Counting mode on `meta`, where autocast does not exist and nothing trains, passes the reward's
        dtype so that they count as autocast would run them."""
        super().__init__()
        master_dtype = master_dtype or torch.promote_types(reward.dtype, torch.float32)
        reward.check_block(j)
        self.i, self.j = i, j
        self.backbone_spec, self.reward_spec = backbone.spec, reward.spec
        self.head = BackboneHead(backbone, i, context)
        self.reward = reward
        embeddings = reward.clip.vision_model.embeddings
        with seeded(seed):  # G's first conv is randomly initialised; runs must not depend on the global RNG
            self.stitch = StitchingLayer(backbone.width, reward.width, reward.grid, factor=factor, kernel=kernel,
                                         residual_width=residual_width, residual_kernel=residual_kernel)
            self.stitch.to(reward.image_mean.device, master_dtype)
        # For j > 1 the class token entering block j depends on the image; it is learned (search gives its mean).
        # Copies of the frozen reward's weights become master weights (float32 from a bf16 reward).
        cls = embeddings.class_embedding if class_token is None else class_token
        self.class_token = nn.Parameter(cls.detach().clone().reshape(1, 1, -1).to(master_dtype))  # (1, 1, D)
        self.position_embedding = nn.Parameter(  # (1, 1+P, D)
            embeddings.position_embedding.weight.detach().clone()[None].to(master_dtype))
        self.tail = copy.deepcopy(reward.tail(j)).to(master_dtype).requires_grad_(True).train()

    @property
    def context(self) -> str:
        """The CFG branch the head reads: "empty" (METHOD.md) or "prompt"."""
        return self.head.context

    @property
    def factor(self) -> int:
        """The stitch's sub-pixel factor (1: bilinear U)."""
        return self.stitch.factor

    @property
    def kernel(self) -> int:
        """The stitch's F kernel size (1: METHOD.md's 1×1 conv)."""
        return self.stitch.kernel

    def train(self, mode: bool = True) -> "StitchedValueModel":
        super().train(mode)
        self.head.eval()  # the frozen parts never leave eval mode (the aesthetic head has dropout)
        self.reward.eval()
        return self

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if n.startswith(TRAINABLE)]

    def autocast(self):
        """Mixed precision for the trainable parts: `torch.autocast` in the reward's dtype when that is lower than
        the master weights' (bf16/fp16 rewards); a null context otherwise (float32: numerics untouched)."""
        low, master = self.reward.dtype, self.class_token.dtype
        if low == master:
            return nullcontext()
        return torch.autocast(self.class_token.device.type, dtype=low)

    def reward_tokens(self, u: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """(B, N, Db) head tokens u_{≤i} of a latent of size `latent_hw` -> (B, 1+P, D) tokens entering block j."""
        with self.autocast():
            s = self.stitch(u, self.head.grid(latent_hw))  # (B, P, D) in the master dtype
            cls = self.class_token.expand(s.shape[0], -1, -1)
            return torch.cat([cls, s], dim=1) + self.position_embedding

    def stitch_tokens(self, z_t: torch.Tensor, t: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """(B, C, H, W), (B,) -> (B, 1+P, D) tokens entering reward block j (a prompt head needs `prompts`)."""
        return self.reward_tokens(self.head(z_t, t, prompts), z_t.shape[-2:])

    def embed_from_head(self, u: torch.Tensor, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, E) l2-normalised predicted image embedding and (B, 1+P, D) per-token outputs of r_{≥j}, float32."""
        with self.autocast():
            embeds, tokens = self.tail(self.reward_tokens(u, latent_hw))
        return F.normalize(upcast(embeds), dim=-1), upcast(tokens)  # the loss and the score in float32

    def embed(self, z_t: torch.Tensor, t: torch.Tensor, prompts: list[str] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_from_head(self.head(z_t, t, prompts), z_t.shape[-2:])

    def value_from_head(self, u: torch.Tensor, latent_hw: tuple[int, int], prompts: list[str] | None = None
                        ) -> torch.Tensor:
        """V from head tokens u_{≤i} (guidance computes them once, shared with the CFG branch): (B,) values."""
        b = u.shape[0]
        if self.reward.reads_prompt and (prompts is None or len(prompts) != b):
            raise ValueError(f"a CLIP value needs one prompt per latent: got {0 if prompts is None else len(prompts)} "
                             f"prompts for {b} latents")
        embeds, _ = self.embed_from_head(u, latent_hw)
        text = self.reward.prompt_embeds(prompts) if self.reward.reads_prompt else None
        return self.reward.score(embeds, None if text is None else text.to(embeds.device))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """V(z_t, t, prompt): (B,) values on the reward's scale."""
        return self.value_from_head(self.head(z_t, t, prompts), z_t.shape[-2:], prompts)

    # ---- persistence -------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"format": FORMAT, "i": self.i, "j": self.j, "factor": self.factor, "kernel": self.kernel,
                "residual": {"width": self.stitch.residual_width, "kernel": self.stitch.residual_kernel},
                "context": self.context, "backbone": to_dict(self.backbone_spec), "reward": to_dict(self.reward_spec)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k.startswith(TRAINABLE)}

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config(), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, backbone: Backbone | None = None, reward: ClipReward | None = None,
                        device: str | torch.device = "cpu") -> "StitchedValueModel":
        """Load trained weights; the frozen parts come from `backbone`/`reward` or are rebuilt from their specs."""
        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.is_file():
                raise FileNotFoundError(f"{f} does not exist: {path} is not a saved StitchedValueModel")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: format {cfg.get('format')!r} is not {FORMAT!r}")
        bspec, rspec = from_dict(ModelSpec, cfg["backbone"]), from_dict(RewardSpec, cfg["reward"])
        backbone = _matching(backbone, bspec, "backbone", path) or build_backbone(bspec, device)
        reward = _matching(reward, rspec, "reward", path) or build_reward(rspec, device)
        residual = cfg.get("residual", {})  # absent in models saved before G was configurable: METHOD.md's G
        model = cls(backbone, reward, cfg["i"], cfg["j"], factor=cfg.get("factor", 1),
                    context=cfg.get("context", "empty"), kernel=cfg.get("kernel", 1),
                    residual_width=residual.get("width"), residual_kernel=residual.get("kernel", 1))
        state = load_file(str(weights), device=str(device))
        expected = model.trainable_state_dict()
        bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if bad or set(state) - set(expected):
            k = (bad or sorted(set(state) - set(expected)))[0]
            raise ValueError(f"{weights} does not fit a value model with i={cfg['i']}, j={cfg['j']} on "
                             f"{bspec.source!r} + {rspec.source!r}: tensor {k!r} is missing or has another shape")
        model.load_state_dict(state, strict=False)
        return model


def _matching(component, spec, what: str, path: Path):
    if component is None:
        return None
    if component.spec != spec:
        raise ValueError(f"checkpoint {path} was trained with {what} {to_dict(spec)}, "
                         f"but the given {what} is {to_dict(component.spec)}")
    return component
