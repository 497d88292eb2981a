"""Expected failures of the command line end in one line naming the key, file or shard, with exit status 2 (bad
params or arguments) or 1 (a stage's missing input), and write nothing."""
import re
from pathlib import Path

import pytest
import yaml

from stitchvm.__main__ import main

GOOD = {"storage": {"root": "data"}, "prompts": {"train": 2, "val": 0, "test": 2},
        "samples": {"source": "smooth", "per_prompt": 4}}


def params_file(tmp_path: Path, text: str | None = None, **changes) -> str:
    path = tmp_path / "params.yaml"
    data = {**GOOD, **changes, "storage": {"root": str(tmp_path / "data")}}
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return str(path)


CASES = [  # (id, arguments given the params file, file text or changes, exit status, the one-line message)
    ("missing params file", lambda f: ["--params", f + ".nope", "prompts"], {}, 2, r"params file .*\.nope does not exist"),
    ("broken YAML", lambda f: ["--params", f, "prompts"], "train: {steps: 3\nseed: 0\n", 2,
     r"is not valid YAML at line \d+, column \d+"),
    ("not a mapping", lambda f: ["--params", f, "prompts"], "- 1\n- 2\n", 2, r"<root>: expected a mapping"),
    ("unknown key", lambda f: ["--params", f, "prompts"], {"train": {"stpes": 3}}, 2, r"train\.stpes: unknown key"),
    ("wrong type", lambda f: ["--params", f, "prompts"], {"train": {"steps": "many"}}, 2, r"train\.steps"),
    ("mistyped backbone source", lambda f: ["--params", f, "prompts"], {"backbone": {"source": "wrld:sd3"}}, 2,
     r"backbone: source 'wrld:sd3' is not a model source"),
    ("mistyped reward source", lambda f: ["--params", f, "prompts"], {"reward": {"source": "tiyn:clip"}}, 2,
     r"reward: source 'tiyn:clip' is not a model source"),
    ("hub id not cached, offline", lambda f: ["--params", f, "prompts"],
     {"backbone": {"source": "nobody/no-such-model"}}, 2,
     r"backbone: source 'nobody/no-such-model' is neither a local folder nor in the Hugging Face cache"),
    ("shard out of range", lambda f: ["--params", f, "samples", "--shards", "999"], {}, 1,
     r"shard 999 does not exist: the set has shards 0\.\.0"),
    ("negative shard", lambda f: ["--params", f, "samples", "--shards=-1"], {}, 2, r"shard numbers >= 0"),
    ("shard not a number", lambda f: ["--params", f, "labels", "--shards", "x"], {}, 2,
     r"comma-separated shard numbers, got 'x'"),
    ("stage before its input", lambda f: ["--params", f, "samples"], {}, 1,
     r"prompts\.parquet does not exist: run the `prompts` stage first"),
    ("more prompts than the built-in split has", lambda f: ["--params", f, "prompts"],
     {"prompts": {"source": "builtin", "train": 2, "val": 99, "test": 1}}, 1,
     r"prompts\.val is 99, the built-in set has 12 val prompts"),
]


@pytest.mark.parametrize("args, content, status, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, content, status, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("STITCHVM_THREADS", raising=False)
    monkeypatch.chdir(tmp_path)
    f = params_file(tmp_path, content) if isinstance(content, str) else params_file(tmp_path, **content)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:  # argparse exits; main's own failures are returned
        raise SystemExit(main(args(f)))
    assert exit_.value.code == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err and re.search(message, err[-1]), err
    last = [line for line in err if line.startswith("stitchvm")]
    assert len(last) == 1, err  # one message line (argparse adds its usage lines above it)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_good_params_pass_the_same_checks(tmp_path, monkeypatch, capsys):
    """The checks refuse only what is wrong: the same file with the mistakes fixed runs the stage."""
    monkeypatch.chdir(tmp_path)
    assert main(["--params", params_file(tmp_path), "--no-progress", "prompts"]) == 0
    assert (tmp_path / "data" / "prompts.parquet").is_file()


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_named(tmp_path, monkeypatch, capsys, value):
    monkeypatch.setenv("STITCHVM_THREADS", value)
    monkeypatch.chdir(tmp_path)
    assert main(["--params", params_file(tmp_path), "prompts"]) == 1
    assert capsys.readouterr().err.strip() == (f"stitchvm prompts: STITCHVM_THREADS={value!r}: expected a positive "
                                               f"integer (torch threads per stage)")
    assert not (tmp_path / "data").exists()


def test_stage_threads_share_the_cores(monkeypatch):
    import os

    import torch

    from stitchvm.stages.runtime import set_stage_threads, stage_threads

    monkeypatch.delenv("STITCHVM_THREADS", raising=False)
    cores = os.cpu_count()
    assert stage_threads(1) == cores and stage_threads(2) == max(1, cores // 2) and stage_threads(10 * cores) == 1
    monkeypatch.setenv("STITCHVM_THREADS", "3")
    before = torch.get_num_threads()
    try:
        assert stage_threads(2) == 3 and set_stage_threads() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
