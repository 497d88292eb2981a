"""Stage 1: choose the interface (i, j) by closed-form least squares.

For every backbone block i and reward block j ≤ j_max, fit y ≈ [x, 1] W (float64) from backbone tokens
x = U(u_{≤i}(z_t)) (resampled to the reward grid) to the reward's patch tokens y = r_{<j}(D(z0)) minus the position
embeddings (the stitched model adds them back). With a sub-pixel U (`factor` > 1, see stitching.py) x is the backbone
token itself and y the factor² reward patches under it (`pixel_unshuffle`), so each sub-position gets its own map.
The fit streams over the probe set through the normal equations, so
memory does not grow with the probe size. The normalised error is the fraction of y's variance left unexplained.

With `kernel` k > 1 the chosen pair is fitted again with x each token's k×k neighbourhood (`neighbourhoods`): the
initialisation of a k×k F. The table itself stays 1×1 (the neighbourhood fit of every pair would hold depth × (k²·width)²
sums: 1.5 GB per block for SD3.5 at k = 3), and the k×k fit has k² times the unknowns, so it needs a larger probe (on
the embedded world, 3×3 fitted on 128 probes overfits: 1024 do).

Precision: the sums accumulate in float64 on the device the models run on, whatever their dtype (XᵀX of tokens with a
large mean is ill-conditioned: float32 sums lose the fit), and the solve runs on the CPU (LAPACK's gelsd).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from stitchvm.progress import tqdm

from stitchvm.models.backbone import Backbone, upcast
from stitchvm.value.head import BackboneHead
from stitchvm.models.reward import ClipReward
from stitchvm.value.stitching import check_kernel, map_to_tokens, neighbourhoods, resample, tokens_to_map
from stitchvm.value.model import StitchedValueModel


class NormalEquations:
    """Running sums for least squares of several targets on one design matrix with a bias column (float64, on
    `device`; inputs of any dtype and device are cast there)."""

    def __init__(self, in_dim: int, out_dims: list[int], device: str | torch.device = "cpu"):
        d = in_dim + 1
        self.out_dims = out_dims
        f64 = dict(dtype=torch.float64, device=device)
        self.xtx = torch.zeros(d, d, **f64)
        self.xty = torch.zeros(d, sum(out_dims), **f64)
        self.y_sum = torch.zeros(sum(out_dims), **f64)
        self.y_sq = torch.zeros(sum(out_dims), **f64)
        self.n = 0

    def add(self, x: torch.Tensor, ys: list[torch.Tensor]) -> None:
        """x: (n, in_dim); ys: one (n, out_dim_k) tensor per target."""
        dev = self.xtx.device  # float64 before any product: bf16/float32 sums of x·x lose the fit
        x = torch.cat([x.to(dev, torch.float64), torch.ones(len(x), 1, dtype=torch.float64, device=dev)], dim=1)
        y = torch.cat([t.to(dev, torch.float64) for t in ys], dim=1)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.y_sum += y.sum(0)
        self.y_sq += (y * y).sum(0)
        self.n += len(x)

    def solve(self) -> list[tuple[torch.Tensor, float]]:
        """Per target: W ((in_dim + 1), out_dim) with the bias in the last row, and the normalised error SSE/SST
        (float64, on the CPU: gelsd is a CPU driver)."""
        xtx, xty, y_sq, y_sum = (a.cpu() for a in (self.xtx, self.xty, self.y_sq, self.y_sum))
        w = torch.linalg.lstsq(xtx, xty, driver="gelsd").solution
        # SSE = Σ||y||² - tr(Wᵀ XᵀY) at the least-squares solution; SST = Σ||y - ȳ||².
        sse_cols = y_sq - (w * xty).sum(0)
        sst_cols = y_sq - y_sum ** 2 / self.n
        out, start = [], 0
        for d in self.out_dims:
            sl = slice(start, start + d)
            sst = sst_cols[sl].sum().item()
            out.append((w[:, sl], max(sse_cols[sl].sum().item(), 0.0) / max(sst, 1e-300)))
            start += d
        return out


@dataclass
class SearchResult:
    table: list[dict]  # [{"i", "j", "error"}] for every pair
    i: int
    j: int
    weight: torch.Tensor  # (backbone width, factor²·reward width) float64
    bias: torch.Tensor  # (factor²·reward width,)
    class_token: torch.Tensor  # (reward width,) mean class token entering block j, minus its position embedding
    factor: int = 1  # sub-pixel factor of U (1: bilinear)
    context: str = "empty"  # the CFG branch the head reads (backbone_head.py)
    kernel: int = 1  # F's kernel size; weight holds each token's kernel² neighbourhood (backbone width · kernel² rows)
    kernel_error: float | None = None  # the chosen pair's normalised error with that kernel (None: kernel 1)

    def to_json(self) -> dict:
        return {"pair": {"i": self.i, "j": self.j}, "factor": self.factor, "context": self.context,
                "kernel": self.kernel, "kernel_error": self.kernel_error, "search": self.table}


def subpixel_factor(grid: tuple[int, int], reward_grid: tuple[int, int]) -> int:
    """The integer factor (≥ 2) by which `reward_grid` refines the backbone token `grid`."""
    factor = reward_grid[0] // grid[0]
    if factor < 2 or tuple(reward_grid) != (factor * grid[0], factor * grid[1]):
        raise ValueError(f"search.upsample 'subpixel' needs the reward patch grid {tuple(reward_grid)} to be an integer "
                         f"multiple (>= 2) of the backbone token grid {tuple(grid)}; use 'bilinear'")
    return factor


def patch_targets(reward: ClipReward, pixels: torch.Tensor, j: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B·N, factor²·D) patch tokens entering reward block j minus their position embeddings (the factor² patches
    under each backbone token when factor > 1) and (B, D) the class token, minus its position embedding."""
    pos = upcast(reward.clip.vision_model.embeddings.position_embedding.weight)  # (1+P, D), float32 at least
    tok = upcast(reward.tokens_entering(pixels, j))  # (B, 1+P, D): a bf16 reward's tokens in float32
    patches = tok[:, 1:] - pos[1:]  # (B, P, D)
    if factor > 1:  # the factor² patches under each backbone token: (B, N, factor²·D)
        patches = map_to_tokens(F.pixel_unshuffle(tokens_to_map(patches, reward.grid), factor))
    return patches.flatten(0, 1), tok[:, 0] - pos[0]


