"""open_clip rewards (HPSv2, DFN-CLIP, LAION CLIP) as Hugging Face `CLIPModel`s, so they split at block j exactly
like the HF CLIP path (`ClipReward.tokens_entering`, `RewardTail`) and every stage, guidance method and trainer takes
them unchanged.

Why not open-clip-torch itself: `import open_clip` imports torchvision (open_clip/transform.py, utils.py), and
torchvision does not run beside the local CPU torch 2.13.0: the only matching wheel (0.28.0) is built against CUDA
torch, and `import torchvision` dies registering its ops ("operator torchvision::nms does not exist"). open_clip also
requires timm and ftfy. So this module keeps open_clip's *formats* and not its code:

- the architecture by open_clip's name (`ARCHITECTURES`: its model_configs/*.json of open-clip-torch 3.3.0, copied);
- the weights as open_clip saves them (`open_clip.model.CLIP.state_dict()`: a local .safetensors / .bin / .pt file,
  HPSv2's `{"state_dict": ...}` checkpoints, or a hub repo in open_clip's layout);
- OpenAI's BPE tokenizer (open_clip's `SimpleTokenizer`, context 77), built from the BPE file this package ships.

open_clip's ViT CLIP (class-token pooling, `ln_post` on it, `x @ proj`; causal text transformer, `ln_final`, pooling
at the end-of-text token, `x @ text_projection`) is HF's CLIPModel up to names; `hf_state_dict` is the key mapping:

    open_clip                                        HF CLIPModel
    visual.conv1.weight                              vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                           vision_model.embeddings.class_embedding
    visual.positional_embedding                      vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post                   vision_model.pre_layrnorm / vision_model.post_layernorm
    visual.proj (width, E)                           visual_projection.weight (E, width) = proj.T
    token_embedding.weight, positional_embedding     text_model.embeddings.{token,position}_embedding.weight
    ln_final                                         text_model.final_layer_norm
    text_projection (width, E)                       text_projection.weight (E, width) = text_projection.T
    logit_scale                                      logit_scale
    {visual.}transformer.resblocks.k.                {vision,text}_model.encoder.layers.k.
        ln_1, ln_2                                       layer_norm1, layer_norm2
        attn.in_proj_weight / _bias (3W, W) / (3W,)      self_attn.{q,k,v}_proj.weight / .bias: rows [0:W], [W:2W], [2W:]
        attn.out_proj                                    self_attn.out_proj
        mlp.c_fc, mlp.c_proj                             mlp.fc1, mlp.fc2

Activation: nn.GELU (erf) unless the config says `quick_gelu` (OpenAI's and DFN's checkpoints: the `-quickgelu`
names). The mapping is exact (tests/test_open_clip.py compares the converted model with a direct implementation of
open_clip's forward on the open_clip state dict, and with open_clip itself where it is installed).
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from stitchvm.models.backbone import seeded
from stitchvm.models.tokenizers import BOS, EOS, byte_level_vocab

SCHEME = "open_clip:"
# open-clip-torch 3.3.0, model_configs/<name>.json (the ViT CLIPs with OpenAI's tokenizer); `-quickgelu` variants
# are derived in `architecture`. HPSv2 / HPSv2.1: ViT-H-14; DFN5B-CLIP: ViT-H-14-quickgelu (ViT-H-14-378-quickgelu).
_VIT = lambda image_size, layers, width, patch_size, head_width=64, mlp_ratio=4.0: dict(  # noqa: E731
    image_size=image_size, layers=layers, width=width, patch_size=patch_size, head_width=head_width,
    mlp_ratio=mlp_ratio)
_TEXT = lambda width, heads, layers: dict(context_length=77, vocab_size=49408, width=width, heads=heads,  # noqa: E731
                                          layers=layers)
ARCHITECTURES = {
    "ViT-B-32": dict(embed_dim=512, vision_cfg=_VIT(224, 12, 768, 32), text_cfg=_TEXT(512, 8, 12)),
    "ViT-B-16": dict(embed_dim=512, vision_cfg=_VIT(224, 12, 768, 16), text_cfg=_TEXT(512, 8, 12)),
    "ViT-L-14": dict(embed_dim=768, vision_cfg=_VIT(224, 24, 1024, 14), text_cfg=_TEXT(768, 12, 12)),
    "ViT-L-14-336": dict(embed_dim=768, vision_cfg=_VIT(336, 24, 1024, 14), text_cfg=_TEXT(768, 12, 12)),
    "ViT-H-14": dict(embed_dim=1024, vision_cfg=_VIT(224, 32, 1280, 14, 80), text_cfg=_TEXT(1024, 16, 24)),
    "ViT-H-14-378": dict(embed_dim=1024, vision_cfg=_VIT(378, 32, 1280, 14, 80), text_cfg=_TEXT(1024, 16, 24)),
    "ViT-bigG-14": dict(embed_dim=1280, vision_cfg=_VIT(224, 48, 1664, 14, 104, 4.9231),
                        text_cfg=_TEXT(1280, 20, 32)),
}
# the file names open_clip's hub layout uses (open_clip/pretrained.py), preferred first
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_BPE = Path(__file__).resolve().parents[1] / "world" / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def is_open_clip(source: str) -> bool:
    return source.startswith(SCHEME)


def parse_source(source: str) -> tuple[str, str]:
    """`open_clip:<architecture>@<weights>` -> (architecture, weights). The architecture: open_clip's name or a
    config .json; the weights: a local file, `org/repo/file` on the hub, or `org/repo` in open_clip's hub layout."""
    arch, at, weights = source[len(SCHEME):].partition("@")
    if not at or not weights:
        raise ValueError(f"reward.source {source!r}: an open_clip source is open_clip:<architecture>@<weights> "
                         f"(e.g. open_clip:ViT-H-14@xswu/HPSv2/HPS_v2.1_compressed.pt)")
    architecture(arch)
    return arch, weights


