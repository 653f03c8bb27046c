"""Caption metrics: BLEU/CIDEr-D against pycocoevalcap's numbers, hand-checked cases, and attribute accuracy on the
synthetic generator's own captions (all perfect) and on corrupted ones (exactly the expected checks lost)."""

from __future__ import annotations

import json
import math
import re

import pytest

from mmfusion.data import synthetic as S
from mmfusion.eval.caption import (
    _caption_checks,
    _parse_mentions,
    attribute_accuracy,
    bleu,
    caption_metrics,
    cider,
    tokenize,
)

# A small corpus with perfect, partial, reordered, too-short, one-word and over-long (clipped) candidates. Written
# with capitals and punctuation; TOKENIZED is what ``tokenize`` must make of it.
RAW_CANDIDATES = [
    "A small red circle in the top left.",
    "A blue square above a yellow star!",
    "a white heart",
    "An orange diamond on the right, and a purple cross on the left.",
    "Hexagon.",
    "a brown triangle below a pink star; and a pink star above",
]
RAW_REFERENCES = [
    ["A small red circle in the top left.", "A red ball at the top left"],
    ["There is a blue square above a green star."],
    ["A large white heart on a plain background.", "a big white heart", "A white heart in the center"],
    ["Two shapes: a purple cross on the left and an orange diamond on the right."],
    ["a cyan hexagon at the bottom", "At the bottom, a small cyan hexagon."],
    ["a brown triangle below a pink star", "A pink star above a brown triangle."],
]
TOKENIZED_CANDIDATES = [
    "a small red circle in the top left",
    "a blue square above a yellow star",
    "a white heart",
    "an orange diamond on the right and a purple cross on the left",
    "hexagon",
    "a brown triangle below a pink star and a pink star above",
]
TOKENIZED_REFERENCES = [
    ["a small red circle in the top left", "a red ball at the top left"],
    ["there is a blue square above a green star"],
    ["a large white heart on a plain background", "a big white heart", "a white heart in the center"],
    ["two shapes a purple cross on the left and an orange diamond on the right"],
    ["a cyan hexagon at the bottom", "at the bottom a small cyan hexagon"],
    ["a brown triangle below a pink star", "a pink star above a brown triangle"],
]
# Computed with pycocoevalcap 1.2 (the PyPI wheel): Bleu(4).compute_score(gts, res) and Cider().compute_score(gts, res)
# with gts = {i: TOKENIZED_REFERENCES[i]}, res = {i: [TOKENIZED_CANDIDATES[i]]} (its Java PTB tokenizer skipped).
COCO_BLEU = [0.7911526458843255, 0.7466604515819075, 0.7126298085396798, 0.6750542803560436]
COCO_CIDER = 4.302281131063087
# The same with candidate 4 ("hexagon") replaced by the empty string.
COCO_BLEU_EMPTY = [0.7686274864858242, 0.7264858662159314, 0.693719874630212, 0.6573049663029932]
COCO_CIDER_EMPTY = 4.157962623375877

N_SAMPLES = 200


def test_tokenize():
    assert [" ".join(tokenize(c)) for c in RAW_CANDIDATES] == TOKENIZED_CANDIDATES
    assert [[" ".join(tokenize(r)) for r in refs] for refs in RAW_REFERENCES] == TOKENIZED_REFERENCES
    assert tokenize("Don't! The dog's T-shirt costs 3.5 -- 'really'?") == [
        "do",
        "n't",
        "the",
        "dog",
        "'s",
        "t-shirt",
        "costs",
        "3.5",
        "really",
    ]
    assert tokenize("  ,.!  ") == []