def stitch_features(u: torch.Tensor, grid: tuple[int, int], reward_grid: tuple[int, int], factor: int,
                    kernel: int = 1) -> torch.Tensor:
    """(B, N, Db) head tokens -> (B·P', Db·k²) the inputs of F's least squares: each token's k×k neighbourhood, then U
    (a resampling to the reward grid; none for a sub-pixel U, whose F predicts the factor² patches of its token).
    U is linear, so U∘F = F'∘U with F' the same map on resampled neighbourhoods: the fit is the stitch's F."""
    x = neighbourhoods(tokens_to_map(upcast(u), grid), kernel)  # bf16 head tokens in float32
    return map_to_tokens(x if factor > 1 else resample(x, reward_grid)).flatten(0, 1)


@torch.no_grad()
def search_stitch(backbone: Backbone, reward: ClipReward, z0: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                  j_max: int, batch_size: int, progress: bool = True, upsample: str = "bilinear", context: str = "empty",
                  prompts: list[str] | None = None, kernel: int = 1) -> SearchResult:
    """Fit every (i, j) on probe pairs: clean latents `z0` (N, C, H, W) and their noised versions `z_t` at `t` (N,).
    `upsample`: "bilinear" U, or "subpixel" (the reward grid must be an integer multiple ≥ 2 of the token grid).
    `context`: the head's CFG branch, "empty" or "prompt" (then `prompts` gives each probe's prompt).
    `kernel`: F's kernel size; > 1 fits the chosen pair again on k×k neighbourhoods (a second pass over the probe)."""
    reward.check_block(j_max)
    check_kernel(kernel)
    if upsample not in ("bilinear", "subpixel"):
        raise ValueError(f"upsample {upsample!r} is not 'bilinear' or 'subpixel'")
    if not len(z0) == len(z_t) == len(t):
        raise ValueError(f"probe sizes differ: {len(z0)} clean latents, {len(z_t)} noisy latents, {len(t)} times")
    head = BackboneHead(backbone, backbone.depth, context)
    if context == "prompt" and (prompts is None or len(prompts) != len(z0)):
        raise ValueError(f"context 'prompt' needs one prompt per probe: got {0 if prompts is None else len(prompts)} "
                         f"for {len(z0)} probes")
    grid = head.grid(z0.shape[-2:])
    factor = subpixel_factor(grid, reward.grid) if upsample == "subpixel" else 1
    dev = backbone.device
    fits = [NormalEquations(backbone.width, [reward.width * factor ** 2] * j_max, dev) for _ in range(backbone.depth)]
    cls_sum = torch.zeros(j_max, reward.width, dtype=torch.float64)
    for start in tqdm(range(0, len(z0), batch_size), desc="stitch search", disable=not progress):
        sl = slice(start, start + batch_size)
        z = z0[sl].to(dev)
        pixels = backbone.decode(z)
        targets = []
        for j in range(1, j_max + 1):
            patches, cls = patch_targets(reward, pixels, j, factor)  # (B·N, ·) on the device: the fits accumulate there
            cls_sum[j - 1] += cls.double().sum(0).cpu()
            targets.append(patches)
        feats = head(z_t[sl].to(dev), t[sl].to(dev), None if prompts is None else prompts[sl], all_blocks=True)
        for fit, u in zip(fits, feats):
            fit.add(stitch_features(u, grid, reward.grid, factor), targets)
    table, best = [], None
    for i, fit in enumerate(fits, start=1):
        for j, (w, err) in enumerate(fit.solve(), start=1):
            table.append({"i": i, "j": j, "error": err})
            if best is None or err < best[2]:
                best = (i, j, err, w)
    i, j, _, w = best
    kernel_error = None
    if kernel > 1:
        w, kernel_error = fit_kernel(backbone, reward, BackboneHead(backbone, i, context), z0, z_t, t, j, factor,
                                     kernel, batch_size, prompts, progress)
    return SearchResult(table=table, i=i, j=j, weight=w[:-1], bias=w[-1], class_token=(cls_sum[j - 1] / len(z0)),
                        factor=factor, context=context, kernel=kernel, kernel_error=kernel_error)


