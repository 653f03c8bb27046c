"""The fusion head: captioning loss, hard negatives, joint training, captioning/matching API and reranking."""

import json
import math

import pytest
import torch
from PIL import Image

import mmfusion
from mmfusion import SearchIndex, create_model
from mmfusion.api import ImageLoadError
from mmfusion.config import ConfigError, FusionConfig, load_config
from mmfusion.data.synthetic import make_sample
from mmfusion.models import create_tokenizer
from mmfusion.models.fusion import PAD, sample_hard_negatives
from mmfusion.models.text import caption_text
from mmfusion.train import train
from tests.conftest import TINY, tiny_overrides
from tests.helpers import load_tool

FUSION = ["model.fusion.enabled=true", "model.fusion.depth=1", "model.fusion.heads=2"]
caption_tool = load_tool("caption")


def _tiny_fusion_model(*overrides: str):
    torch.manual_seed(0)
    cfg = load_config("tiny", [*TINY, *FUSION, *overrides]).model
    return create_model(cfg).eval()


def test_captions_read_like_text_not_like_bpe_tokens():
    tokenizer = create_tokenizer(32)
    text = "three shapes: a red circle, a blue star and a cyan cross. at the top!"
    ids = tokenizer([text])[0]
    ids = ids[(ids != PAD) & (ids != tokenizer.sot_token_id) & (ids != tokenizer.eot_token_id)]
    assert " , " in tokenizer.decode(ids.tolist())  # what BPE decoding alone gives
    assert caption_text(tokenizer, ids) == caption_text(tokenizer, ids.tolist()) == text


@pytest.mark.parametrize("vocab_order", ["bpe", "data"])
def test_caption_loss_is_the_mean_over_real_tokens_only(vocab_order):
    model = _tiny_fusion_model(f"model.fusion.vocab_order={vocab_order}", "model.fusion.caption_focal_gamma=0")
    if vocab_order == "data":  # a shuffled class order: the loss and the decoder's log-probs must still agree
        model.fusion.set_vocab_order(torch.randperm(model.fusion.vocab_size))
    tokens = create_tokenizer(32)(["a red circle", "there is a small blue star at the top left"])  # (2, 32)
    _, image_tokens = model.visual(torch.randn(2, 3, 64, 64))
    _, states = model.text.transformer(tokens)  # open_clip's full-context pass: (2, 32, W)
    head = model.fusion
    hidden = head.fuse(head.memory(image_tokens)[0], states)  # (2, 32, W): padding positions included
    loss = head.caption_loss(hidden, tokens)

    # By hand: position t predicts token t + 1, for targets up to and including the end token.
    nll = []
    for row in range(2):
        n = int((tokens[row] != PAD).sum())
        log_probs = head.next_token_log_probs(hidden[row, : n - 1])  # (n - 1, V)
        nll += (-log_probs.gather(1, tokens[row, 1:n, None]).squeeze(1)).tolist()
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert len(nll) == int((tokens != PAD).sum()) - 2  # every real token but the two start tokens
    # Trimming the padded tail (what training does) changes nothing.
    length = int((tokens != PAD).sum(1).max())
    trimmed = head.fuse(head.memory(image_tokens)[0], states[:, :length])
    assert head.caption_loss(trimmed, tokens[:, :length]).item() == pytest.approx(loss.item(), rel=1e-5)


def test_focal_caption_loss_is_the_weighted_mean_that_favours_hard_tokens():
    model = _tiny_fusion_model("model.fusion.caption_focal_gamma=2")
    tokens = create_tokenizer(32)(["a red circle", "there is a small blue star at the top left"])[:, :12]
    _, image_tokens = model.visual(torch.randn(2, 3, 64, 64))
    _, states = model.text(tokens)
    head = model.fusion
    hidden = head.fuse(head.memory(image_tokens)[0], states)
    loss = head.caption_loss(hidden, tokens)

    head.focal_gamma = 0.0
    plain = head.caption_loss(hidden, tokens)
    keep = tokens[:, 1:] != PAD
    log_probs = head.next_token_log_probs(hidden[:, :-1][keep])  # (T, V)
    nll = -log_probs.gather(1, tokens[:, 1:][keep][:, None]).squeeze(1)  # (T,)
    weight = (1 - (-nll).exp()) ** 2
    assert loss.item() == pytest.approx((weight * nll).sum().item() / weight.sum().item(), rel=1e-4)
    assert plain.item() == pytest.approx(nll.mean().item(), rel=1e-5)
    # Harder tokens weigh more, so the focal mean lies above the plain one whenever the tokens differ.
    assert nll.std() > 0 and loss.item() > plain.item()


