"""Decoding against hand-built step functions: lookup tables and Markov chains over a 5-token vocabulary."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from mmfusion.models.decoding import decode

S, E, A, B, C = 0, 1, 2, 3, 4  # start, end, three words
V = 5


def table_step(tables: list[dict[tuple[int, ...], list[float]]], default: list[float], calls: list | None = None):
    """Item ``r``'s next-token probs come from ``tables[r][prefix]`` (or ``default``); returns log-probs."""

    def step(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(rows.tolist())
        probs = [tables[r].get(tuple(p), default) for p, r in zip(prefix.tolist(), rows.tolist(), strict=True)]
        return torch.tensor(probs, dtype=torch.float64).log()  # (N, V)

    return step


def markov_step(matrix: dict[int, list[float]]):
    """Next-token probs depend only on the last token."""

    def step(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.tensor([matrix[p[-1]] for p in prefix.tolist()], dtype=torch.float64).log()  # (N, V)

    return step


def random_step(spread: float = 2.0, item_offset: int = 0):
    """A fixed pseudo-random distribution per (item, prefix); the start token is never generated."""

    def probs(item: int, prefix: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((item, prefix)) % 2**31)  # int tuples hash deterministically
        logits = torch.randn(V, generator=g, dtype=torch.float64) * spread  # (V,)
        logits[S] = float("-inf")
        return logits.log_softmax(0)

    def step(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows_list = (rows + item_offset).tolist()
        return torch.stack([probs(r, tuple(p)) for p, r in zip(prefix.tolist(), rows_list, strict=True)])  # (N, V)

    return step


def brute_force(step: Callable, max_new: int, length_penalty: float = 0.0) -> tuple[list[int], float]:
    """Best complete sequence (ended, or truncated at max_new) by normalised total log-prob, by enumeration."""
    best: tuple[list[int], float] = ([], -math.inf)

    def visit(prefix: list[int], score: float) -> None:
        nonlocal best
        lp = step(torch.tensor([prefix]), torch.tensor([0]))[0].tolist()
        for tok in range(V):
            if lp[tok] == -math.inf:
                continue
            s, seq = score + lp[tok], prefix[1:] + ([] if tok == E else [tok])
            n = len(prefix)  # generated tokens including this one
            if tok == E or n == max_new:
                if s / n**length_penalty > best[1]:
                    best = (seq, s / n**length_penalty)
            else:
                visit(prefix + [tok], s)

    visit([S], 0.0)
    return best


def run(step, batch_size: int = 1, **kw) -> list[list[int]]:
    kw.setdefault("max_new_tokens", 6)
    return decode(step, batch_size, start_token=S, end_token=E, **kw)


# A first token that looks best (A) but leads to a worse sequence than B, E.
TRAP = {
    (S,): [0.0, 0.1, 0.5, 0.4, 0.0],
    (S, A): [0.0, 0.35, 0.0, 0.33, 0.32],
    (S, B): [0.0, 0.9, 0.04, 0.03, 0.03],
}
TRAP_DEFAULT = [0.0, 0.4, 0.2, 0.2, 0.2]


def test_beam_search_beats_greedy_and_finds_the_optimum():
    step = table_step([TRAP], TRAP_DEFAULT)
    assert run(step, max_new_tokens=3) == [[A]]  # greedy: 0.5 * 0.35 = 0.175
    best, score = brute_force(step, max_new=3)
    assert best == [B] and math.isclose(score, math.log(0.36))
    assert run(step, max_new_tokens=3, beam=2, length_penalty=0.0) == [best]


@pytest.mark.parametrize("seed", range(4))
def test_wide_beam_is_exact_on_random_tables(seed):
    # 3 non-end tokens, 3 steps: at most 9 live beams x 4 finite candidates = 36 = 2 * 18, so nothing is pruned
    step = random_step(item_offset=seed)
    best, _ = brute_force(step, max_new=3)
    assert run(step, max_new_tokens=3, beam=18, length_penalty=0.0) == [best]


def test_beam_search_stops_when_no_live_hypothesis_can_win():
    calls: list[list[int]] = []
    out = run(table_step([TRAP], TRAP_DEFAULT, calls), max_new_tokens=6, beam=2, length_penalty=0.0)
    # after step 2: finished B,E (0.36) and A,E (0.175); best live A,B (0.165) cannot beat 0.175
    assert out == [[B]] and len(calls) == 2


def test_repetition_penalty_renormalises_beam_scores():
    # Reference: CTRL on log-probs of generated tokens, then renormalised, applied by the step itself.
    base, penalty = random_step(spread=1.0), 1.7

    def penalised(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lp = base(prefix, rows).clone()  # (N, V)
        for i, p in enumerate(prefix.tolist()):
            for tok in set(p[1:]):
                lp[i, tok] *= penalty
        return lp.log_softmax(-1)

    best, _ = brute_force(penalised, max_new=3)
    assert run(base, max_new_tokens=3, beam=18, length_penalty=0.0, repetition_penalty=penalty) == [best]
    assert run(penalised, max_new_tokens=3, beam=18, length_penalty=0.0) == [best]


def test_length_penalty_prefers_longer_hypotheses():
    table = {(S,): [0.0, 0.5, 0.45, 0.05, 0.0], (S, A): [0.0, 0.8, 0.1, 0.1, 0.0]}
    step = table_step([table], TRAP_DEFAULT)
    assert run(step, beam=2, length_penalty=0.0) == [[]]  # log 0.5 > log 0.36
    assert run(step, beam=2, length_penalty=1.0) == [[A]]  # log(0.5) / 1 < log(0.36) / 2


@pytest.mark.parametrize("beam", [1, 3])
def test_batched_equals_alone(beam):
    step = random_step()
    kw = dict(max_new_tokens=7, beam=beam, length_penalty=1.0, repetition_penalty=1.3, no_repeat_ngram=3)
    batched = run(step, 5, **kw)
    alone = [run(lambda p, r, i=i: step(p, r + i), 1, **kw)[0] for i in range(5)]
    assert batched == alone
    assert len({len(s) for s in batched}) > 1  # items finished at different steps


@pytest.mark.parametrize("beam", [1, 2])
def test_finished_items_leave_the_step_batch(beam):
    calls: list[list[int]] = []
    tables = [{(S,): [0.0, 1.0, 0.0, 0.0, 0.0]}, {}]  # item 0 ends at once, item 1 never ends
    out = run(table_step(tables, [0.0, 0.0, 0.5, 0.3, 0.2], calls), 2, max_new_tokens=4, beam=beam)
    assert out[0] == [] and len(out[1]) == 4
    assert all(0 not in rows for rows in calls[1:]) and len(calls) == 4


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    step = random_step(spread=0.3)  # nearly uniform

    def sample(seed: int) -> list[list[int]]:
        return run(step, 6, max_new_tokens=8, top_p=1.0, generator=torch.Generator().manual_seed(seed))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_top_p_keeps_only_the_nucleus():
    dist = [0.0, 0.05, 0.6, 0.25, 0.1]
    step = markov_step({t: dist for t in range(V)})
    g = torch.Generator().manual_seed(0)
    # top token's mass equals top_p: the nucleus is that token alone
    assert run(step, 50, max_new_tokens=5, top_p=0.6, generator=g) == [[A] * 5] * 50
    out = run(step, 200, max_new_tokens=5, top_p=0.8, generator=g)  # A + B = 0.85 >= 0.8
    tokens = {t for seq in out for t in seq}
    assert tokens == {A, B} and all(len(seq) == 5 for seq in out)
    full = run(step, 200, max_new_tokens=5, top_p=1.0, generator=g)
    assert {t for seq in full for t in seq} == {A, B, C}  # plain sampling reaches the tail


def test_low_temperature_sampling_is_greedy():
    step = random_step()
    greedy = run(step, 4)
    assert run(step, 4, top_p=1.0, temperature=1e-4, generator=torch.Generator().manual_seed(0)) == greedy


def seeded(mode: dict) -> dict:
    """Add a fresh seeded generator to sampling modes."""
    return {**mode, "generator": torch.Generator().manual_seed(0)} if "top_p" in mode else mode


@pytest.mark.parametrize("mode", [{}, {"beam": 2}, {"top_p": 0.9}])
def test_min_and_max_new_tokens(mode):
    eager = markov_step({t: [0.0, 0.9, 0.06, 0.04, 0.0] for t in range(V)})  # nucleus 0.9 = the end token alone
    never = markov_step({t: [0.0, 0.0, 0.5, 0.3, 0.2] for t in range(V)})

    def lengths(step, **kw) -> list[int]:
        return [len(s) for s in run(step, 20, **seeded(mode), **kw)]

    assert lengths(eager) == [0] * 20
    assert lengths(eager, min_new_tokens=2) == [2] * 20
    assert lengths(never, max_new_tokens=4) == [4] * 20
    assert lengths(eager, min_new_tokens=3, max_new_tokens=3) == [3] * 20  # truncated, end never allowed


LOOP = {  # A -> B -> A -> ... is the greedy path
    S: [0.0, 0.1, 0.6, 0.3, 0.0],
    A: [0.0, 0.1, 0.0, 0.6, 0.3],
    B: [0.0, 0.1, 0.6, 0.0, 0.3],
    C: [0.0, 0.1, 0.5, 0.4, 0.0],
}


def bigrams(seq: list[int]) -> list[tuple[int, int]]:
    full = [S, *seq]
    return list(zip(full[:-1], full[1:], strict=True))


def test_no_repeat_ngram_breaks_a_loop():
    step = markov_step(LOOP)
    assert run(step) == [[A, B, A, B, A, B]]
    out = run(step, no_repeat_ngram=2)
    assert out == [[A, B, A, C, A]]  # (A, B) banned -> C; then (A, B) and (A, C) banned -> end
    assert len(set(bigrams(out[0]))) == len(bigrams(out[0]))
    beam_out = run(step, beam=2, no_repeat_ngram=2)[0]
    assert len(set(bigrams(beam_out))) == len(bigrams(beam_out))


def test_no_repeat_unigram_never_repeats_a_token():
    out = run(random_step(spread=0.3), 8, max_new_tokens=6, no_repeat_ngram=1)
    assert all(len(set(s)) == len(s) for s in out)


@pytest.mark.parametrize("mode", [{}, {"beam": 2}, {"top_p": 1.0}])
def test_a_row_with_every_token_banned_ends(mode):
    never_ends = markov_step({t: [0.0, 0.0, 0.5, 0.3, 0.2] for t in range(V)})
    out = run(never_ends, 3, no_repeat_ngram=1, **seeded(mode))  # after A, B, C nothing is left
    assert all(sorted(s) == [A, B, C] for s in out)


def test_repetition_penalty_changes_the_choice():
    step = markov_step(
        {
            S: [0.0, 0.1, 0.6, 0.3, 0.0],
            A: [0.0, 0.1, 0.5, 0.4, 0.0],
            B: [0.0, 0.9, 0.05, 0.05, 0.0],
            C: [0.0, 1.0, 0.0, 0.0, 0.0],
        }
    )
    assert run(step, max_new_tokens=4) == [[A, A, A, A]]
    assert run(step, max_new_tokens=4, repetition_penalty=1.1) == [[A, A, A, A]]  # -0.76 still beats -0.92
    assert run(step, max_new_tokens=4, repetition_penalty=2.0) == [[A, B]]  # -1.39 loses to -0.92
    assert run(step, max_new_tokens=4, beam=2, repetition_penalty=2.0, length_penalty=0.0) == [[A, B]]


def test_start_token_is_context_not_history():
    # The start token can be generated; the copy at position 0 is never banned or penalised.
    once = table_step([{(S,): [0.5, 0.1, 0.4, 0.0, 0.0]}], [0.0, 1.0, 0.0, 0.0, 0.0])
    assert run(once, no_repeat_ngram=1) == [[S]]
    again = table_step([{(S,): [0.0, 0.0, 0.0, 1.0, 0.0], (S, B): [0.45, 0.15, 0.0, 0.0, 0.4]}], [0.0, 1.0, 0, 0, 0])
    assert run(again, repetition_penalty=2.0) == [[B, S]]


@pytest.mark.parametrize("mode", [{}, {"beam": 3}, {"top_p": 1.0}])
def test_banned_tokens_never_appear(mode):
    step = random_step(spread=0.5)
    assert any(B in s for s in run(step, 8, **seeded(mode)))  # the ban has something to remove
    assert all(B not in s and C not in s for s in run(step, 8, banned_tokens=[B, C], **seeded(mode)))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"beam": 0}, "beam"),
        ({"beam": 2, "top_p": 0.9}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.9, "temperature": 0.0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 7}, "min_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"repetition_penalty": 0.9}, "repetition_penalty"),
        ({"no_repeat_ngram": -1}, "no_repeat_ngram"),
        ({"length_penalty": math.inf}, "length_penalty"),
        ({"banned_tokens": [-1]}, "banned_tokens"),
    ],
)
def test_argument_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        run(random_step(), 2, **kw)


def test_bad_step_output_and_out_of_vocab_ids():
    with pytest.raises(ValueError, match="step_fn"):
        run(lambda p, r: torch.zeros(p.shape[0] + 1, V), 2)
    with pytest.raises(ValueError, match="vocabulary"):
        run(random_step(), 2, banned_tokens=[V])


def test_empty_batch():
    assert run(random_step(), 0) == []
