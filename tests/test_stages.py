"""The pipeline stages as both front-ends call them: storage round trips, skips, determinism, missing inputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stitchvm.config import from_dict, Params
from stitchvm.stages import VALUE_PIPELINE, stage
from stitchvm.stages.runtime import Paths
from stitchvm.stages.upstream import EVAL, PROBE, noisy_shards, num_shards
from stitchvm.data.storage import index_parts, open_root, read_shards, shard_index_name

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "prompts": {"train": 2, "val": 0, "test": 2},
    "samples": {"source": "smooth", "per_prompt": 6},
    "storage": {"shard_size": 5},
    "noisy": {"probe_size": 8, "sigmas": [0.25, 0.5]},
    "search": {"j_max": 2, "batch_size": 8},
    "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 3,
              "residual_width": 8, "residual_kernel": 3, "fit": {"steps": 3, "batch_size": 4}},
    "evaluate": {"batch_size": 8, "gate_sigma": 0.5},
}


def small_params(root: str, options: dict | None = None, **overrides) -> Params:
    data = {**SMALL, "storage": {**SMALL["storage"], "root": root, "options": options}, **overrides}
    return from_dict(Params, data)


def run_all(params: Params, tmp: Path) -> dict:
    paths = Paths.from_params(params, reports=tmp / "reports", checkpoints=tmp / "ckpt", track=False)
    return {name: stage(name).run(params, paths, progress=False) for name in VALUE_PIPELINE}


@pytest.mark.e2e
def test_full_stage_round_trip_on_s3_matches_local(s3_options, tmp_path):
    local = small_params(str(tmp_path / "data"))
    remote = small_params("s3://bucket/stages", s3_options)
    out_local = run_all(local, tmp_path / "l")
    out_remote = run_all(remote, tmp_path / "r")
    assert out_remote["search"]["pair"] == out_local["search"]["pair"]
    assert out_remote["evaluate"]["eval"][0]["spearman"] == pytest.approx(out_local["evaluate"]["eval"][0]["spearman"])
    s3 = open_root("s3://bucket/stages", s3_options)
    lat_s3, idx_s3 = read_shards(s3, "samples", progress=False, expected_shards=num_shards(remote))
    lat, idx = read_shards(open_root(str(tmp_path / "data")), "samples", progress=False)
    assert torch.equal(lat_s3["latents"], lat["latents"]) and idx_s3.equals(idx)  # byte-identical across backends
    assert s3.exists("value_model/model.safetensors") and s3.exists("search/heatmap.png")
    report = json.loads((tmp_path / "r" / "reports" / "eval.json").read_text())
    assert {(r["sigma"], r["method"]) for r in report["eval"]} == {
        (s, m) for s in (0.25, 0.5) for m in ("stitchvm", "tweedie")}
    assert set(report["gate"]["checks"]) == {"spearman_within_prompt", "loss_below_trivial"}


def test_samples_skip_complete_shards_and_redo_damaged_ones(tmp_path):
    params = small_params(str(tmp_path / "data"))
    paths = Paths.from_params(params, track=False)
    stage("prompts").run(params, paths)
    first = stage("samples").run(params, paths, progress=False)
    assert first["written"] == list(range(num_shards(params))) == [0, 1, 2, 3, 4]
    assert stage("samples").run(params, paths, progress=False)["written"] == []
    shard = tmp_path / "data" / "samples" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    assert stage("samples").run(params, paths, progress=False)["written"] == [2]


def test_changed_params_rewrite_stale_samples_and_labels(tmp_path, caplog):
    """A shard counts as written only when the params and inputs that made it are today's: after `samples.steps`
    changes, every samples shard and (its input changed) every labels shard is written again, with a log line
    saying why, and the result equals a fresh run at the new params."""
    def params_at(root: Path, steps: int) -> Params:
        return small_params(str(root), samples={"source": "pipeline", "per_prompt": 2, "steps": steps},
                            storage={"root": str(root), "shard_size": 3})

    def run_stages(params: Params) -> tuple[dict, dict]:
        paths = Paths.from_params(params, track=False)
        stage("prompts").run(params, paths)
        return (stage("samples").run(params, paths, progress=False), stage("labels").run(params, paths, progress=False))

    shared = tmp_path / "shared"
    samples, labels = run_stages(params_at(shared, 2))
    every = list(range(num_shards(params_at(shared, 2))))
    assert samples["written"] == labels["written"] == every and samples["rewritten"] == labels["rewritten"] == {}
    with caplog.at_level("WARNING"):
        samples, labels = run_stages(params_at(shared, 3))
    assert samples["written"] == labels["written"] == every
    assert set(samples["rewritten"]) == set(labels["rewritten"]) == set(every)
    assert all("made by other params or inputs" in why for why in [*samples["rewritten"].values(),
                                                                    *labels["rewritten"].values()])
    assert sum("writing shard" in r.getMessage() for r in caplog.records) == 2 * len(every)
    assert run_stages(params_at(shared, 3))[0]["written"] == []  # up to date now
    run_stages(params_at(tmp_path / "fresh", 3))
    for name in ("samples", "labels"):
        got = read_shards(open_root(str(shared)), name, progress=False)
        want = read_shards(open_root(str(tmp_path / "fresh")), name, progress=False)
        assert got[0].keys() == want[0].keys()
        assert all(torch.equal(got[0][k], want[0][k]) for k in got[0])


def test_pipeline_samples_do_not_depend_on_sharding(tmp_path):
    """One seeded generator per sample: the same sample comes out whatever the shard size or batch."""
    latents = []
    for size, batch in ((3, 2), (8, 5)):
        params = small_params(str(tmp_path / f"data{size}"), samples={"source": "pipeline", "per_prompt": 2,
                                                                        "steps": 2, "batch_size": batch},
                              storage={"root": str(tmp_path / f"data{size}"), "shard_size": size})
        paths = Paths.from_params(params, track=False)
        stage("prompts").run(params, paths)
        stage("samples").run(params, paths, progress=False)
        latents.append(read_shards(paths.storage(), "samples", progress=False)[0]["latents"])
    assert latents[0].shape == (8, 4, 16, 16) and latents[0].std() > 0.1
    assert torch.allclose(latents[0], latents[1], atol=1e-5)


def test_missing_upstream_names_the_stage_to_run(tmp_path):
    params = small_params(str(tmp_path / "data"))
    paths = Paths.from_params(params, track=False)
    with pytest.raises(FileNotFoundError, match=r"prompts.parquet does not exist: run the `prompts` stage first"):
        stage("samples").run(params, paths, progress=False)
    stage("prompts").run(params, paths)
    with pytest.raises(FileNotFoundError, match=r"run the `samples` stage first"):
        stage("noisy").run(params, paths, progress=False)


def test_a_noisy_set_left_short_is_refused_by_its_readers(tmp_path):
    """A killed `noisy` run leaves fewer shards than params make (write_shards prunes extra shards first): search and
    evaluate must fail naming the missing shard rather than read a short set."""
    params = small_params(str(tmp_path / "data"))
    paths = Paths.from_params(params, reports=tmp_path / "reports", checkpoints=tmp_path / "ckpt", track=False)
    for name in ("prompts", "samples", "labels", "noisy", "search", "train"):
        stage(name).run(params, paths, progress=False)
    storage = paths.storage()
    expected = noisy_shards(params)
    # 2 train prompts × 6 = 12 train samples, probe 8 → 2 shards of 5; 2 test prompts × 6 × 2 σ = 24 rows → 5 shards
    assert expected == {PROBE: 2, EVAL: 5}
    assert {name: len(index_parts(storage, name)) for name in expected} == expected
    for name, reader in ((PROBE, "search"), (EVAL, "evaluate")):
        storage.remove(shard_index_name(name, expected[name] - 1))
        with pytest.raises(FileNotFoundError, match=rf"shard\(s\) {expected[name] - 1} of {expected[name]}"):
            stage(reader).run(params, paths, progress=False)


def test_truth_stores_each_noisy_test_latents_monte_carlo_value_for_evaluate(tmp_path):
    """The `truth` stage's values are monte_carlo_value's on the stored noisy latents under each latent's own prompt
    (recomputed here from the samples' rows); a re-run with the same inputs keeps them; the readers refuse a truth
    made for other params, other latents or other noise."""
    from stitchvm.stages.runtime import models
    from stitchvm.stages.upstream import read_noisy_eval, read_split, read_truth
    from stitchvm.value.monte_carlo import monte_carlo_value

    evaluate = {**SMALL["evaluate"], "mc_rollouts": 2, "mc_sigmas": [0.5, 0.25]}
    params = small_params(str(tmp_path / "data"), evaluate=evaluate)
    paths = Paths.from_params(params, reports=tmp_path / "reports", track=False)
    for name in ("prompts", "samples", "noisy"):
        stage(name).run(params, paths, progress=False)
    storage = paths.storage()
    noisy, ids = read_noisy_eval(storage, params)
    _, test_rows = read_split(storage, params, "test")
    prompt_of = dict(zip(test_rows.column("sample_id").to_pylist(), test_rows.column("prompt").to_pylist()))
    prompts = [prompt_of[i] for i in ids]
    with pytest.raises(FileNotFoundError, match=r"truth/summary.json does not exist: run the `truth` stage first"):
        read_truth(storage, params, noisy, prompts, ids)
    out = stage("truth").run(params, paths, progress=False)
    assert out["latents"] == len(ids) == 12 and out["sigmas"] == [0.5, 0.25] and not out["reused"]
    assert json.loads((tmp_path / "reports" / "runs" / "truth.json").read_text())["seconds"] == out["seconds"] > 0

    backbone, reward = models(params)
    gen = torch.Generator().manual_seed(params.seed)  # one generator, σ after σ in mc_sigmas' order
    want = {s: monte_carlo_value(backbone, reward, noisy[s], s, prompts, 2, params.samples.steps,
                                 params.samples.guidance_scale, gen, params.evaluate.batch_size) for s in (0.5, 0.25)}
    got = read_truth(storage, params, noisy, prompts, ids)
    assert list(got) == [0.5, 0.25] and all(torch.equal(got[s], want[s]) for s in want)
    assert out["mean_value"]["sigma_0.5"] == pytest.approx(want[0.5].mean().item())
    again = stage("truth").run(params, paths, progress=False)  # the same inputs: the stored truth is kept
    assert again["reused"] and again["mean_value"] == pytest.approx(out["mean_value"])

    other = small_params(str(tmp_path / "data"), evaluate={**evaluate, "mc_rollouts": 4})
    with pytest.raises(ValueError, match=r"holds 2 rollouts at σ \[0.25, 0.5\], params ask for 4.*re-run `truth`"):
        read_truth(storage, other, noisy, prompts, ids)
    with pytest.raises(ValueError, match="other latents than the test set's"):
        read_truth(storage, params, noisy, prompts, ids[::-1])
    moved = {s: z + 1e-3 for s, z in noisy.items()}  # other noise under the same ids
    with pytest.raises(ValueError, match="other models, seed, sampler or noisy latents.*re-run `truth`"):
        read_truth(storage, params, moved, prompts, ids)
    resampled = small_params(str(tmp_path / "data"), evaluate=evaluate, seed=1)
    with pytest.raises(ValueError, match="other models, seed, sampler or noisy latents"):
        read_truth(storage, resampled, noisy, prompts, ids)
    off = small_params(str(tmp_path / "data"), evaluate={**evaluate, "mc_rollouts": 0})
    assert read_truth(storage, off, noisy, prompts, ids) == {}  # no Monte Carlo value asked: nothing read


def test_train_fits_the_stitch_keeps_the_fit_for_a_resume_and_saves_g(tmp_path):
    """Stage 1b inside `train`: its result is kept in the checkpoint folder, and a run that finds it (a resume after a
    kill) takes it instead of fitting again; the summary reports the fit and the saved model carries G's shape."""
    from stitchvm.stages.runtime import models
    from stitchvm.stages.train import fitted_stitch
    from stitchvm.stages.upstream import TRAIN_SUMMARY, VALUE_MODEL, read_search
    from stitchvm.value.search import stitched_from_search

    params = small_params(str(tmp_path / "data"))
    paths = Paths.from_params(params, reports=tmp_path / "reports", checkpoints=tmp_path / "ckpt", track=False)
    for name in ("prompts", "samples", "labels", "noisy", "search"):
        stage(name).run(params, paths, progress=False)
    backbone, reward = models(params)
    fresh = lambda: stitched_from_search(backbone, reward, read_search(paths.storage()), 8, 3)  # noqa: E731
    first, ckpt = fresh(), tmp_path / "ckpt" / "fit-test"
    history = fitted_stitch(first, backbone, params, paths, ckpt, progress=False)
    assert [r["step"] for r in history] == [1, 2, 3] and (ckpt / "fit" / "stitch.safetensors").is_file()
    resumed = fresh()
    assert fitted_stitch(resumed, backbone, params, paths, ckpt, progress=False) == history
    assert all(torch.equal(a, b) for a, b in zip(resumed.stitch.state_dict().values(),
                                                 first.stitch.state_dict().values()))
    assert not torch.equal(fresh().stitch.proj.weight, first.stitch.proj.weight)  # the fit did move it

    stage("train").run(params, paths, progress=False)
    storage = paths.storage()
    summary = storage.read_json(TRAIN_SUMMARY)
    assert summary["fit"]["steps"] == 3 and summary["fit"]["final_error"] > 0
    config = json.loads(storage.read_bytes(f"{VALUE_MODEL}/config.json"))
    assert config["residual"] == {"width": 8, "kernel": 3}


def test_the_fits_final_error_is_the_mean_of_its_last_steps():
    from stitchvm.stages.train import FINAL_WINDOW, final_error

    fit = [{"step": k + 1, "fit_error": float(k)} for k in range(FINAL_WINDOW + 50)]
    assert final_error(fit) == sum(range(50, FINAL_WINDOW + 50)) / FINAL_WINDOW  # the first 50 steps left out
    assert final_error(fit[:3]) == 1.0 and final_error([]) is None  # a short fit: all of its steps


def test_cli_reports_a_missing_upstream_output(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**SMALL, "storage": {"root": str(tmp_path / "data")}}))
    run = subprocess.run([sys.executable, "-m", "stitchvm", "--params", str(params), "search"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "stitchvm search:" in run.stderr and "run the `noisy` stage first" in run.stderr


def test_prompt_sources_and_splits(tmp_path):
    from stitchvm.stages.prompts import read_source, split_prompts
    from stitchvm.world.prompt_set import CATEGORIES

    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\na dog\na cat\na bird\n")
    assert [r["prompt"] for r in read_source(str(txt))] == ["a cat", "a dog", "a bird"]
    table = split_prompts(read_source(str(txt)), 1, 1, 1, seed=0)
    assert table.column("category").to_pylist() == ["custom"] * 3 and table.column("spec").null_count == 3
    # the built-in set keeps its own splits and spreads each split over the categories
    builtin = read_source("builtin")
    table = split_prompts(builtin, 12, 2, 6, seed=0)
    assert table.column("split").to_pylist() == ["train"] * 12 + ["val"] * 2 + ["test"] * 6
    split_of = {r["prompt"]: r["split"] for r in builtin}
    assert all(split_of[p] == s for p, s in zip(table.column("prompt").to_pylist(), table.column("split").to_pylist()))
    train_categories = table.column("category").to_pylist()[:12]
    assert set(train_categories) == set(CATEGORIES)  # round-robin: every category before any twice
    specs = [json.loads(s) for s in table.column("spec").to_pylist()]
    assert all(len(s["groups"]) in (1, 2) for s in specs)
    assert table.equals(split_prompts(builtin, 12, 2, 6, seed=0))
    assert not table.equals(split_prompts(builtin, 12, 2, 6, seed=1))
    with pytest.raises(ValueError, match="prompts.val is 99, the built-in set has 12 val prompts"):
        split_prompts(builtin, 1, 99, 1, seed=0)
    single = split_prompts(read_source("builtin:single"), 3, 1, 2, seed=0)
    assert single.num_rows == 6 and set(single.column("category").to_pylist()) == {"colors"}
    with pytest.raises(ValueError, match="has 3 unique prompts, the splits need 4"):
        split_prompts(read_source(str(txt)), 2, 1, 1, seed=0)
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_source(str(tmp_path / "nope.txt"))


def test_image_folder_source(tmp_path, backbone):
    """An imagefolder-layout folder serves as the prompt source and, VAE-encoded, as the clean latents."""
    import numpy as np
    from PIL import Image

    from stitchvm.data.image_folder import load_image

    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for k, (text, colour) in enumerate([("a red square", (200, 30, 30)), ("a blue square", (30, 30, 200))]):
        for m in range(3):
            img = np.zeros((40, 48, 3), np.uint8)
            img[5 + 3 * m:25, 8:30] = colour
            Image.fromarray(img).save(folder / f"{k}{m}.png")
            lines.append(json.dumps({"file_name": f"{k}{m}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    params = small_params(str(tmp_path / "data"), prompts={"source": str(folder), "train": 1, "val": 0, "test": 1},
                          samples={"source": "images", "image_folder": str(folder), "per_prompt": 3})
    paths = Paths.from_params(params, track=False)
    stage("prompts").run(params, paths)
    stage("samples").run(params, paths, progress=False)
    tensors, index = read_shards(paths.storage(), "samples", progress=False)
    assert sorted(set(index.column("prompt").to_pylist())) == ["a blue square", "a red square"]
    row = 4  # the second prompt's second image (sorted by file name)
    prompt = index.column("prompt")[row].as_py()
    name = f"{0 if prompt == 'a red square' else 1}1.png"
    expected = backbone.encode(load_image(folder / name, 32)[None])[0]
    assert torch.allclose(tensors["latents"][row], expected, atol=1e-5)

    too_many = small_params(str(tmp_path / "data2"), prompts={"source": str(folder), "train": 1, "val": 0, "test": 1},
                            samples={"source": "images", "image_folder": str(folder), "per_prompt": 4})
    paths2 = Paths.from_params(too_many, track=False)
    stage("prompts").run(too_many, paths2)
    with pytest.raises(ValueError, match="has 3 images captioned .*samples.per_prompt needs 4"):
        stage("samples").run(too_many, paths2, progress=False)