def test_vocab_order_puts_counted_tokens_in_the_head_and_is_saved(tmp_path):
    """fusion.vocab_order=data: the most frequent ids take the first classes (ties keep the BPE order), and the
    order travels with the weights; with the default (bpe) it is the rotation older checkpoints were trained with."""
    from mmfusion.train.checkpoint import load_weights, save_checkpoint

    torch.manual_seed(0)
    cfg = load_config("tiny", [*TINY, *FUSION, "model.fusion.vocab_order=data"]).model
    model = create_model(cfg)
    head = model.fusion
    vocab = head.vocab_size
    torch.testing.assert_close(head.class_of_id[:3], torch.tensor([2, 3, 4]))  # untrained: the BPE rotation
    counts = torch.zeros(vocab, dtype=torch.long)
    counts[[14615, 16255, 7]] = torch.tensor([5, 9, 5])  # "triangle", "hexagon" and an id the rotation puts early
    head.set_vocab_order(counts)
    assert head.class_of_id[16255] == 0 and head.class_of_id[7] == 1 and head.class_of_id[14615] == 2
    assert head.class_of_id[vocab - 2] == 3  # the first uncounted id in BPE order (the start token)
    assert sorted(head.class_of_id.tolist()) == list(range(vocab))
    with pytest.raises(ValueError, match="shape"):
        head.set_vocab_order(counts[:10])

    path = save_checkpoint(tmp_path, 1, model, None, {"config": {}})
    other = create_model(cfg)
    load_weights(path, other)
    assert torch.equal(other.fusion.class_of_id, head.class_of_id)
    bpe = _tiny_fusion_model("model.fusion.vocab_order=bpe")
    assert "fusion.class_of_id" not in bpe.state_dict()  # the layout of older checkpoints
    assert FusionConfig().vocab_order == "bpe"  # older checkpoints' configs lack the key: they were bpe
    with pytest.raises(ConfigError, match="vocab_order"):
        load_config("tiny", ["model.fusion.vocab_order=alphabetical"])