@pytest.mark.parametrize("raw", [False, True], ids=["tokenized", "raw"])
def test_bleu_and_cider_match_pycocoevalcap(raw):
    cands = RAW_CANDIDATES if raw else TOKENIZED_CANDIDATES
    refs = RAW_REFERENCES if raw else TOKENIZED_REFERENCES
    assert bleu(cands, refs) == pytest.approx(COCO_BLEU, abs=1e-6)
    assert cider(cands, refs) == pytest.approx(COCO_CIDER, abs=1e-6)
    empty = [*cands[:4], "", *cands[5:]]
    assert bleu(empty, refs) == pytest.approx(COCO_BLEU_EMPTY, abs=1e-6)
    assert cider(empty, refs) == pytest.approx(COCO_CIDER_EMPTY, abs=1e-6)
    # BLEU-k only depends on the first k precisions and the brevity penalty.
    assert bleu(cands, refs, max_n=2) == pytest.approx(COCO_BLEU[:2], abs=1e-12)


def test_bleu_hand_checked():
    same = ["a small red circle in the top left", "two shapes a blue square and a green star"]
    assert bleu(same, [[s] for s in same]) == pytest.approx([1.0] * 4, abs=1e-6)
    assert max(bleu(["one two three four"], [["five six seven eight"]])) < 1e-6
    # 3/3 unigrams, 2/2 bigrams, 1/1 trigram match; 3 words against 6: brevity penalty exp(1 - 6/3).
    assert bleu(["a red circle"], [["a red circle on the left"]], max_n=3) == pytest.approx([math.exp(-1)] * 3)
    # References of 3 and 5 words are equally close to 4: the shorter wins, so no brevity penalty.
    assert bleu(["a red circle here"], [["a red circle", "a red circle over there"]], max_n=1) == pytest.approx([0.75])
    # Clipping: "the" may count at most twice, the most any one reference holds.
    assert bleu(["the the the the"], [["the cat the mat", "the dog"]], max_n=1) == pytest.approx([0.5])


def test_cider_hand_checked():
    same = ["a red circle on the left", "two blue squares at the bottom"]
    assert cider(same, [[s] for s in same]) == pytest.approx(10.0)  # cosine 1 at every order, no length penalty
    assert cider(["one two three"], [["one two three"]]) == 0.0  # one image: every idf is log(1) - log(1)
    assert cider(["one two", "three four"], [["five six"], ["seven eight"]]) == 0.0


def test_corpus_validation():
    with pytest.raises(ValueError, match="reference lists"):
        bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        cider(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="empty"):
        bleu([], [])


@pytest.fixture(scope="module")
def val_samples() -> tuple[list[str], list[dict]]:
    samples = [S.make_sample(i, "val", seed=0) for i in range(N_SAMPLES)]
    return [s["txt"].decode() for s in samples], [json.loads(s["json"]) for s in samples]


def _alternation(phrases) -> re.Pattern:
    # Longest first, so "in the top left" is found before "in the top" could be.
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, phrases), key=len, reverse=True)) + r")\b")


POSITION_RE = _alternation(p for phrases in S.POSITION_PHRASES.values() for p in phrases)
SIZE_RE = _alternation({w for words in S.SIZE_WORDS.values() for w in words})
COLOR_RE = _alternation(S.COLORS)
SHAPE_RE = _alternation([*S.SHAPES, *(w for words in S.SHAPE_SYNONYMS.values() for w in words)])


def test_generator_captions_score_perfectly(val_samples):
    captions, metas = val_samples
    scores = attribute_accuracy(captions, metas)
    expected = dict.fromkeys(["attr_acc", "color_acc", "shape_acc", "size_acc", "position_acc", "exact"], 100.0)
    assert scores == {**expected, "samples": float(N_SAMPLES)}
    for caption, meta in zip(captions, metas, strict=True):
        # Not vacuous: one mention per object, and every size word and position phrase was attached to one.
        assert len(_parse_mentions(caption)) == meta["n_objects"], caption
        checks = _caption_checks(caption, meta["objects"])
        assert checks["size"][1] == len(SIZE_RE.findall(caption)), caption
        assert checks["position"][1] == len(POSITION_RE.findall(caption)), caption
    # The sample covers every template family the parser has to handle.
    for feature in ("^(in|at) the [a-z ]+, ", "to the (left|right) of", "two shapes:", ", and .* (in|at|on) the "):
        assert any(re.search(feature, c) for c in captions), feature


