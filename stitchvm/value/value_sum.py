"""The value of a multi-reward sum, Σ_k w_k r_k (the paper aligns with DFN-CLIP + HPSv2): one stitched value model
per term, summed, V = Σ_k w_k V_k.

Why one model per term rather than one model with two heads:
- It is exact. The value is an expectation, E[Σ w_k r_k | z_t] = Σ w_k E[r_k | z_t], so the sum of the terms'
  values is the value of the sum; a joint model has nothing more to learn.
- The terms share nothing a joint model could share beyond u_{≤i}: DFN-CLIP and HPSv2 are different networks (DFN
  trained from scratch, HPSv2 fine-tuned from LAION's ViT-H-14), so the tokens entering block j of one are not the
  other's, and each needs its own stitch s_ψ and its own tail r_{≥j} (the tails are the cost: 32 − j ViT-H blocks
  each, one model or two). What there is to share, the backbone head, is shared here at run time: the terms read
  one head pass, which is all a "two-head" model saves.
- Each term keeps the pipeline's single-reward stages as they are (search, its own j; train; evaluate: which term
  is predicted badly shows), its registered model, and can be re-weighted or recombined without retraining.
The cost: two stitch layers and two tails to train (as a two-head model). The terms must read the same branch of
the same backbone; each keeps the i its search chose (one pass of the deepest head gives every term its u_{≤i_k}),
except under DPS, whose shared CFG branch hands over the tokens after one block: there the terms need the same i.
Guidance (`dps_stitchvm`) and the NFT/DRaFT trainers take a `ValueSum` where they take a `StitchedValueModel`: it has
the `head`, `context`, `backbone_spec`, `value_from_head` and `__call__` they use.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from stitchvm.models.backbone import Backbone
from stitchvm.models.reward import ClipReward
from stitchvm.value.model import StitchedValueModel

FORMAT = "stitchvm-value-sum/1"


class ValueSum(nn.Module):
    def __init__(self, terms: list[StitchedValueModel], weights: list[float]):
        super().__init__()
        if not terms or len(terms) != len(weights):
            raise ValueError(f"a value sum needs one weight per term: {len(terms)} terms, {len(weights)} weights")
        first = terms[0]
        for k, m in enumerate(terms[1:], start=2):
            if (m.context, m.backbone_spec) != (first.context, first.backbone_spec):
                raise ValueError(f"value term {k} reads the {m.context!r} branch of {m.backbone_spec.source!r}, term 1 "
                                 f"the {first.context!r} branch of {first.backbone_spec.source!r}: the terms of a sum "
                                 f"share one backbone head (same backbone and search.context)")
        self.terms, self.weights = nn.ModuleList(terms), [float(w) for w in weights]
        self.deepest = max(range(len(terms)), key=lambda k: terms[k].i)

    # what guidance and the trainers read of a value model
    @property
    def head(self):
        """The deepest term's head: its pass computes every term's u_{≤i_k} on the way."""
        return self.terms[self.deepest].head

    @property
    def context(self) -> str:
        return self.terms[0].context

    @property
    def i(self) -> int:
        return self.terms[self.deepest].i

    @property
    def backbone_spec(self):
        return self.terms[0].backbone_spec

    def value_from_head(self, u: torch.Tensor, latent_hw: tuple[int, int], prompts: list[str] | None = None
                        ) -> torch.Tensor:
        """(B,) Σ_k w_k V_k from the head tokens u_{≤i} (B, N, D), computed once for every term (DPS hands over the
        tokens after one block only: the terms must share i)."""
        depths = sorted({m.i for m in self.terms})
        if len(depths) > 1:
            raise ValueError(f"the value terms stop at backbone blocks {depths}: DPS shares the tokens after one "
                             f"block, so guidance needs terms with the same i (the trainers take any)")
        return sum(w * m.value_from_head(u, latent_hw, prompts) for w, m in zip(self.weights, self.terms))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """V(z_t, t, prompt) = Σ_k w_k V_k: (B,) values from one head pass (term k reads the tokens after its i_k)."""
        u = self.head(z_t, t, prompts, all_blocks=True)  # [(B, N, D)] after blocks 1..max i
        return sum(w * m.value_from_head(u[m.i - 1], z_t.shape[-2:], prompts)
                   for w, m in zip(self.weights, self.terms))

    def save_pretrained(self, path: str | Path) -> None:
        """`path/term-<k>/` (each a StitchedValueModel) and `path/config.json` (format, weights)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for k, m in enumerate(self.terms):
            m.save_pretrained(path / f"term-{k}")
        (path / "config.json").write_text(json.dumps({"format": FORMAT, "weights": self.weights}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, backbone: Backbone | None = None,
                        rewards: list[ClipReward] | None = None, device: str | torch.device = "cpu") -> "ValueSum":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} does not exist: {path} is not a saved ValueSum")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: format {cfg.get('format')!r} is not {FORMAT!r}")
        weights = cfg["weights"]
        if rewards is not None and len(rewards) != len(weights):
            raise ValueError(f"{path} has {len(weights)} terms, {len(rewards)} rewards were given")
        terms = [StitchedValueModel.from_pretrained(path / f"term-{k}", backbone,
                                                    None if rewards is None else rewards[k], device)
                 for k in range(len(weights))]
        return cls(terms, weights)
