"""Generation metrics: pixel-level colour/position checks, the shape classifier's plumbing and CLIP R-precision."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmfusion.data.synthetic import COLORS, SHAPES, render_scene
from mmfusion.eval.generation import (
    clip_r_precision,
    color_position_accuracy,
    detect_objects,
    generation_metrics,
    heldout_prompts,
    load_shape_classifier,
    prompt_objects,
    save_shape_classifier,
    shape_accuracy,
    train_shape_classifier,
)

N = 200


@pytest.fixture(scope="module")
def heldout() -> tuple[list[str], list[dict], list[np.ndarray]]:
    """Single-object val prompts, their scenes and ground-truth 64 px renders."""
    prompts, metas = heldout_prompts(N)
    return prompts, metas, [np.asarray(render_scene(m, 64)) for m in metas]


@pytest.fixture(scope="module")
def tiny_classifier():
    # Plumbing only: a few steps cannot make it accurate, and no test relies on its accuracy.
    return train_shape_classifier(steps=3, batch_size=16, seed=0, heldout=16)


def test_heldout_prompts_are_single_object_with_some_unseen(heldout):
    prompts, metas, _ = heldout
    assert len(prompts) == len(metas) == N
    assert all(len(prompt_objects(p)) == 1 and m["n_objects"] == 1 for p, m in zip(prompts, metas, strict=True))
    assert all(p == m["caption"] for p, m in zip(prompts, metas, strict=True))
    assert 0.15 * N < sum(m["unseen"] for m in metas) < 0.45 * N  # the val split aims at 30%
    assert heldout_prompts(5) == (prompts[:5], metas[:5])  # deterministic, in index order
    multi = heldout_prompts(40, single_object=False)[1]
    assert any(m["n_objects"] > 1 for m in multi)


def test_prompt_objects_parses_a_generator_prompt():
    assert prompt_objects("a small red star in the top left") == [
        {"color": "red", "shape": "star", "size": "small", "position": "top left"}
    ]


def test_ground_truth_renders_score_full_marks(heldout):
    prompts, _, images = heldout
    scores = color_position_accuracy(images, prompts)
    assert scores["color_acc"] == 100.0 and scores["color_n"] == N
    # Positions use the detected box centre, as the dataset places objects; 100% measured on 1000 val scenes.
    assert scores["position_acc"] >= 98.0 and scores["position_n"] > N / 2
    assert scores["ignored_n"] == 0


def test_detect_objects_finds_every_object_of_multi_object_scenes():
    _, metas = heldout_prompts(30, single_object=False)
    for meta in metas:
        found = detect_objects(render_scene(meta, 64))
        assert sorted((o["color"], o["position"]) for o in found) == sorted(
            (o["color"], o["position"]) for o in meta["objects"]
        )
        assert [o["pixels"] for o in found] == sorted((o["pixels"] for o in found), reverse=True)


def test_detect_objects_accepts_float_arrays_and_ignores_specks(heldout):
    image = heldout[2][0]
    assert detect_objects(image.astype(np.float32) / 255.0) == detect_objects(image)
    specks = np.full((64, 64, 3), 128, np.uint8)
    specks[10:13, 10:13] = COLORS["red"]  # 9 px: below the minimum object size
    assert detect_objects(specks) == []


def test_recoloured_objects_fail_colour(heldout):
    prompts, metas, _ = heldout
    names = list(COLORS)
    images = []
    for meta in metas:
        scene = copy.deepcopy(meta)
        obj = scene["objects"][0]
        obj["rgb"] = list(COLORS[names[(names.index(obj["color"]) + 1) % len(names)]])
        images.append(render_scene(scene, 64))
    scores = color_position_accuracy(images, prompts)
    assert scores["color_acc"] == 0.0 and scores["position_acc"] == 100.0


@pytest.mark.parametrize("axis", [0, 1])
def test_shifted_images_fail_position(heldout, axis):
    prompts, _, images = heldout
    # A third of the image moves every object one cell on; the rare leftover hit is an object split by the wrap.
    scores = color_position_accuracy([np.roll(image, 64 // 3, axis=axis) for image in images], prompts)
    assert scores["position_acc"] <= 5.0 and scores["color_acc"] == 100.0


def test_blank_images_fail_colour_and_position(heldout):
    prompts, metas, _ = heldout
    blank = [render_scene({**meta, "objects": []}, 64) for meta in metas]
    scores = color_position_accuracy(blank, prompts)
    assert scores["color_acc"] == 0.0 and scores["position_acc"] == 0.0


def test_multi_object_prompts_are_ignored_and_counted(heldout):
    prompts, _, images = heldout
    mixed = [prompts[0], "a red circle on the left and a blue square on the right", prompts[1], "a dog"]
    scores = color_position_accuracy([images[0], images[0], images[1], images[1]], mixed)
    assert scores["color_n"] == 2 and scores["ignored_n"] == 2 and scores["color_acc"] == 100.0
    only_multi = color_position_accuracy([images[0]], [mixed[1]])
    assert only_multi == {"color_n": 0.0, "position_n": 0.0, "ignored_n": 1.0}  # no NaN accuracies


def test_shape_classifier_save_load_round_trip(tiny_classifier, heldout, tmp_path):
    info = tiny_classifier.info
    assert info["steps"] == 3 and info["shape_n"] == 16
    assert info["seen/shape_n"] + info.get("unseen/shape_n", 0) == 16
    path = tmp_path / "clf" / "shape_classifier.safetensors"
    path.parent.mkdir()
    save_shape_classifier(tiny_classifier, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    loaded = load_shape_classifier(path)
    assert loaded.info == info and not loaded.training
    batch = torch.from_numpy(np.stack(heldout[2][:8])).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        assert torch.equal(tiny_classifier.eval()(batch), loaded(batch))


def test_shape_accuracy_scores_single_object_prompts_only(tiny_classifier, heldout):
    prompts, _, images = heldout
    multi = "a red circle to the left of a blue square"
    mixed_prompts = [multi, *prompts[:10], multi]
    mixed_images = [images[10], *images[:10], images[11]]
    scores = shape_accuracy(mixed_images, mixed_prompts, tiny_classifier)
    assert scores["shape_n"] == 10
    batch = torch.from_numpy(np.stack(images[:10])).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        predicted = tiny_classifier.eval()(batch).argmax(-1).tolist()
    expected = [SHAPES[p] == prompt_objects(q)[0]["shape"] for p, q in zip(predicted, prompts[:10], strict=True)]
    assert scores["shape_acc"] == pytest.approx(100.0 * sum(expected) / 10)


def test_training_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    train_shape_classifier(steps=1, batch_size=4, heldout=0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_clip_r_precision_perfect_random_and_seeded():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(400, 32, generator=g)
    assert clip_r_precision(emb, emb) == 100.0
    other = torch.randn(400, 32, generator=g)
    chance = 100.0 / 32
    score = clip_r_precision(other, emb)
    assert chance / 3 < score < chance * 3
    assert clip_r_precision(other, emb, seed=5) == clip_r_precision(other, emb, seed=5)
    assert clip_r_precision(other, emb, distractors=3) > score  # 4 candidates: chance 25%
    ones, names = torch.ones(40, 8), [str(i) for i in range(40)]
    assert clip_r_precision(ones, ones, distractors=3, prompts=names) == 0.0  # a tie is a miss


def test_clip_r_precision_never_draws_the_same_prompt_as_distractor():
    emb = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    prompts = [f"prompt {i % 20}" for i in range(40)]
    same = torch.cat([emb[:20], emb[:20]])  # equal strings, equal embeddings: a copy would tie and miss
    assert clip_r_precision(same, same, distractors=19, prompts=prompts) == 100.0
    assert clip_r_precision(same, same, distractors=19) == 100.0  # grouped by embedding without strings
    with pytest.raises(ValueError, match="distractors"):
        clip_r_precision(same, same, distractors=20, prompts=prompts)


def test_generation_metrics_reports_seen_and_unseen(tiny_classifier, heldout):
    prompts, metas, images = heldout
    emb = torch.randn(N, 16, generator=torch.Generator().manual_seed(2))
    scores = generation_metrics(images, prompts, metas, shape_classifier=tiny_classifier, image_emb=emb, prompt_emb=emb)
    for prefix in ("", "seen/", "unseen/"):
        for key in ("color_acc", "position_acc", "shape_acc", "shape_n", "clip_r_precision", "ignored_n"):
            assert prefix + key in scores
    assert scores["seen/color_n"] + scores["unseen/color_n"] == scores["color_n"] == N
    assert scores["unseen/color_n"] == sum(m["unseen"] for m in metas)
    assert scores["clip_r_precision"] == 100.0 and scores["color_acc"] == 100.0
    # Without metas, unseen is read off the prompt's colour-shape pairs: the same split.
    assert generation_metrics(images, prompts) == {
        k: v for k, v in scores.items() if "shape" not in k and "clip" not in k
    }


def test_a_file_that_is_not_a_shape_classifier_is_a_clear_error(tmp_path):
    bad = tmp_path / "clf.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="clf.safetensors: not a shape classifier"):
        load_shape_classifier(bad)
