"""Image tokenizer (FSQ autoencoder) and the text-conditioned token generators (masked and autoregressive)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mmfusion.config import GeneratorConfig
from mmfusion.models.generator import (
    AutoregressiveTokenGenerator,
    TokenGenerator,
    cosine_schedule,
    create_generator,
    draw_codes,
    guided_logits,
    masked_cross_entropy,
)
from mmfusion.models.image_tokenizer import (
    FiniteScalarQuantizer,
    ImageTokenizer,
    ImageTokenizerConfig,
    codes_to_ids,
    ids_to_codes,
)

TINY_TOKENIZER = ImageTokenizerConfig(image_size=32, channels=(16, 32))  # 16x16 grid, default levels (8, 5, 5, 5)
TINY_GENERATOR = GeneratorConfig(width=32, depth=1, heads=2)
CODEBOOK, GRID, TEXT_WIDTH = 16, 8, 8  # the generator's sizes that the tokenizer and text tower fix


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machines running this suite are shared with training jobs; these tensors are too small to need more.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rectangles(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: plain or gradient backgrounds with 1-3 flat-coloured rectangles."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 3, size, size)
    ramp = torch.linspace(0, 1, size)
    for i in range(n):
        a, b = torch.rand(2, 3, 1, 1, generator=g) * 2 - 1
        t = ramp.view(1, 1, size) if torch.rand(1, generator=g) < 0.5 else ramp.view(1, size, 1)
        images[i] = a + (b - a) * t if torch.rand(1, generator=g) < 0.5 else a.expand(3, size, size)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            h, w = torch.randint(size // 4, size // 2 + 1, (2,), generator=g).tolist()
            y = int(torch.randint(0, size - h + 1, (1,), generator=g))
            x = int(torch.randint(0, size - w + 1, (1,), generator=g))
            images[i, :, y : y + h, x : x + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return images


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / (a - b).pow(2).mean().item())  # peak-to-peak range 2 for [-1, 1]


# --- FSQ -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4), (7,)])
def test_codes_and_ids_are_exact_inverses_over_the_whole_codebook(levels):
    size = math.prod(levels)
    grids = torch.meshgrid(*[torch.arange(n) for n in levels], indexing="ij")
    codes = torch.stack(grids, dim=-1).reshape(-1, len(levels))  # every code combination
    ids = codes_to_ids(codes, levels)
    assert sorted(ids.tolist()) == list(range(size))
    assert torch.equal(ids_to_codes(ids, levels), codes)
    assert torch.equal(codes_to_ids(ids_to_codes(torch.arange(size), levels), levels), torch.arange(size))


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4, 6)])
def test_quantiser_uses_every_level_and_outputs_lie_on_the_level_grid(levels):
    fsq = FiniteScalarQuantizer(levels)
    z = torch.linspace(-8, 8, 4001)[:, None].expand(-1, len(levels))  # (S, d): a sweep through every cell
    latents, ids = fsq(z)
    steps = latents * fsq.half_width  # integer levels
    assert torch.equal(steps, steps.round())
    for i, n in enumerate(levels):
        # Even levels are not symmetric: n // 2 below zero, n // 2 - 1 above it (the half-step offset).
        assert steps[:, i].unique().tolist() == list(range(-(n // 2), n - n // 2))
    assert latents.abs().max() <= 1
    assert torch.equal(fsq(torch.zeros(1, len(levels)))[0], torch.zeros(1, len(levels)))  # 0 stays 0, also even n
    assert ids.min() >= 0 and ids.max() < fsq.codebook_size


def test_every_id_is_reached_by_the_quantiser_and_decodes_back_to_itself():
    fsq = FiniteScalarQuantizer((8, 5, 5, 5))
    ids = torch.arange(fsq.codebook_size)
    levels = fsq.ids_to_latents(ids) * fsq.half_width  # (1000, 4) integer levels
    # Invert the squash at each level's centre: the pre-quantisation value that lands exactly there.
    z = torch.atanh((levels + fsq.offset) / fsq.half_range) - fsq.shift
    latents, back = fsq(z)
    assert torch.equal(back, ids)
    assert torch.allclose(latents, fsq.ids_to_latents(ids))


def test_tokenizer_decodes_every_token_id_to_a_finite_image_in_range():
    torch.manual_seed(0)
    tok = ImageTokenizer(TINY_TOKENIZER).eval()
    assert tok.codebook_size == 1000 and tok.grid_size == 16
    per_grid = tok.grid_size**2
    ids = torch.arange(math.ceil(tok.codebook_size / per_grid) * per_grid) % tok.codebook_size
    with torch.no_grad():
        images = tok.decode(ids.view(-1, tok.grid_size, tok.grid_size))
    assert images.shape == (4, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError):
        tok.decode(torch.full((1, 16, 16), 1000))


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    tok = ImageTokenizer(TINY_TOKENIZER)
    out = tok(_rectangles(2, 32, seed=0))
    assert out["tokens"].shape == (2, 16, 16) and out["recon"].shape == (2, 3, 32, 32)
    out["loss"].backward()
    grad = tok.encoder.net[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_short_tokenizer_training_reconstructs_beyond_what_a_broken_quantiser_could():
    torch.manual_seed(0)
    images = _rectangles(16, 32, seed=1)
    tok = ImageTokenizer(TINY_TOKENIZER)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = tok(images)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    with torch.no_grad():
        out = tok.eval()(images)
        recon = tok.decode(tok.encode(images))
    torch.testing.assert_close(recon, out["recon"], rtol=0, atol=1e-5)  # encode -> decode is the forward pass
    assert out["loss"].item() < 0.4 * first
    # A quantiser that carried no information (one code) could at best give one image for all inputs; even each
    # image's own mean colour - more than one code could say - falls well short of the trained reconstruction.
    mean_colour = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    assert _psnr(recon, images) > _psnr(mean_colour, images) + 3
    assert out["tokens"].unique().numel() > 20


# --- generator -----------------------------------------------------------------------------------------------


def _generator(**overrides) -> TokenGenerator | AutoregressiveTokenGenerator:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_GENERATOR, **overrides)
    return create_generator(cfg, CODEBOOK, GRID, TEXT_WIDTH)


KINDS = pytest.mark.parametrize("kind", ["masked", "autoregressive"])


def _text(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, 5, TEXT_WIDTH, generator=g)  # (B, L, Wt)
    mask = torch.arange(5)[None, :] < torch.randint(1, 6, (batch, 1), generator=g)  # (B, L): padding at the end
    return states, mask


def test_cosine_schedule():
    assert cosine_schedule(0.0) == 1.0 and cosine_schedule(1.0) == 0.0
    r = torch.linspace(0, 1, 101)
    ratio = cosine_schedule(r)
    assert ratio[0] == 1 and ratio[-1] == 0
    assert (ratio.diff() < 0).all()
    assert torch.allclose(ratio, torch.tensor([cosine_schedule(x) for x in r.tolist()]), atol=1e-6)


def test_guided_logits():
    cond, uncond = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert torch.equal(guided_logits(cond, uncond, 0.0), uncond)
    assert torch.allclose(guided_logits(cond, uncond, 1.0), cond)
    assert torch.allclose(guided_logits(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_masked_counts_follow_the_cosine_schedule():
    model = _generator()
    n = model.num_tokens
    tokens = torch.randint(0, 16, (2000, n))
    inputs, mask = model.mask_tokens(tokens, torch.Generator().manual_seed(3))
    r = torch.rand(2000, generator=torch.Generator().manual_seed(3))  # the first draw, as documented
    expected = torch.ceil(torch.cos(math.pi / 2 * r) * n).long().clamp(1, n)
    assert torch.equal(mask.sum(dim=1), expected)
    assert mask.sum(dim=1).min() >= 1 and mask.sum(dim=1).max() <= n
    assert torch.equal(inputs[mask], torch.full_like(inputs[mask], model.mask_id))
    assert torch.equal(inputs[~mask], tokens[~mask])
    assert abs(mask.float().mean().item() - 2 / math.pi) < 0.03  # E[cos(pi r / 2)] for r ~ U(0, 1)


def test_loss_is_finite_and_only_masked_positions_contribute():
    model = _generator(cond_dropout=0.0)
    tokens = torch.randint(0, 16, (4, model.num_tokens))
    states, mask = _text(4)
    seen = {}
    model.token_embed.register_forward_pre_hook(lambda _m, args: seen.update(inputs=args[0]))

    def keep_logits(_m, _args, out):
        out.retain_grad()
        seen["logits"] = out

    model.head.register_forward_hook(keep_logits)
    loss, metrics = model.loss(tokens, states, mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(metrics) == {"loss", "acc", "mask_ratio"}
    loss.backward()
    masked = seen["inputs"] == model.mask_id  # (B, N)
    grad = seen["logits"].grad  # (B, N, V)
    assert grad[~masked].abs().max() == 0 and (grad[masked].abs().sum(dim=-1) > 0).all()

    # The same through the public helper: targets at unmasked places do not matter.
    logits, targets = torch.randn(4, model.num_tokens, 16), tokens.clone()
    targets[~masked] = (targets[~masked] + 1) % 16
    assert torch.equal(masked_cross_entropy(logits, tokens, masked), masked_cross_entropy(logits, targets, masked))


@KINDS
def test_full_condition_dropout_makes_the_loss_independent_of_the_text(kind):
    tokens = torch.randint(0, 16, (4, GRID**2))
    (a, mask_a), (b, mask_b) = _text(4, seed=1), _text(4, seed=2)

    def loss(model, states, mask):
        return model.loss(tokens, states, mask, generator=torch.Generator().manual_seed(0))[0]

    dropped = _generator(kind=kind, cond_dropout=1.0).train()
    torch.testing.assert_close(loss(dropped, a, mask_a), loss(dropped, b, mask_b), rtol=0, atol=1e-6)
    kept = _generator(kind=kind, cond_dropout=0.0).train()
    assert not torch.allclose(loss(kept, a, mask_a), loss(kept, b, mask_b))


def test_sampling_is_seeded_complete_and_follows_the_schedule():
    model = _generator().eval()
    states, mask = _text(3)
    n = model.num_tokens

    def sample(seed, **kw):
        return model.sample(states, mask, generator=torch.Generator().manual_seed(seed), **kw)

    first = sample(0)
    assert torch.equal(first, sample(0)) and not torch.equal(first, sample(1))
    for out in (first, sample(0, steps=1), sample(0, guidance=1.0, temperature=0.0), sample(0, choice_noise=4.5)):
        assert out.shape == (3, n) and out.dtype == torch.long
        assert (out != model.mask_id).all() and out.min() >= 0 and out.max() < model.codebook_size

    history = []
    steps = 5
    tokens = model.sample(states, mask, steps=steps, callback=lambda t, x: history.append((t, x.clone())))
    assert [t for t, _ in history] == list(range(steps))
    previous = torch.full_like(tokens, model.mask_id)
    for t, state in history:
        fixed = state != model.mask_id
        expected = n if t == steps - 1 else n - math.ceil(math.cos(math.pi / 2 * (t + 1) / steps) * n)
        assert (fixed.sum(dim=1) == expected).all()
        was_fixed = previous != model.mask_id
        assert torch.equal(state[was_fixed], previous[was_fixed])  # fixed tokens are never revisited
        previous = state
    assert torch.equal(history[-1][1], tokens)


@KINDS
def test_short_generator_training_lowers_the_loss(kind):
    model = _generator(kind=kind, cond_dropout=0.1)
    g = torch.Generator().manual_seed(0)
    grids = torch.randint(0, 16, (2, model.num_tokens), generator=g)  # one fixed grid per "caption"
    states, mask = _text(2, seed=5)
    tokens, states, mask = grids.repeat(8, 1), states.repeat(8, 1, 1), mask.repeat(8, 1)  # B = 16

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model.loss(tokens, states, mask, generator=torch.Generator().manual_seed(123))[0].item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        loss, _ = model.loss(tokens, states, mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before
    # The text steers guided sampling: each caption's samples mostly reproduce its grid (chance is 1 / 16).
    samples = model.eval().sample(states[:2], mask[:2], generator=torch.Generator().manual_seed(0))
    assert ((samples == grids).float().mean(dim=1) > 0.5).all()


def test_autoregressive_logits_only_read_earlier_tokens():
    model = _generator(kind="autoregressive").eval()
    states, mask = _text(2)
    tokens = torch.randint(0, 16, (2, model.num_tokens))
    changed = tokens.clone()
    j = 20
    changed[:, j] = (changed[:, j] + 1) % 16
    with torch.no_grad():
        a, b = model(tokens, states, mask), model(changed, states, mask)
        prefix = model(tokens[:, : j + 1], states, mask)  # a shorter input gives the same rows
    assert torch.equal(a[:, : j + 1], b[:, : j + 1])  # row i predicts token i from tokens before it
    assert not torch.allclose(a[:, j + 1], b[:, j + 1])
    torch.testing.assert_close(prefix, a[:, : j + 1])


def test_autoregressive_sampling_is_seeded_and_draws_what_the_model_predicts():
    model = _generator(kind="autoregressive").eval()
    states, mask = _text(3)

    def sample(seed, **kw):
        return model.sample(states, mask, generator=torch.Generator().manual_seed(seed), **kw)

    first = sample(0)
    assert torch.equal(first, sample(0)) and not torch.equal(first, sample(1))
    assert first.shape == (3, model.num_tokens) and first.min() >= 0 and first.max() < model.codebook_size
    # Greedy sampling, token by token, equals the argmax of one teacher-forced pass over its own output.
    for guidance in (1.0, 2.5):
        greedy = sample(0, guidance=guidance, temperature=0.0)
        with torch.no_grad():
            drop = torch.tensor([False] * 3 + [True] * 3)
            both = model(greedy.repeat(2, 1), states.repeat(2, 1, 1), mask.repeat(2, 1), drop)
        assert torch.equal(guided_logits(both[:3], both[3:], guidance).argmax(dim=-1), greedy)
    history = []
    model.sample(states, mask, callback=lambda t, x: history.append((x != model.mask_id).sum(dim=1)))
    assert [int(n[0]) for n in history] == list(range(1, model.num_tokens + 1))


def test_top_k_draws_only_among_the_k_most_probable_codes():
    logits = torch.randn(500, 16)
    g = torch.Generator().manual_seed(0)
    codes, _ = draw_codes(logits, 1.0, 1, g)
    assert torch.equal(codes, logits.argmax(dim=-1))
    codes, filtered = draw_codes(logits, 2.0, 3, g)
    top3 = logits.topk(3, dim=-1).indices
    assert (codes[:, None] == top3).any(dim=1).all()
    assert (codes != logits.argmax(dim=-1)).any()  # it still samples among the three
    assert torch.isinf(filtered).sum(dim=1).eq(13).all()
    assert torch.equal(draw_codes(logits, 0.0, 0, g)[0], logits.argmax(dim=-1))


# --- text conditioning ------------------------------------------------------------------------------------------


def _text_to_image(word_memory: bool):
    from mmfusion.config import ModelConfig, TextConfig
    from mmfusion.models.text_to_image import TextToImageModel

    cfg = ModelConfig(
        kind="text_to_image",
        text=TextConfig(context_length=8, width=16, depth=1, heads=2),
        image_tokenizer=TINY_TOKENIZER,
        generator=GeneratorConfig(width=32, depth=1, heads=2, word_memory=word_memory),
    )
    torch.manual_seed(0)
    return TextToImageModel(cfg).eval()


@pytest.mark.parametrize("word_memory", [False, True])
def test_word_memory_lets_the_generator_read_words_the_text_tower_does_not_pass_on(word_memory):
    model = _text_to_image(word_memory)
    # A tower whose final norm outputs zeros carries no information about the prompt.
    torch.nn.init.zeros_(model.text.transformer.ln_final.weight)
    torch.nn.init.zeros_(model.text.transformer.ln_final.bias)
    prompts = torch.tensor([[49406, 736, 49407, 0, 0, 0, 0, 0], [49406, 1746, 49407, 0, 0, 0, 0, 0]])  # red / blue
    memory, mask = model._text(prompts)
    assert memory.shape[1] == (6 if word_memory else 3) and mask.all()  # cut at the longest prompt: no padding keys
    masked = torch.full((2, model.generator.num_tokens), model.generator.mask_id)
    with torch.no_grad():
        logits = model.generator(masked, memory, mask)
    assert torch.allclose(logits[0], logits[1]) != word_memory


def test_cutting_the_memory_at_the_longest_prompt_changes_no_logit():
    model = _text_to_image(word_memory=True)
    prompts = torch.tensor([[49406, 736, 2445, 49407, 0, 0, 0, 0], [49406, 1746, 49407, 0, 0, 0, 0, 0]])
    memory, mask = model._text(prompts)
    assert memory.shape[1] == 8 and mask.sum(1).tolist() == [8, 6]
    _, states = model.text.transformer(prompts)  # open_clip's pass over the whole context, padding included
    words = torch.nn.functional.layer_norm(model.text.transformer.token_embedding(prompts), (16,))
    full, full_mask = torch.cat([states, words], 1), (prompts != 0).repeat(1, 2)
    tokens = torch.randint(0, model.generator.mask_id + 1, (2, model.generator.num_tokens))
    with torch.no_grad():
        torch.testing.assert_close(model.generator(tokens, memory, mask), model.generator(tokens, full, full_mask))
