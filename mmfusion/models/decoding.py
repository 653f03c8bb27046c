"""Model-agnostic batched text decoding: greedy, nucleus sampling and beam search over a step function.

The model is hidden behind ``step_fn(prefix, rows) -> log_probs``, so the same loop serves any captioner.
Constraints (banned tokens, minimum length, CTRL repetition penalty, no-repeat n-grams) are applied to
the step's log-probabilities before a token is chosen, identically for all three strategies.

Choices worth knowing:

- Repetition penalty (Keskar et al., 2019) multiplies the log-probs of tokens already generated (the
  start token excluded) by the penalty, then renormalises with ``log_softmax``, so beam scores remain
  log-probabilities of the penalised distribution. Bans are applied afterwards as ``-inf`` *without*
  renormalising: a banned token removes candidates but does not inflate the scores of the others.
- No-repeat n-grams are matched over the whole prefix the step function sees (start token included as
  context), but only generated tokens are ever banned, so ``no_repeat_ngram=1`` means "no generated
  token twice" and never touches the start token.
- A row whose every token is banned is ended: its end token gets log-prob 0 (score unchanged).
- Beam search stops an item when it holds ``beam`` finished hypotheses and its best live one, normalised
  at the current length, cannot beat the worst finished one. This is exact for ``length_penalty <= 0``
  (scores only fall as hypotheses grow) and the usual heuristic for ``length_penalty > 0``.
- Finished rows (greedy/sampling) and finished items (beam) are no longer passed to ``step_fn``.
- Sampling draws all rows from one generator, so its tokens depend on the batch composition; greedy and
  beam search do not (an item decodes the same alone or in a batch).
- ``prefix`` and ``rows`` are on CPU for the first call and then on the device of ``step_fn``'s output;
  a sampling ``generator`` must live on that device too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_NUCLEUS_EPS = 1e-6  # a token whose mass equals top_p up to float rounding still closes the nucleus


@dataclass(frozen=True)
class _Rules:
    start: int
    end: int
    max_new: int
    min_new: int
    repetition_penalty: float
    no_repeat_ngram: int
    banned: tuple[int, ...]


def decode(
    step_fn: StepFn,
    batch_size: int,
    *,
    start_token: int,
    end_token: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    beam: int = 1,
    top_p: float | None = None,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram: int = 0,
    length_penalty: float = 1.0,
    banned_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """One token list per batch item: the generated tokens WITHOUT the start token and WITHOUT the end token.

    ``step_fn(prefix, rows)`` gets ``prefix`` (N, t) token ids (each row starts with ``start_token``) and
    ``rows`` (N,), the batch item of each row, and returns (N, V) normalised next-token log-probs.
    Greedy when ``beam == 1`` and ``top_p is None``; nucleus sampling (``temperature``, ``generator``)
    when ``top_p`` is set; beam search when ``beam > 1``, ranking finished hypotheses by
    ``sum_logprob / len ** length_penalty`` with ``len`` counting the end token.
    ``max_new_tokens`` counts the end token; a sequence that hits it without one is returned truncated.
    The end token is forbidden until ``min_new_tokens`` tokens have been generated.
    """
    _validate(batch_size, start_token, end_token, max_new_tokens, min_new_tokens, beam, top_p, temperature,
              repetition_penalty, no_repeat_ngram, length_penalty, banned_tokens)  # fmt: skip
    if batch_size == 0:
        return []
    rules = _Rules(start_token, end_token, max_new_tokens, min_new_tokens, float(repetition_penalty),
                   no_repeat_ngram, tuple(banned_tokens))  # fmt: skip
    if beam == 1:
        return _decode_rows(step_fn, batch_size, rules, top_p, temperature, generator)
    return _beam_search(step_fn, batch_size, beam, rules, float(length_penalty))


def _validate(
    batch_size: int,
    start: int,
    end: int,
    max_new: int,
    min_new: int,
    beam: int,
    top_p: float | None,
    temperature: float,
    rep: float,
    ngram: int,
    length_penalty: float,
    banned: Sequence[int],
) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(batch_size >= 0, f"batch_size must be >= 0, got {batch_size}")
    need(start >= 0 and end >= 0, f"token ids must be >= 0, got start={start} end={end}")
    need(all(t >= 0 for t in banned), f"banned_tokens must be >= 0, got {list(banned)}")
    need(max_new >= 1, f"max_new_tokens must be >= 1, got {max_new}")
    need(0 <= min_new <= max_new, f"min_new_tokens must be in [0, max_new_tokens={max_new}], got {min_new}")
    need(beam >= 1, f"beam must be >= 1, got {beam}")
    need(top_p is None or beam == 1, "top_p (sampling) cannot be combined with beam > 1")
    need(top_p is None or 0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}")
    need(temperature > 0.0, f"temperature must be > 0, got {temperature}")
    need(rep >= 1.0, f"repetition_penalty must be >= 1, got {rep}")
    need(ngram >= 0, f"no_repeat_ngram must be >= 0, got {ngram}")
    need(math.isfinite(length_penalty), f"length_penalty must be finite, got {length_penalty}")


def _step(step_fn: StepFn, prefix: torch.Tensor, rows: torch.Tensor, rules: _Rules) -> torch.Tensor:
    """Call the model and apply all constraints: (N, t) prefixes -> (N, V) float32 log-probs."""
    lp = step_fn(prefix, rows)  # (N, V)
    if lp.dim() != 2 or lp.shape[0] != prefix.shape[0]:
        raise ValueError(f"step_fn must return (N={prefix.shape[0]}, V) log-probs, got {tuple(lp.shape)}")
    n, v = lp.shape
    if max(rules.start, rules.end, *rules.banned) >= v:
        raise ValueError(f"token ids must be < vocabulary size {v}")
    lp = lp.float()  # scores accumulate over many steps; half precision would drift
    prefix = prefix.to(lp.device)
    if rules.repetition_penalty != 1.0 and prefix.shape[1] > 1:
        seen = torch.zeros(n, v, dtype=torch.bool, device=lp.device).scatter_(1, prefix[:, 1:], True)  # (N, V)
        lp = torch.where(seen, lp * rules.repetition_penalty, lp).log_softmax(-1)  # (N, V)
    ban = torch.zeros(n, v, dtype=torch.bool, device=lp.device)  # (N, V)
    if rules.banned:
        ban[:, list(rules.banned)] = True
    if prefix.shape[1] - 1 < rules.min_new:
        ban[:, rules.end] = True
    if rules.no_repeat_ngram:
        ban |= _ngram_ban(prefix, rules.no_repeat_ngram, v)
    lp = lp.masked_fill(ban, float("-inf"))  # (N, V)
    stuck = torch.isneginf(lp).all(-1)  # (N,)
    lp[stuck, rules.end] = 0.0
    return lp


def _ngram_ban(prefix: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """(N, t) prefixes -> (N, V) mask of tokens that would complete an n-gram already in the prefix."""
    t = prefix.shape[1]
    first = 1 if n == 1 else 0  # a 1-gram's token would be the start token itself: never banned
    if t - n + 1 - first <= 0:
        return torch.zeros(prefix.shape[0], vocab, dtype=torch.bool, device=prefix.device)
    grams = prefix.unfold(1, n, 1)[:, first:]  # (N, G, n)
    context = prefix[:, t - n + 1 :]  # (N, n-1)
    match = (grams[:, :, :-1] == context[:, None, :]).all(-1)  # (N, G)
    hits = torch.zeros(prefix.shape[0], vocab, dtype=torch.long, device=prefix.device)  # (N, V)
    return hits.scatter_add_(1, grams[:, :, -1], match.long()) > 0


def _sample(lp: torch.Tensor, top_p: float, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2020) from (N, V) log-probs -> (N,) token ids."""
    probs = (lp / temperature).softmax(-1)  # (N, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (N, V)
        before = sorted_p.cumsum(-1) - sorted_p  # (N, V) mass of the more likely tokens
        keep_sorted = before < top_p - _NUCLEUS_EPS  # (N, V)
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)  # (N, V)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)  # (N, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)