def architecture(name: str) -> dict:
    """open_clip's configuration of `name` (`<base>-quickgelu` sets quick_gelu on `<base>`), or of a model config
    file in open_clip's JSON format (`<name>.json`: a variant such as HPSv2's own copy of ViT-H-14.json)."""
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward.source: open_clip model config {path} does not exist")
        cfg = json.loads(path.read_text())
        if "timm_model_name" in cfg.get("vision_cfg", {}) or "hf_model_name" in cfg.get("text_cfg", {}):
            raise ValueError(f"{path}: only open_clip's ViT CLIPs (no timm / HF towers) convert to CLIPModel")
        cfg["vision_cfg"] = {"head_width": 64, "mlp_ratio": 4.0, **cfg["vision_cfg"]}
        return {"quick_gelu": False, **cfg}
    base = name.removesuffix("-quickgelu")
    if base not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown open_clip architecture {name!r} (known: {known}, each also with -quickgelu)")
    return {**ARCHITECTURES[base], "quick_gelu": name.endswith("-quickgelu")}


def clip_config(cfg: dict, bos_token_id: int, eos_token_id: int) -> CLIPConfig:
    """The HF `CLIPConfig` of an open_clip configuration (`vision_cfg`, `text_cfg`, `embed_dim`, `quick_gelu`).
    `eos_token_id` must be the tokenizer's end-of-text id, the largest id: open_clip pools the text at argmax(ids),
    HF at the first eos, the same position only then."""
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    if eos_token_id != text["vocab_size"] - 1:
        raise ValueError(f"open_clip pools the text at the largest token id; the end-of-text id {eos_token_id} is not "
                         f"the last of the vocabulary ({text['vocab_size']})")
    return CLIPConfig(
        text_config=dict(
            vocab_size=text["vocab_size"], hidden_size=text["width"], num_attention_heads=text["heads"],
            intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)), num_hidden_layers=text["layers"],
            max_position_embeddings=text["context_length"], hidden_act=act, layer_norm_eps=1e-5,
            projection_dim=cfg["embed_dim"], bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=vision["width"], num_attention_heads=vision["width"] // vision["head_width"],
            intermediate_size=int(vision["width"] * vision["mlp_ratio"]), num_hidden_layers=vision["layers"],
            image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act=act, layer_norm_eps=1e-5,
            projection_dim=cfg["embed_dim"],
        ),
        projection_dim=cfg["embed_dim"],
    )


