from pathlib import Path

import pytest

from stitchvm.config import ConfigError, Params, from_dict, load_params, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_round_trip():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert from_dict(Params, to_dict(params)) == params


@pytest.mark.parametrize("data, message", [
    ({"train": {"stesp": 3}}, "train.stesp: unknown key"),
    ({"train": {"lr": "fast"}}, "train.lr: expected float, got str"),
    ({"train": {"steps": 1.5}}, "train.steps: expected int"),
    ({"train": {"steps": True}}, "train.steps: expected int, got bool"),
    ({"train": {"lr": -1.0}}, "train: lr must be > 0"),
    ({"train": {"residual_kernel": 2}}, "train: residual_kernel must be an odd integer >= 1, got 2"),
    ({"train": {"fit": {"steps": -1}}}, "train.fit: steps must be >= 0 (0 turns the token fit off), got -1"),
    ({"train": {"fit": {"stpes": 1}}}, "train.fit.stpes: unknown key"),
    ({"noisy": {"sigmas": [0.5, 1.5]}}, "noisy: sigmas must lie in [0, 1]"),
    ({"noisy": {"sigmas": 0.5}}, "noisy.sigmas: expected a list"),
    ({"evaluate": {"gate_sigma": 0.3}}, "<root>: evaluate.gate_sigma 0.3 is not one of noisy.sigmas"),
    ({"evaluate": {"mc_rollouts": 4, "mc_sigmas": [0.5, 0.6]}}, "evaluate.mc_sigmas [0.5, 0.6] are not all among"),
    ({"evaluate": {"mc_rollouts": -1}}, "evaluate: mc_rollouts must be >= 0"),
    ({"samples": {"source": "dalle"}}, "samples: source 'dalle' is not 'pipeline', 'images' or 'smooth'"),
    ({"samples": {"source": "images"}}, "samples: source 'images' needs image_folder"),
    ({"storage": {"options": [1]}}, "storage.options: expected dict, got list"),
    ({"reward": {"kind": "hps"}}, "reward: kind 'hps' is not 'clip' or 'aesthetic'"),
    ({"search": {"upsample": "nearest"}}, "search: upsample 'nearest' is not bilinear/subpixel"),
    ({"search": {"context": "text"}}, "search: context 'text' is not empty/prompt"),
    ({"search": {"kernel": 2}}, "search: kernel must be an odd integer >= 1 (a centred neighbourhood), got 2"),
    ({"reward": {"kind": "aesthetic"}}, "reward: kind 'aesthetic' needs a head"),
    ({"backbone": "tiny:sd3"}, "backbone: expected a mapping"),
])
def test_bad_params_name_the_key_and_reason(tmp_path, data, message):
    import yaml
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert message in str(e.value)
    assert str(f) in str(e.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_ints_are_accepted_for_floats():
    assert from_dict(Params, {"train": {"lr": 1}}).train.lr == 1.0