def test_hard_negatives_skip_positives_and_prefer_similar_items():
    torch.manual_seed(0)
    similarity = torch.tensor([[9.0, 8.0, 0.0, -5.0], [8.0, 9.0, 7.0, 0.0], [0.0, 0.0, 9.0, 5.0], [1, 2, 3, 9.0]])
    positive = torch.eye(4, dtype=torch.bool)
    positive[0, 1] = positive[1, 0] = True  # items 0 and 1 share a caption: never each other's negative
    draws = torch.stack([sample_hard_negatives(similarity, positive) for _ in range(300)])  # (300, 4)
    assert not positive[torch.arange(4), draws].any()
    assert (draws[:, 0] == 2).float().mean() > 0.9  # the most similar non-positive dominates
    # No negative at all (every caption identical): any other column, never the item itself.
    draws = sample_hard_negatives(similarity, torch.ones(4, 4, dtype=torch.bool))
    assert (draws != torch.arange(4)).all()


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_matching_negatives_take_their_share_of_the_batch_and_stay_balanced(share, monkeypatch):
    model = _tiny_fusion_model(f"model.fusion.match_negatives={share}")
    head, batch = model.fusion, 8
    captions = [f"a {c} circle" for c in ("red", "blue", "green", "pink", "white", "black", "brown", "grey")]
    tokens = create_tokenizer(32)(captions)
    _, image_tokens = model.visual(torch.randn(batch, 3, 64, 64))
    _, states = model.text(tokens)
    fused_rows, logits = [], []
    fuse, match_logits = head.fuse, head.match_logits
    monkeypatch.setattr(head, "fuse", lambda memory, *a: fused_rows.append(memory.shape[0]) or fuse(memory, *a))
    monkeypatch.setattr(head, "match_logits", lambda *a: logits.append(match_logits(*a)) or logits[-1])
    out = head.losses(image_tokens, states, tokens, torch.randn(batch, batch))

    negatives = int(share * batch)
    assert fused_rows == [batch, negatives]  # the captioning pass, then only the negatives' pass
    positive, negative = logits
    # Every caption differs, so each mined pair is a negative; positives weigh `share` each: 1 : 1 overall.
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (
        share * bce(positive, torch.ones(batch), reduction="sum")
        + bce(negative, torch.zeros(negatives), reduction="sum")
    ) / (2 * negatives)
    assert out["match_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_fusion_config_is_checked():
    with pytest.raises(ConfigError, match="fusion.heads"):
        load_config("tiny", ["model.fusion.enabled=true", "model.fusion.heads=3"])
    with pytest.raises(ConfigError, match="vocab_cutoffs"):
        load_config("tiny", ["model.fusion.vocab_cutoffs=[10000, 2000]"])
    with pytest.raises(ConfigError, match="match_negatives"):
        load_config("tiny", ["model.fusion.match_negatives=0"])
    with pytest.raises(ConfigError, match="caption_focal_gamma"):
        load_config("tiny", ["model.fusion.caption_focal_gamma=-1"])
    with pytest.raises(ConfigError, match="unknown key 'model.fusion.enable'"):
        load_config("tiny", ["model.fusion.enable=true"])


def test_forward_without_fusion_head_is_a_clear_error():
    model = create_model(load_config("tiny", TINY).model)
    batch = {"image": torch.randn(2, 3, 64, 64), "text": create_tokenizer(32)(["a", "b"])}
    with pytest.raises(ValueError, match="fusion"):
        model(batch, fusion=True)


def test_joint_task_lowers_all_three_losses_on_a_fixed_batch():
    """The joint objective (with gradient-cache accumulation) can fit a small batch: every loss falls."""
    import io

    from mmfusion.data import ImageTransform, load_image
    from mmfusion.train.losses import create_contrastive_loss
    from mmfusion.train.optim import create_optimizer
    from mmfusion.train.tasks import ContrastiveTask, FusionWeights

    cfg = load_config("tiny", [*TINY, *FUSION, "train.lr=2e-3", "train.weight_decay=0"])
    torch.manual_seed(0)
    model = create_model(cfg.model).train()
    samples = [make_sample(i, "train", seed=0) for i in range(16)]
    transform = ImageTransform(64, cfg.model.preprocess)
    batch = {
        "image": torch.stack([transform(load_image(io.BytesIO(s["png"]))) for s in samples]),
        "text": create_tokenizer(32)([s["txt"].decode() for s in samples]),
    }
    micro = [{k: v[:8] for k, v in batch.items()}, {k: v[8:] for k, v in batch.items()}]
    task = ContrastiveTask(create_contrastive_loss("clip"), torch.device("cpu"), fusion=FusionWeights())
    optimizer = create_optimizer(model, cfg.train)
    history = []
    for _ in range(40):
        _, metrics = task.step(model, micro)
        optimizer.step()
        optimizer.zero_grad()
        history.append(metrics)
    for key in ("contrastive_loss", "caption_loss", "match_loss"):
        first, last = history[0][key], sum(h[key] for h in history[-5:]) / 5
        assert last < 0.7 * first, (key, first, last)


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory, synthetic):
    """A short joint run (contrastive + caption + matching) with accumulation; returns its run directory."""
    run = tmp_path_factory.mktemp("fusion") / "run"
    overrides = tiny_overrides(
        synthetic, *FUSION, "train.steps=40", "train.batch_size=16", "train.accum_steps=2", "train.log_every=5",
        "train.lr=2e-3", "train.warmup_steps=5", "model.fusion.vocab_order=data",
        "train.caption_weight=2",  # CoCa's; at tiny's 6 the contrastive loss falls more slowly than 40 steps show
    )  # fmt: skip
    train(load_config("tiny", overrides), run_dir=run, progress=False)
    return run