def _decode_rows(
    step_fn: StepFn,
    batch_size: int,
    rules: _Rules,
    top_p: float | None,
    temperature: float,
    generator: torch.Generator | None,
) -> list[list[int]]:
    """Greedy (``top_p is None``) or sampled decoding, one row per item."""
    prefix = torch.full((batch_size, 1), rules.start, dtype=torch.long)  # (B, t)
    done = torch.zeros(batch_size, dtype=torch.bool)  # (B,)
    for _ in range(rules.max_new):
        live = (~done).nonzero().squeeze(1)  # (n,)
        if live.numel() == 0:
            break
        lp = _step(step_fn, prefix[live], live, rules)  # (n, V)
        prefix, done, live = prefix.to(lp.device), done.to(lp.device), live.to(lp.device)
        tok = lp.argmax(-1) if top_p is None else _sample(lp, top_p, temperature, generator)  # (n,)
        new = torch.full((batch_size,), rules.end, dtype=torch.long, device=lp.device)  # (B,) finished rows pad
        new[live] = tok
        done[live] = tok == rules.end
        prefix = torch.cat([prefix, new[:, None]], 1)  # (B, t+1)
    return [seq[: seq.index(rules.end)] if rules.end in seq else seq for seq in prefix[:, 1:].tolist()]