def fit_kernel(backbone: Backbone, reward: ClipReward, head: BackboneHead, z0: torch.Tensor, z_t: torch.Tensor,
               t: torch.Tensor, j: int, factor: int, kernel: int, batch_size: int, prompts: list[str] | None,
               progress: bool) -> tuple[torch.Tensor, float]:
    """The least-squares k×k F of the pair (head's i, j) on the probe: ((Db·k² + 1, out) with the bias last, error)."""
    grid = head.grid(z0.shape[-2:])
    fit = NormalEquations(backbone.width * kernel * kernel, [reward.width * factor ** 2], backbone.device)
    for start in tqdm(range(0, len(z0), batch_size), desc=f"stitch {kernel}×{kernel} fit", disable=not progress):
        sl = slice(start, start + batch_size)
        patches, _ = patch_targets(reward, backbone.decode(z0[sl].to(backbone.device)), j, factor)
        u = head(z_t[sl].to(backbone.device), t[sl].to(backbone.device), None if prompts is None else prompts[sl])
        fit.add(stitch_features(u, grid, reward.grid, factor, kernel), [patches])
    (w, err), = fit.solve()
    return w, err


def stitched_from_search(backbone: Backbone, reward: ClipReward, result: SearchResult,
                         residual_width: int | None = None, residual_kernel: int = 1) -> StitchedValueModel:
    """The value model at the chosen (i, j), with F set to the least-squares map (so at init s = U∘F = the fit);
    G's shape as given (stitching.py)."""
    model = StitchedValueModel(backbone, reward, result.i, result.j, class_token=result.class_token.float(),
                               factor=result.factor, context=result.context, kernel=result.kernel,
                               residual_width=residual_width, residual_kernel=residual_kernel)
    model.stitch.init_projection(result.weight.float(), result.bias.float())
    return model
