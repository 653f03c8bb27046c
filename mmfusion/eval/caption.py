"""Caption metrics: corpus BLEU and CIDEr-D as the COCO caption toolkit computes them, and attribute accuracy.

``bleu`` (Papineni et al., 2002, "BLEU: a Method for Automatic Evaluation of Machine Translation") and ``cider``
(Vedantam et al., 2015, "CIDEr: Consensus-based Image Description Evaluation", the CIDEr-D variant) reproduce the
numbers of pycocoevalcap's ``Bleu(4)`` and ``Cider()`` scorers on text split by ``tokenize``. The toolkit itself is
not a dependency: its tokenizer needs Java, and both scorers are short enough to own.

``attribute_accuracy`` is specific to the synthetic shapes dataset (``mmfusion.data.synthetic``): it parses a
caption back into object mentions and checks each attribute against the scene's JSON, so a caption that says
"a red circle" for a blue circle is caught even where n-gram overlap barely moves.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from mmfusion.data.synthetic import COLORS, POSITION_PHRASES, RELATION_PHRASES, SHAPE_SYNONYMS, SHAPES, SIZE_WORDS

# pycocoevalcap's BleuScorer.compute_score: ``tiny`` keeps a zero match count at (almost) zero instead of failing the
# log, ``small`` keeps an empty candidate from dividing by zero. Same constants so scores agree to the last digits.
BLEU_TINY = 1e-15
BLEU_SMALL = 1e-9
CIDER_N = 4
CIDER_SIGMA = 6.0

# PTB-style: split "n't" and the common clitics off their word; keep hyphens and decimal points inside a word.
_NEGATION = re.compile(r"n't\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-.][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words, dropping punctuation.

    An approximation of the Stanford PTB tokenizer that pycocoevalcap runs before scoring (it needs Java, which we do
    not want in an eval loop): like it, "n't" and clitics ("'s", "'re", ...) become their own tokens, hyphenated
    words and decimals stay whole, and punctuation tokens are removed. It can differ on rarer cases (abbreviations
    such as "u.s.", "cannot"), so scores on such text may deviate slightly from the official toolkit's.
    """
    return _TOKEN.findall(_NEGATION.sub(" n't", text.lower()))