def open_clip_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of `open_clip.model.CLIP(**cfg).state_dict()` and its shape (a ViT CLIP, no buffers)."""
    vision, text, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, p = vision["width"], text["width"], vision["patch_size"]
    patches = (vision["image_size"] // p) ** 2

    def blocks(prefix: str, width: int, layers: int, hidden: int) -> dict:
        out = {}
        for k in range(layers):
            b = f"{prefix}transformer.resblocks.{k}."
            out.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
                        b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                        b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                        b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
                        b + "mlp.c_fc.weight": (hidden, width), b + "mlp.c_fc.bias": (hidden,),
                        b + "mlp.c_proj.weight": (width, hidden), b + "mlp.c_proj.bias": (width,)})
        return out

    return {
        "positional_embedding": (text["context_length"], tw), "text_projection": (tw, e), "logit_scale": (),
        "visual.class_embedding": (vw,), "visual.positional_embedding": (1 + patches, vw), "visual.proj": (vw, e),
        "visual.conv1.weight": (vw, 3, p, p), "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
        **blocks("visual.", vw, vision["layers"], int(vw * vision["mlp_ratio"])),
        "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,),
        **blocks("", tw, text["layers"], int(tw * text.get("mlp_ratio", 4.0))),
        "token_embedding.weight": (text["vocab_size"], tw), "ln_final.weight": (tw,), "ln_final.bias": (tw,),
    }


def hf_state_dict(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict -> the HF CLIPModel state dict (module docstring: the mapping)."""
    expected = open_clip_shapes(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k != "attn_mask"]  # attn_mask: a buffer in old versions
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}" if unexpected else
                f"{wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, not {expected[wrong[0]]}")
        raise ValueError(f"the weights do not fit open_clip architecture with {cfg['vision_cfg']['layers']} vision "
                         f"blocks of width {cfg['vision_cfg']['width']}: {what} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(wrong)} of another shape); check the architecture name")
    out = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "visual_projection.weight": state["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_projection.weight": state["text_projection"].T,
        "logit_scale": state["logit_scale"],
    }
    for oc, hf in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                   ("ln_final", "text_model.final_layer_norm")):
        out[hf + ".weight"], out[hf + ".bias"] = state[oc + ".weight"], state[oc + ".bias"]
    for oc, hf, layers in (("visual.", "vision_model.", cfg["vision_cfg"]["layers"]),
                           ("", "text_model.", cfg["text_cfg"]["layers"])):
        for k in range(layers):
            out.update(_block(state, f"{oc}transformer.resblocks.{k}.", f"{hf}encoder.layers.{k}."))
    return {k: v.contiguous() for k, v in out.items()}


def _block(state: dict, oc: str, hf: str) -> dict[str, torch.Tensor]:
    """One residual attention block: nn.MultiheadAttention's packed q/k/v rows split into HF's three projections."""
    q_w, k_w, v_w = state[oc + "attn.in_proj_weight"].chunk(3, dim=0)  # each (W, W)
    q_b, k_b, v_b = state[oc + "attn.in_proj_bias"].chunk(3, dim=0)  # each (W,)
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    out = {f"{hf}self_attn.q_proj.weight": q_w, f"{hf}self_attn.q_proj.bias": q_b,
           f"{hf}self_attn.k_proj.weight": k_w, f"{hf}self_attn.k_proj.bias": k_b,
           f"{hf}self_attn.v_proj.weight": v_w, f"{hf}self_attn.v_proj.bias": v_b}
    for a, b in names.items():
        out[f"{hf}{b}.weight"], out[f"{hf}{b}.bias"] = state[f"{oc}{a}.weight"], state[f"{oc}{a}.bias"]
    return out