def test_parser_pitfalls():
    [m] = _parse_mentions("a big blue plus sign at the top left")
    assert (m.size, m.color, m.shape, m.position) == ("large", "blue", "cross", "top left")
    [m] = _parse_mentions("at the bottom right, a little red disc")
    assert (m.size, m.color, m.shape, m.position) == ("small", "red", "circle", "bottom right")
    a, b = _parse_mentions("a red box to the left of a green star on the left")
    assert (a.shape, a.position, b.shape, b.position) == ("square", None, "star", "left")
    a, b = _parse_mentions("a red box on the left, a green star")  # the phrase follows a noun phrase: it is a's
    assert (a.position, b.position) == ("left", None)
    [m] = _parse_mentions("a cyan hexagon on a noisy background")
    assert m.position is None


SCENE = {
    "objects": [
        {"shape": "circle", "color": "red", "size": "small", "position": "top left"},
        {"shape": "square", "color": "blue", "size": "large", "position": "bottom right"},
    ],
    "unseen": False,
}
TRUTH = "a small red circle in the top left and a large blue square at the bottom right"


@pytest.mark.parametrize(
    "caption, expected",
    [
        (TRUTH, {"color": 100, "shape": 100, "size": 100, "position": 100, "attr": 100, "exact": 100}),
        (TRUTH.replace("red", "green"), {"color": 50, "shape": 100, "size": 100, "position": 100, "attr": 87.5}),
        (TRUTH.replace("circle", "star"), {"color": 100, "shape": 50, "size": 100, "position": 100, "attr": 87.5}),
        (TRUTH.replace("small", "big"), {"color": 100, "shape": 100, "size": 50, "position": 100, "attr": 87.5}),
        (TRUTH.replace("top left", "center"), {"color": 100, "shape": 100, "size": 100, "position": 50, "attr": 87.5}),
        (
            "a small red circle in the top left",
            {"color": 50, "shape": 50, "size": 100, "position": 100, "attr": 400 / 6},
        ),
        (TRUTH + " and a pink heart", {"color": 200 / 3, "shape": 200 / 3, "size": 100, "position": 100, "attr": 80}),
        ("a blue square and a red circle", {"color": 100, "shape": 100, "attr": 100, "exact": 100}),
        ("a blue thing", {"color": 0, "shape": 0, "attr": 0}),
    ],
)
def test_attribute_checks_lost(caption, expected):
    scores = attribute_accuracy([caption], [SCENE])
    want = {f"{k}_acc": v for k, v in expected.items() if k != "exact"}
    want.update(exact=expected.get("exact", 0.0), samples=1.0)
    assert scores == pytest.approx(want)  # also: a category with no checks has no key, so never NaN


def _swap(regex: re.Pattern, caption: str, replacement: str) -> str:
    assert regex.search(caption), caption
    return regex.sub(replacement, caption, count=1)


def _delta(caption: str, corrupted: str, objects: list[dict]) -> dict[str, list[int]]:
    before, after = _caption_checks(caption, objects), _caption_checks(corrupted, objects)
    return {c: [after[c][0] - before[c][0], after[c][1] - before[c][1]] for c in before}