def _ngrams(tokens: list[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..max_n-gram of ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _check_corpus(candidates: list[str], references: list[list[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("the corpus is empty")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference")


def bleu(candidates: list[str], references: list[list[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..``max_n`` (fractions in [0, 1]) as pycocoevalcap's ``Bleu`` scorer computes it.

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus before dividing; the brevity
    penalty compares the total candidate length with the summed "closest" reference lengths (per candidate, the
    reference length nearest to its own, the shorter one on a tie). ``candidates[i]`` is scored against every string
    in ``references[i]``; all text goes through ``tokenize``. For ``max_n <= 4`` the values equal the toolkit's.
    """
    _check_corpus(candidates, references)
    correct, guess = [0] * max_n, [0] * max_n
    test_len = ref_len = 0
    for candidate, refs in zip(candidates, references, strict=True):
        tokens = tokenize(candidate)
        ref_tokens = [tokenize(r) for r in refs]
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for ref in ref_tokens:
            max_ref_counts |= _ngrams(ref, max_n)  # per n-gram, the most any single reference holds
        for gram, count in _ngrams(tokens, max_n).items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        for k in range(max_n):
            guess[k] += max(0, len(tokens) - k)
        test_len += len(tokens)
        ref_len += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
    ratio = (test_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(max_n):
        product *= (correct[k] + BLEU_TINY) / (guess[k] + BLEU_SMALL)
        scores.append(product ** (1 / (k + 1)) * brevity)  # geometric mean of the first k+1 precisions
    return scores


def _tfidf(
    counts: Counter[tuple[str, ...]], doc_freq: Counter[tuple[str, ...]], log_n_images: float
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """Per n-gram order: tf-idf weights and their L2 norm; plus the length CIDEr-D's penalty compares."""
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(CIDER_N)]
    for gram, tf in counts.items():
        # An n-gram no reference holds gets df 1 (idf = log N), as in the toolkit.
        vec[len(gram) - 1][gram] = tf * (log_n_images - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
    # The toolkit accumulates "length" on its n == 1 index, which holds bigrams: it penalises bigram counts (words - 1).
    # Mirrored as is; it only differs from word counts when one side is empty, where the similarity is 0 anyway.
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, length


def cider(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D (the scale of COCO leaderboards, 0..~10+) as pycocoevalcap's ``Cider`` scorer computes it.

    n-grams of order 1..4 are weighted by tf-idf, with document frequencies counted over the reference sets of this
    corpus (an n-gram counts once per image) and idf = log(#images) - log(max(1, df)). Per order, the candidate and
    each reference get a cosine similarity whose numerator clips the candidate weight at the reference's, times a
    gaussian penalty (sigma 6) on their length difference; the score of an image is the mean over orders, averaged
    over its references, times 10; the result is the mean over images. A one-image corpus scores 0 (every idf is 0).
    """
    _check_corpus(candidates, references)
    cand_counts = [_ngrams(tokenize(c), CIDER_N) for c in candidates]
    ref_counts = [[_ngrams(tokenize(r), CIDER_N) for r in refs] for refs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    log_n_images = math.log(len(candidates))
    scores = []
    for cand, refs in zip(cand_counts, ref_counts, strict=True):
        vec, norms, length = _tfidf(cand, doc_freq, log_n_images)
        total = 0.0
        for ref in refs:
            vec_ref, norms_ref, length_ref = _tfidf(ref, doc_freq, log_n_images)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(CIDER_N):
                val = sum(min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0) for g, w in vec[n].items())
                if norms[n] != 0 and norms_ref[n] != 0:
                    val /= norms[n] * norms_ref[n]
                total += val * penalty
        scores.append(10.0 * total / CIDER_N / len(refs))
    return sum(scores) / len(scores)


# ---- attribute accuracy on the synthetic shapes dataset ------------------------------------------------------------

_SIZE_OF = {word: size for size, words in SIZE_WORDS.items() for word in words}
_ARTICLES = frozenset({"a", "an", "the"})
# Multi-word phrases, matched longest first so "at the top left" is never read as "at the top" + "left".
_PHRASES: dict[tuple[str, ...], tuple[str, str]] = {
    **{(s,): ("shape", s) for s in SHAPES},
    **{tuple(w.split()): ("shape", s) for s, words in SHAPE_SYNONYMS.items() for w in words},
    **{tuple(p.split()): ("pos", pos) for pos, phrases in POSITION_PHRASES.items() for p in phrases},
    # Relations are parsed only so that their words ("left" in "to the left of") are never taken for a position.
    **{tuple(p.split()): ("rel", rel) for rel, phrases in RELATION_PHRASES.items() for p in phrases},
}
_MAX_PHRASE = max(len(p) for p in _PHRASES)
_CATEGORIES = ("color", "shape", "size", "position")


@dataclass
class _Mention:
    """One object named in a caption; ``None`` where the caption does not say."""

    color: str | None
    shape: str
    size: str | None = None
    position: str | None = None


def _items(caption: str) -> list[tuple[str, object]]:
    """The caption as a sequence of (kind, value): "np" (a _Mention), "pos", "rel", ",", or "word"."""
    tokens = re.findall(r"[^\W\d_]+|,", caption.lower())
    items: list[tuple[str, object]] = []
    modifiers: list[str] = []  # size and colour words waiting for their shape word
    i = 0
    while i < len(tokens):
        for length in range(min(_MAX_PHRASE, len(tokens) - i), 0, -1):
            kind, value = _PHRASES.get(tuple(tokens[i : i + length]), (None, None))
            if kind is not None:
                break
        else:
            kind, value, length = None, tokens[i], 1
        if kind is None and (value in COLORS or value in _SIZE_OF):
            modifiers.append(value)
        elif kind is None and value in _ARTICLES:
            pass  # articles never separate a noun phrase from the position phrase around it
        elif kind == "shape":
            # The colour and size words right before the shape word; the one nearest the shape wins.
            color = next((w for w in reversed(modifiers) if w in COLORS), None)
            size = next((_SIZE_OF[w] for w in reversed(modifiers) if w in _SIZE_OF), None)
            items.append(("np", _Mention(color, value, size)))
            modifiers = []
        else:
            if modifiers:  # stray modifiers with no shape: keep them as a word so adjacency stays honest
                items.append(("word", " ".join(modifiers)))
                modifiers = []
            if kind is None:
                kind = "," if value == "," else "word"
            items.append((kind, value))
        i += length
    return items


def _parse_mentions(caption: str) -> list[_Mention]:
    """Object mentions of a synthetic-dataset caption, in order, each with its position phrase when it has one."""
    items = _items(caption)
    for k, (kind, value) in enumerate(items):
        if kind != "pos":
            continue
        if k > 0 and items[k - 1][0] == "np":  # "{a} {pos}"
            target = items[k - 1][1]
        elif k + 2 < len(items) and items[k + 1][0] == "," and items[k + 2][0] == "np":  # "{pos}, {a}"
            target = items[k + 2][1]
        else:
            continue
        if target.position is None:  # a mention keeps its first position phrase
            target.position = value
    return [value for kind, value in items if kind == "np"]


def parse_mentions(caption: str) -> list[dict[str, str | None]]:
    """Object mentions of a synthetic-dataset caption (or a text-to-image prompt in the same language), in order.

    Each is ``{"color", "shape", "size", "position"}``: the canonical shape name (synonyms mapped), and ``None`` for
    any other attribute the text does not state. Parsing rules are those of :func:`attribute_accuracy`.
    """
    return [
        {"color": m.color, "shape": m.shape, "size": m.size, "position": m.position} for m in _parse_mentions(caption)
    ]


def _agreement(mention: _Mention, obj: dict) -> int:
    """How many of size and position ``mention`` gets right for ``obj``: the tie-break between candidates."""
    return (mention.size == obj["size"]) + (mention.position == obj["position"])


def _match(mentions: list[_Mention], objects: list[dict]) -> dict[int, int]:
    """One-to-one mention -> object index: exact (colour, shape) first, then same shape, then same colour.

    Within a stage, mentions are taken in order; among several candidate objects the one agreeing on more of size
    and position wins, then the earlier object, so a wrong colour does not also cost a size check needlessly.
    """
    stages = (
        lambda m, o: m.color == o["color"] and m.shape == o["shape"],
        lambda m, o: m.shape == o["shape"],
        lambda m, o: m.color == o["color"],
    )
    pairs: dict[int, int] = {}
    free = list(range(len(objects)))
    for same in stages:
        for mi, mention in enumerate(mentions):
            if mi in pairs:
                continue
            candidates = [oi for oi in free if same(mention, objects[oi])]
            if candidates:
                scores = [_agreement(mention, objects[oi]) for oi in candidates]
                best = candidates[scores.index(max(scores))]
                pairs[mi] = best
                free.remove(best)
    return pairs


def _caption_checks(caption: str, objects: list[dict]) -> dict[str, list[int]]:
    """Per category, [passed, total] attribute checks of one caption against its scene's objects."""
    mentions = _parse_mentions(caption)
    pairs = _match(mentions, objects)
    by_object = {oi: mentions[mi] for mi, oi in pairs.items()}
    checks = {c: [0, 0] for c in _CATEGORIES}

    def check(category: str, ok: bool) -> None:
        checks[category][0] += ok
        checks[category][1] += 1

    for oi, obj in enumerate(objects):
        mention = by_object.get(oi)
        check("color", mention is not None and mention.color == obj["color"])
        check("shape", mention is not None and mention.shape == obj["shape"])
        if mention is not None and mention.size is not None:
            check("size", mention.size == obj["size"])
        if mention is not None and mention.position is not None:
            check("position", mention.position == obj["position"])
    for _ in range(len(mentions) - len(pairs)):  # a hallucinated object: wrong colour and wrong shape
        check("color", False)
        check("shape", False)
    return checks


def attribute_accuracy(captions: list[str], metas: list[dict]) -> dict[str, float]:
    """How well captions of synthetic scenes state each object's colour, shape, size and position, in percent.

    Each caption is parsed into object mentions: optional size word, colour word and shape word (synonyms mapped
    to the canonical shape; a shape word is required, a missing colour fails its check), plus a position phrase: the
    one directly after the noun phrase or, in "<position phrase>, <noun phrase>", the one before the comma (the first
    wins if both). Relation phrases ("to the left of") are never positions, and longer phrases win ("at the top
    left" is "top left", not "top"). Mentions are matched one-to-one to ``meta["objects"]``: exact (colour, shape)
    first, then by shape, then by colour (ties go to the object agreeing on more of size and position).
    Checks: every object gets a colour and a shape check (both fail when no mention matches it); a size check only
    when its mention has a size word, a position check only when it has a position phrase; every mention matching no
    object adds a failed colour and a failed shape check (a hallucinated object).

    Returns ``attr_acc`` (all checks passed / all checks), ``color_acc``, ``shape_acc``, ``size_acc``,
    ``position_acc`` (each over its own checks; a key is left out when there were no such checks, never NaN),
    ``exact`` (captions with every check passing and no extra mention) and ``samples`` (how many were scored).
    Samples whose meta has no ``"objects"`` are skipped; with none left only ``samples`` (0) is returned.
    """
    if len(captions) != len(metas):
        raise ValueError(f"{len(captions)} captions but {len(metas)} metas")
    totals = {c: [0, 0] for c in _CATEGORIES}
    samples = exact = 0
    for caption, meta in zip(captions, metas, strict=True):
        if not meta.get("objects"):
            continue
        checks = _caption_checks(caption, meta["objects"])
        for c in _CATEGORIES:
            totals[c][0] += checks[c][0]
            totals[c][1] += checks[c][1]
        samples += 1
        exact += all(passed == total for passed, total in checks.values())
    out = {f"{c}_acc": 100.0 * passed / total for c, (passed, total) in totals.items() if total}
    passed, total = sum(p for p, _ in totals.values()), sum(t for _, t in totals.values())
    if total:
        out["attr_acc"] = 100.0 * passed / total
    if samples:
        out["exact"] = 100.0 * exact / samples
    out["samples"] = float(samples)
    return out


def caption_metrics(captions: list[str], references: list[list[str]], metas: list[dict]) -> dict[str, float]:
    """BLEU-4 and CIDEr-D of ``captions`` against ``references``, plus attribute accuracy on synthetic scenes.

    Keys: ``caption_BLEU4`` (fraction, as the toolkit reports it), ``caption_CIDEr``, and, when some metas carry
    objects, every ``attribute_accuracy`` key prefixed ``caption_``. When metas say ``"unseen"``, the attribute keys
    are also reported on scenes with (``unseen/``) and without (``seen/``) a held-out colour-shape combination;
    a subset with no samples is left out.
    """
    if not len(captions) == len(references) == len(metas):
        raise ValueError(f"{len(captions)} captions, {len(references)} reference lists and {len(metas)} metas")
    out = {"caption_BLEU4": float(bleu(captions, references)[3]), "caption_CIDEr": float(cider(captions, references))}
    with_objects = [(c, m) for c, m in zip(captions, metas, strict=True) if m.get("objects")]
    if not with_objects:
        return out
    subsets = {"": with_objects}
    if any("unseen" in m for _, m in with_objects):
        subsets["seen/"] = [(c, m) for c, m in with_objects if not m.get("unseen")]
        subsets["unseen/"] = [(c, m) for c, m in with_objects if m.get("unseen")]
    for prefix, pairs in subsets.items():
        if pairs:
            scores = attribute_accuracy([c for c, _ in pairs], [m for _, m in pairs])
            out.update({f"{prefix}caption_{k}": float(v) for k, v in scores.items()})
    return out