def _beam_search(step_fn: StepFn, batch_size: int, beam: int, rules: _Rules, length_penalty: float) -> list[list[int]]:
    """Beam search batched over items and beams; finished items leave the step batch."""
    seqs = torch.full((batch_size, beam, 1), rules.start, dtype=torch.long)  # (B, K, t)
    scores = torch.zeros(batch_size, beam)  # (B, K)
    scores[:, 1:] = float("-inf")  # at step 0 all beams are equal: only the first may expand, or beams duplicate
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch_size)]  # per item, best first
    active = list(range(batch_size))
    for step in range(rules.max_new):
        length = step + 1  # generated tokens after this step, end token included
        act = torch.tensor(active, device=seqs.device)  # (A,)
        t = seqs.shape[2]
        lp = _step(step_fn, seqs[act].reshape(-1, t), act.repeat_interleave(beam), rules)  # (A*K, V)
        seqs, scores, act = seqs.to(lp.device), scores.to(lp.device), act.to(lp.device)
        n_act, vocab = len(active), lp.shape[1]
        prev = seqs[act]  # (A, K, t)
        total = (scores[act][:, :, None] + lp.view(n_act, beam, vocab)).view(n_act, beam * vocab)  # (A, K*V)
        cand, idx = total.topk(min(2 * beam, beam * vocab), dim=1)  # (A, C) sorted best first
        parent, tok = idx // vocab, idx % vocab  # (A, C)
        is_end = tok == rules.end  # (A, C)
        live_score, pick = cand.masked_fill(is_end, float("-inf")).topk(beam, dim=1)  # (A, K)
        keep_parent = parent.gather(1, pick)  # (A, K)
        grown = prev.gather(1, keep_parent[:, :, None].expand(-1, -1, t))  # (A, K, t)
        grown = torch.cat([grown, tok.gather(1, pick)[:, :, None]], 2)  # (A, K, t+1)
        seqs = torch.cat([seqs, torch.full_like(seqs[:, :, :1], rules.end)], 2)  # (B, K, t+1) done items pad
        seqs[act] = grown
        scores[act] = live_score

        # Bookkeeping of finished hypotheses is per item and small: do it on the host.
        ends = (is_end & torch.isfinite(cand)).nonzero().tolist()
        if ends:
            prev_host, cand_host, parent_host = prev[:, :, 1:].tolist(), cand.tolist(), parent.tolist()
            for a, c in ends:
                tokens = prev_host[a][parent_host[a][c]]
                _add(finished[active[a]], cand_host[a][c] / length**length_penalty, tokens, beam)
        live_host, grown_host = live_score.tolist(), None
        still = []
        for a, item in enumerate(active):
            best_live = live_host[a][0]
            if step == rules.max_new - 1:  # out of room: live hypotheses are returned truncated
                grown_host = grown[:, :, 1:].tolist() if grown_host is None else grown_host
                for k, s in enumerate(live_host[a]):
                    if s != float("-inf"):
                        _add(finished[item], s / length**length_penalty, grown_host[a][k], beam)
            elif best_live == float("-inf"):
                pass  # nothing left to expand
            elif len(finished[item]) < beam or best_live / length**length_penalty > finished[item][-1][0]:
                still.append(item)
        active = still
        if not active:
            break
    return [fin[0][1] if fin else [] for fin in finished]


def _add(fin: list[tuple[float, list[int]]], score: float, tokens: list[int], beam: int) -> None:
    """Insert a finished hypothesis, keeping the ``beam`` best (stable on ties: earlier ones win)."""
    fin.append((score, tokens))
    fin.sort(key=lambda h: -h[0])
    del fin[beam:]