@pytest.mark.slow
def test_joint_training_run_logs_each_loss_and_reports_fusion_metrics(fusion_run):
    lines = [json.loads(line) for line in (fusion_run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    for key in ("contrastive_loss", "caption_loss"):  # matching needs longer than 40 steps on fresh data
        first, last = train_lines[0][key], train_lines[-1][key]
        assert last < 0.9 * first, (key, first, last)
    assert all(0 < r["match_loss"] < 2 and 0 <= r["match_acc"] <= 1 for r in train_lines)
    evals = [r["eval"] for r in lines if "eval" in r]
    for key in (
        "text_to_image_R@1_reranked",
        "text_to_image_R@1_match_only",
        "caption_BLEU4",
        "caption_CIDEr",
        "caption_attr_acc",
    ):
        assert key in evals[-1] and math.isfinite(evals[-1][key]), key


@pytest.mark.slow
def test_caption_and_match_api(fusion_run, tmp_path):
    model = mmfusion.load(fusion_run)
    assert model.has_fusion
    # vocab_order=data: the run counted its training captions, so every shape word is in the softmax head.
    head = model.model.fusion
    shape_ids = [int(create_tokenizer(32)([word])[0, 1]) for word in ("triangle", "hexagon", "circle", "cross")]
    assert all(head.class_of_id[i] < model.config.model.fusion.vocab_cutoffs[0] for i in shape_ids), shape_ids
    images = [Image.open(__import__("io").BytesIO(make_sample(i, "val", seed=0)["png"])) for i in range(3)]
    greedy = model.caption(images)
    assert len(greedy) == 3 and all(isinstance(c, str) and c for c in greedy)
    assert model.caption(images, beam=3) == model.caption(images, beam=3)
    sampled = model.caption(images, top_p=0.9, temperature=1.5, seed=7)
    assert sampled == model.caption(images, top_p=0.9, temperature=1.5, seed=7)  # seeded: reproducible
    assert [model.caption(images[i : i + 1])[0] for i in range(3)] == greedy  # batching changes nothing

    probs = model.match(images, ["a red circle", "a blue star", "a green square"])
    assert probs.shape == (3,) and ((probs >= 0) & (probs <= 1)).all()
    assert model.match(images[0], ["x", "y"]).shape == (2,)  # one image against several texts

    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        model.caption([images[0], str(not_an_image)])


@pytest.mark.slow
def test_caption_tool(fusion_run, tmp_path, capsys):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(make_sample(i, "val", seed=0)["png"])
    assert caption_tool.main(["--checkpoint", str(fusion_run), *map(str, paths), "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # one caption per image

    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert caption_tool.main(["--checkpoint", str(fusion_run), str(paths[0]), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "notes.txt" in captured.err
    assert caption_tool.main(["--checkpoint", str(fusion_run), ""]) == 2
    assert capsys.readouterr().err.startswith("error: '': not a readable image")  # an empty path is still named


@pytest.mark.slow
def test_rerank_reorders_contrastive_candidates_by_the_matching_head(fusion_run, tmp_path, caplog):
    model = mmfusion.load(fusion_run)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(make_sample(i, "val", seed=0)["png"])
    index = SearchIndex.create(model)
    index.add_images(sorted(folder.glob("*.png")))
    query = "a red circle"
    plain = index.search(query, k=12)
    reranked = index.search(query, k=5, rerank=True)
    assert len(reranked) == 5
    scores = [h.score for h in reranked]
    assert scores == sorted(scores, reverse=True)
    # The fused score: matching logit + temperature x cosine, over the contrastive top 10.
    top = plain[:10]
    logits = model.match([h.id for h in top], query, logits=True)
    fused = logits + model.model.logit_scale.exp().item() * torch.tensor([h.score for h in top])
    expected = [top[i].id for i in fused.argsort(descending=True)[:5].tolist()]
    assert [h.id for h in reranked] == expected
    assert scores == pytest.approx(fused.sort(descending=True).values[:5].tolist(), rel=1e-4, abs=1e-4)

    # An entry without a readable image keeps its place after the reranked ones.
    index.add_embeddings(["raw"], model.encode_text([query]))
    with caplog.at_level("WARNING"):
        hits = index.search(query, k=11, rerank=True, rerank_candidates=11)
    assert hits[-1].id == "raw" and hits[-1].score == float("-inf") and "cannot be re-read" in caplog.text
    with pytest.raises(ValueError, match="text query"):
        index.search(str(folder / "00.png"), rerank=True)


@pytest.mark.slow
def test_rerank_reads_images_back_from_shards(fusion_run, synthetic, tmp_path, caplog):
    from mmfusion.index.build import build_from_shards

    model = mmfusion.load(fusion_run)
    build_from_shards(model, synthetic["val"], tmp_path / "val.idx", progress=False)
    index = SearchIndex.open(tmp_path / "val.idx", model)
    source = index.get_record(index.ids()[0]).source
    assert source["kind"] == "shard" and source["key"] == index.ids()[0]
    with caplog.at_level("WARNING"):
        hits = index.search("a small red circle", k=10, rerank=True)
    assert len(hits) == 10 and "cannot be re-read" not in caplog.text
    assert all(math.isfinite(h.score) for h in hits)  # every candidate was re-read and scored


def test_image_position_embedding_tells_grid_cells_apart_and_skips_weight_decay():
    """fusion.image_position_embedding: the decoder's memory differs between grid cells even where the tower's
    tokens are identical (so it can say where a token is), it is not decayed, and it is off unless asked for."""
    torch.manual_seed(0)
    cfg = load_config("tiny", [*TINY, *FUSION, "model.fusion.image_position_embedding=true"]).model
    model = create_model(cfg)
    grid = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    same = torch.randn(1, 1, cfg.vision.width).expand(2, 1 + grid, -1)  # every token the same vector
    memory, _ = model.fusion.memory(same)
    assert memory.shape == (2, 1 + grid, cfg.text.width)
    assert torch.cdist(memory[0], memory[0]).add(torch.eye(1 + grid) * 1e9).min() > 1.0  # no two cells alike
    assert "fusion.image_pos" in model.no_weight_decay()

    assert not FusionConfig().image_position_embedding  # older fusion checkpoints' configs lack the key
    plain = create_model(load_config("tiny", [*TINY, *FUSION, "model.fusion.image_position_embedding=false"]).model)
    assert plain.fusion.image_pos is None
    memory, _ = plain.fusion.memory(same)
    torch.testing.assert_close(memory[0, 1:], memory[0, :1].expand(grid, -1))  # without it, identical


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_stem_memory_folds_the_stem_map_into_the_decoder_memory(pool, tmp_path):
    """fusion.stem_memory: the tower's pooled embedding and CLS token are what they are without it, each patch token
    gains the projection of the 2x2 block of the stem's map under it (the map one stride-2 stage before the patch
    grid), the captioning loss trains that projection, it round-trips through a checkpoint, and a model without a
    decoder has no such part."""
    from mmfusion.train.checkpoint import load_weights, save_checkpoint

    conv = ["model.vision.stem=conv", "model.vision.patch_size=16", "model.vision.stem_width=32"]
    conv.append(f"model.vision.pool={pool}")
    torch.manual_seed(0)
    cfg = load_config("tiny", [*TINY, *FUSION, *conv, "model.fusion.stem_memory=true"]).model
    model = create_model(cfg)
    plain = create_model(load_config("tiny", [*TINY, *FUSION, *conv]).model)
    plain.visual.load_state_dict({k: v for k, v in model.visual.state_dict().items() if not k.startswith("stem_proj")})

    images = torch.randn(2, 3, 64, 64)
    features, tokens = model.visual(images)
    plain_features, plain_tokens = plain.visual(images)
    assert tokens.shape == plain_tokens.shape == (2, 1 + 4 * 4, cfg.vision.width)  # the memory keeps its length
    torch.testing.assert_close(features, plain_features)  # avg pooling does not average the stem's map in
    torch.testing.assert_close(model.visual(images, with_stem=False)[1], plain_tokens)
    torch.testing.assert_close(tokens[:, 0], plain_tokens[:, 0])
    stem = model.visual.trunk.patch_embed.backbone
    stem_map = stem[: model.visual.stem_tap + 1](images)  # (2, C, 8, 8)
    # The patch token at grid cell (1, 2) (row-major: 1 + 1 * 4 + 2) gains the 2x2 block of rows 2-3, columns 4-5.
    folded = stem_map[:, :, 2:4, 4:6].reshape(2, -1)  # pixel_unshuffle's order: channel, then dy, then dx
    expected = plain_tokens[:, 7] + model.visual.stem_proj(folded)
    torch.testing.assert_close(tokens[:, 7], expected)
    assert not any(m._forward_hooks for m in model.modules())  # the tap is there for one forward only
    assert model.fusion.image_pos.shape[1] == tokens.shape[1]

    batch = {"image": images, "text": create_tokenizer(32)(["a red circle", "a small blue square on the left"])}
    model(batch, fusion=True)["caption_loss"].backward()
    assert model.visual.stem_proj[0].weight.grad.abs().sum() > 0

    other = create_model(cfg)
    load_weights(save_checkpoint(tmp_path, 1, model, None, {"config": {}}), other)
    torch.testing.assert_close(other.visual(images)[1], tokens)

    contrastive = create_model(load_config("tiny", [*TINY, *conv, "model.fusion.stem_memory=true"]).model)
    assert contrastive.visual.stem_proj is None  # an unused parameter would break DDP
    with pytest.raises(ConfigError, match="stem_memory"):  # TINY's patch stem has no map to read
        load_config("tiny", [*TINY, *FUSION, "model.fusion.stem_memory=true"])
