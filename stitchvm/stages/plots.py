"""Figures people would rather look at than read: search heatmap, training curve, value quality vs σ (PNG bytes)."""
from __future__ import annotations

import io

import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def search_heatmap(table: list[dict], chosen: tuple[int, int]) -> bytes:
    """Normalised least-squares error for every (backbone block i, reward block j); the chosen pair boxed."""
    i_max, j_max = max(r["i"] for r in table), max(r["j"] for r in table)
    grid = [[float("nan")] * i_max for _ in range(j_max)]
    for r in table:
        grid[r["j"] - 1][r["i"] - 1] = r["error"]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * i_max + 2), 0.5 * j_max + 1.5))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower",
                   extent=(0.5, i_max + 0.5, 0.5, j_max + 0.5))
    ax.add_patch(plt.Rectangle((chosen[0] - 0.5, chosen[1] - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xlabel("backbone block i")
    ax.set_ylabel("reward block j")
    ax.set_title("stitch search: normalised LS error")
    fig.colorbar(im, ax=ax)
    return _png(fig)


def training_curve(history: list[dict], keys=("loss", "embed", "tokens", "score"),
                   title: str = "distillation loss") -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:  # each key over the rows that have it (the token fit's rows, then stage 2's)
        rows = [r for r in history if key in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)
    return _png(fig)


def value_vs_sigma(rows: list[dict], metrics=("spearman_within_prompt", "spearman_within_prompt_vs_mc", "spearman",
                                             "distill_loss")) -> bytes:
    metrics = [m for m in metrics if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.3))
    for ax, metric in zip(axes if len(metrics) > 1 else [axes], metrics):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["sigma"], r[metric]) for r in rows if r["method"] == method and metric in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, linestyle="--" if method == "monte-carlo" else "-")
        ax.set_xlabel("σ")
        ax.set_title(metric)
        ax.legend()
    return _png(fig)


REWARD_CURVE_X = {"step": "update", "wall_s": "training wall time (s)"}


def reward_curve(history: list[dict], method: str, x: str = "step") -> bytes:
    """True reward of the fixed evaluation samples vs update (`x="step"`: the same for two identical runs, so DVC may
    hash it) or vs training wall time (`x="wall_s"`: the run's, for its run record)."""
    rows = [r for r in history if "eval_reward" in r]
    fig, ax = plt.subplots(figsize=(5, 3.3))
    ax.plot([r[x] for r in rows], [r["eval_reward"] for r in rows], marker="o", label=method)
    ax.set_xlabel(REWARD_CURVE_X[x])
    ax.set_ylabel("true reward (eval)")
    ax.legend()
    ax.set_title("alignment: true reward on fixed evaluation prompts and seeds", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def alignment_curves(curves: dict[str, list[dict]]) -> bytes:
    """Every trainer on one figure: true reward and GenEval of the fixed evaluation samples vs training wall time
    (`curves`: method -> [{wall_s, eval_reward, geneval}]); the quantity of the paper's claims is the time to reach a
    quality, read off where a curve crosses another's final value."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for method, curve in curves.items():
        for ax, key in zip(axes, ("eval_reward", "geneval")):
            pts = [(r["wall_s"], r[key]) for r in curve if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, linestyle="--" if method.endswith("stitchvm") else "-")
    for ax, label in zip(axes, ("true reward (eval)", "GenEval (evaluator)")):
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("alignment on fixed evaluation prompts and seeds", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def geneval_bars(rows: list[dict]) -> bytes:
    """GenEval per category, one bar per method (`rows`: guidance rows with `geneval_by_category`) and the overall
    value in the legend: where each sampler helps and where it hurts."""
    rows = [r for r in rows if r.get("geneval_by_category")]
    categories = list(rows[0]["geneval_by_category"])
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(categories)), 3.4))
    for k, r in enumerate(rows):
        ax.bar([c + (k - (len(rows) - 1) / 2) * width for c in range(len(categories))],
               [r["geneval_by_category"][c] for c in categories], width,
               label=f"{r['method']} ({r['geneval']:.2f})")
    ax.set_xticks(range(len(categories)), [c.replace("_", " ") for c in categories], fontsize=8)
    ax.set_ylabel("GenEval (evaluator)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("guidance: GenEval per category (overall in the legend)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


# ---- image grids ---------------------------------------------------------------------------------------------------
TILE = 96  # minimum tile size in the grids (small images are enlarged, nearest-neighbour)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(S, 3, H, W) pixels in [-1, 1] -> (S, H, W, 3) uint8 on the CPU."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]], headers: list[str] | None = None) -> bytes:
    """PNG: one row per (label, (S, H, W, 3) uint8 images, (S,) rewards); each tile captioned with its reward,
    each column headed by `headers` (its prompt)."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[1:3]
    scale = max(1, -(-TILE // max(h, w)))
    th, tw = h * scale, w * scale
    label_w, caption_h, pad = 130, 14, 4
    cols = max(len(images) for _, images, _ in rows)
    top = caption_h + pad if headers else 0
    canvas = Image.new("RGB", (label_w + cols * (tw + pad), top + len(rows) * (th + caption_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(headers or []):
        chars = max(4, tw // 6)
        draw.text((label_w + c * (tw + pad) + 2, 1), text if len(text) <= chars else text[:chars - 2] + "..",
                  fill="black")
    for r, (label, images, rewards) in enumerate(rows):
        y = top + r * (th + caption_h + pad)
        draw.text((4, y + th // 2 - 12), label, fill="black")
        draw.text((4, y + th // 2 + 2), f"mean {rewards.mean().item():.4g}", fill="gray")
        for c, (img, value) in enumerate(zip(images, rewards)):
            x = label_w + c * (tw + pad)
            canvas.paste(Image.fromarray(img.numpy()).resize((tw, th), Image.NEAREST), (x, y))
            draw.text((x + 2, y + th + 1), f"{value.item():.3g}", fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def verdict_grid(categories: list[str], prompts: list[str], pixels: torch.Tensor, correct: torch.Tensor,
                 order: tuple[str, ...], columns: int = 8) -> bytes:
    """PNG: one row per category (in `order`), up to `columns` samples each, as many prompts as possible first; each
    tile captioned with the evaluator's verdict (1: the image satisfies its prompt, 0: it does not)."""
    images = to_uint8(pixels)
    rows = []
    for category in order:
        idx = [k for k, c in enumerate(categories) if c == category]
        seen: dict[str, int] = {}
        rank = {}  # a sample's index among its prompt's samples
        for k in idx:
            rank[k] = seen.get(prompts[k], 0)
            seen[prompts[k]] = rank[k] + 1
        idx = sorted(idx, key=lambda k: (rank[k], k))[:columns]
        if idx:
            rows.append((category, images[idx], correct[idx].float()))
    return image_grid(rows)