def random_open_clip_state(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """A seeded random state dict in open_clip's layout (the tiny preset: every stage test runs the converter).
    Matrices with std 1/sqrt(fan_in) (as `fan_in_init_`, so a tiny reward depends on its input), norms near 1,
    biases and embeddings small, logit scale log(1/0.07) as open_clip initialises it."""
    out = {}
    with seeded(seed):
        for name, shape in open_clip_shapes(cfg).items():
            if name == "logit_scale":
                out[name] = torch.tensor(1 / 0.07).log()
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                out[name] = 1 + 0.1 * torch.randn(shape)
            elif len(shape) == 1 or "embedding" in name:
                out[name] = 0.1 * torch.randn(shape)
            else:
                fan_in = shape[0] if name in ("visual.proj", "text_projection") else int(torch.tensor(shape[1:]).prod())
                out[name] = torch.randn(shape) / fan_in ** 0.5
    return out


def read_open_clip_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint file: safetensors, or a torch file holding the state dict or `{"state_dict": ...}`
    (HPSv2, open_clip's training checkpoints); a `module.` prefix (DDP) is dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def weights_file(weights: str) -> Path:
    """A local file, `org/repo/path/in/repo` on the hub, or `org/repo` in open_clip's hub layout -> a local file.
    hf_hub_download raises OSError subclasses for a missing repo or file (`sources.loading` makes them one line)."""
    local = Path(weights).expanduser()
    if local.is_file():
        return local
    if weights.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"reward.source: open_clip weights file {weights} does not exist")
    parts = weights.split("/")
    if len(parts) > 2:
        return _hub_file("/".join(parts[:2]), "/".join(parts[2:]))
    for k, name in enumerate(HUB_WEIGHT_FILES):
        try:
            return _hub_file(weights, name)
        except OSError:
            if k == len(HUB_WEIGHT_FILES) - 1:
                raise


def _hub_file(repo: str, name: str) -> Path:
    """hf_hub_download, its "not in the offline cache" (a FileNotFoundError, which `sources.loading` passes through
    whole) made an OSError naming the file, so that the failure is one line."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name))
    except FileNotFoundError as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OSError(f"{repo}/{name}: {first}") from None


@lru_cache(maxsize=1)
def _openai_merges() -> tuple[tuple[str, str], ...]:
    lines = gzip.open(OPENAI_BPE).read().decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1])  # as open_clip's SimpleTokenizer


def openai_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """open_clip's default tokenizer (OpenAI's BPE, 49408 ids, end-of-text 49407 also as padding) as a CLIPTokenizer.
    (stitchvm/world/caption_tokenizer.py builds the same from the same file; models/ may not import world/.)"""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _openai_merges()] + [BOS, EOS]
    return CLIPTokenizer(vocab={t: k for k, t in enumerate(tokens)}, merges=list(_openai_merges()),
                         model_max_length=max_length)


def tiny_config(open_cfg: dict) -> CLIPConfig:
    """The HF config of a tiny open_clip preset (its text tower sized for the offline byte-level tokenizer)."""
    vocab = byte_level_vocab()
    if open_cfg["text_cfg"]["vocab_size"] != len(vocab):
        raise ValueError(f"a tiny open_clip preset needs text vocab_size {len(vocab)} (the byte-level tokenizer)")
    return clip_config(open_cfg, vocab[BOS], vocab[EOS])


def build_open_clip(source: str, dtype: torch.dtype, device) -> tuple[CLIPModel, CLIPTokenizer]:
    """`open_clip:<architecture>@<weights>` -> (CLIPModel with the converted weights, OpenAI's tokenizer)."""
    arch, weights = parse_source(source)
    cfg = architecture(arch)
    tokenizer = openai_tokenizer(cfg["text_cfg"]["context_length"])
    state = hf_state_dict(read_open_clip_weights(weights_file(weights)), cfg)
    # built with its random init and then overwritten: a meta build with assign=True would leave HF's non-persistent
    # position_ids buffers on meta
    with torch.device(device):
        clip = CLIPModel(clip_config(cfg, tokenizer.bos_token_id, tokenizer.eos_token_id))
    clip.load_state_dict(state, strict=True)
    return clip.to(dtype).eval(), tokenizer


def build_open_clip_preset(preset: dict, seed: int, device) -> CLIPModel:
    """A preset with an `open_clip` configuration: tiny (`random_weights`) ones go through the converter from a
    seeded random open_clip state dict; arch ones are the real configuration with HF's random init (counting)."""
    cfg = preset["open_clip"]
    cfg = architecture(cfg) if isinstance(cfg, str) else cfg
    if preset.get("random_weights") == "open_clip":
        with seeded(seed):  # HF's init draws too (then overwritten): keep the caller's RNG untouched
            clip = CLIPModel(tiny_config(cfg))
        clip.load_state_dict(hf_state_dict(random_open_clip_state(cfg, seed), cfg), strict=True)
        return clip.to(device)
    tokenizer_ids = (49406, 49407)  # OpenAI's BPE: BOS, EOS
    with seeded(seed), torch.device(device):
        return CLIPModel(clip_config(cfg, *tokenizer_ids))