def test_corrupted_generator_captions_lose_exactly_the_expected_checks(val_samples):
    none = {"color": [0, 0], "shape": [0, 0], "size": [0, 0], "position": [0, 0]}
    for caption, meta in zip(*val_samples, strict=True):
        objects = meta["objects"]
        absent_color = next(c for c in S.COLORS if all(o["color"] != c for o in objects))
        absent_shape = next(s for s in S.SHAPES if all(o["shape"] != s for o in objects))
        wrong_color = _swap(COLOR_RE, caption, absent_color)
        assert _delta(caption, wrong_color, objects) == {**none, "color": [-1, 0]}, wrong_color
        wrong_shape = _swap(SHAPE_RE, caption, absent_shape)
        assert _delta(caption, wrong_shape, objects) == {**none, "shape": [-1, 0]}, wrong_shape
        extra = f"{caption} and a {absent_color} {absent_shape}"
        assert _delta(caption, extra, objects) == {**none, "color": [0, 1], "shape": [0, 1]}, extra
        if found := POSITION_RE.search(caption):
            here = next(pos for pos, phrases in S.POSITION_PHRASES.items() if found[0] in phrases)
            elsewhere = "in the center" if here != "center" else "at the top"
            wrong_place = _swap(POSITION_RE, caption, elsewhere)
            assert _delta(caption, wrong_place, objects) == {**none, "position": [-1, 0]}, wrong_place
        if " and " in caption:  # drop the last object mention (with its own position phrase, if any)
            kept, dropped = caption.rsplit(" and ", 1)
            [gone] = _parse_mentions(dropped)
            sized, placed = int(gone.size is not None), int(gone.position is not None)
            want = {"color": [-1, 0], "shape": [-1, 0], "size": [-sized, -sized], "position": [-placed, -placed]}
            assert _delta(caption, kept.rstrip(","), objects) == want, kept


def test_samples_without_objects_are_ignored():
    scores = attribute_accuracy([TRUTH, "a red circle", "anything"], [SCENE, {}, {"objects": []}])
    assert scores["samples"] == 1.0 and scores["attr_acc"] == 100.0
    assert attribute_accuracy(["a red circle"], [{}]) == {"samples": 0.0}
    with pytest.raises(ValueError):
        attribute_accuracy(["a", "b"], [{}])


def test_caption_metrics_keys_and_seen_unseen_split(val_samples):
    captions, metas = val_samples
    refs = [[c] for c in captions]
    attr_keys = ["attr_acc", "color_acc", "shape_acc", "size_acc", "position_acc", "exact", "samples"]
    out = caption_metrics(captions, refs, metas)
    want_keys = {"caption_BLEU4", "caption_CIDEr"} | {
        f"{prefix}caption_{k}" for prefix in ("", "seen/", "unseen/") for k in attr_keys
    }
    assert set(out) == want_keys and all(type(v) is float for v in out.values())
    assert out["caption_BLEU4"] == pytest.approx(1.0, abs=1e-9)
    assert out["caption_CIDEr"] == pytest.approx(cider(captions, refs))
    n_unseen = sum(m["unseen"] for m in metas)
    assert 0 < n_unseen < N_SAMPLES
    assert (out["unseen/caption_samples"], out["seen/caption_samples"]) == (n_unseen, N_SAMPLES - n_unseen)
    assert all(out[f"{p}caption_attr_acc"] == 100.0 for p in ("", "seen/", "unseen/"))

    # Break one colour in every unseen caption: only the unseen subset (and the overall number) moves.
    broken = [
        _swap(COLOR_RE, c, next(x for x in S.COLORS if all(o["color"] != x for o in m["objects"])))
        if m["unseen"]
        else c
        for c, m in zip(captions, metas, strict=True)
    ]
    out = caption_metrics(broken, refs, metas)
    assert out["seen/caption_color_acc"] == 100.0 and out["seen/caption_exact"] == 100.0
    assert out["unseen/caption_exact"] == 0.0 and out["unseen/caption_color_acc"] < 100.0
    assert out["caption_exact"] == pytest.approx(100.0 * (N_SAMPLES - n_unseen) / N_SAMPLES)
    assert out["caption_BLEU4"] < 1.0

    # No objects in the metas: only the n-gram metrics.
    assert set(caption_metrics(captions[:3], refs[:3], [{}, {}, {}])) == {"caption_BLEU4", "caption_CIDEr"}
