"""Contracts every shipped model config must satisfy (parametrised over list_models())."""

import pytest
import torch

from mmfusion.config import load_config
from mmfusion.models import create_model, create_tokenizer, list_models
from mmfusion.models.audio import num_frames
from mmfusion.train.checkpoint import load_weights, save_checkpoint

SHALLOW = {"vision": {"depth": 1}, "text": {"depth": 1}}  # real widths/patches/sizes, one block each


CONTRASTIVE = [n for n in list_models() if load_config(n).model.kind == "clip"]


@pytest.mark.parametrize("name", [n for n in list_models() if n not in CONTRASTIVE])
def test_generation_models_train_every_trainable_parameter(name):
    """Each stage of a text_to_image recipe: forward gives a finite loss whose gradient reaches every trainable
    parameter (DDP needs that), and the frozen tokenizer of stage 2 gets none."""
    torch.manual_seed(0)
    cfg = load_config(name).model
    tokens = create_tokenizer(cfg.text.context_length)(["a red circle", "two blue squares above a star"])
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "text": tokens}
    for kind in ("image_tokenizer", "text_to_image"):
        model = create_model(cfg, kind=kind)
        loss = model(batch)["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        for pname, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            else:
                assert kind == "text_to_image" and pname.startswith("tokenizer."), pname


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_forward_backward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, **SHALLOW)
    cfg = model.cfg
    size, ctx = cfg.vision.image_size, cfg.text.context_length
    tokens = create_tokenizer(ctx)(["a red circle", "two blue squares above a star"])
    batch = {"image": torch.randn(2, 3, size, size), "text": tokens}
    if cfg.audio.enabled:  # e.g. tiny-audio
        batch["audio"] = torch.randn(2, cfg.audio.n_mels, num_frames(cfg.audio))
    out = model(batch, fusion=cfg.fusion.enabled)  # e.g. tiny-fusion: the captioning and matching losses too
    n_patches = (size // cfg.vision.patch_size) ** 2
    assert out["image_features"].shape == (2, cfg.embed_dim)
    assert out["text_features"].shape == (2, cfg.embed_dim)
    assert out["image_tokens"].shape == (2, 1 + n_patches, cfg.vision.width)
    assert out["text_tokens"].shape == (2, int((tokens != 0).sum(1).max()), cfg.text.width)  # up to the last token
    for key in ("image_features", "text_features"):
        assert torch.isfinite(out[key]).all()
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(2))
    loss = (out["image_features"] @ out["text_features"].T).sum() * out["logit_scale"]
    if cfg.audio.enabled:
        assert out["audio_features"].shape == (2, cfg.embed_dim)
        loss = loss + (out["audio_features"] @ out["text_features"].T).sum()
    if cfg.fusion.enabled:
        loss = loss + out["caption_loss"] + out["match_loss"]
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_save_load_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny", **SHALLOW)
    path = save_checkpoint(tmp_path, 1, model, None, {"config": {}})
    other = create_model("tiny", **SHALLOW)
    assert not torch.equal(other.visual.proj.weight, model.visual.proj.weight)  # a different random init
    load_weights(path, other)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_conv_stem_tokens_checkpoint_and_batch_independence(tmp_path):
    """vision.stem=conv: the token grid of its patch size, every stem parameter trained, outputs that survive a
    checkpoint round trip, and no batch statistics: an image's features do not depend on its batch, in train mode."""
    torch.manual_seed(0)
    model = create_model("tiny", vision={"depth": 1, "stem": "conv", "patch_size": 16}, text={"depth": 1})
    stem = model.visual.trunk.patch_embed.backbone
    strides = [m.stride for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert strides.count((2, 2)) == 4  # 64 -> 4x4 tokens in four stride-2 steps (plus tiny's full-resolution conv)
    images = torch.rand(4, 3, 64, 64)
    features, tokens = model.visual(images)  # train mode
    assert tokens.shape == (4, 1 + 16, model.cfg.vision.width)
    features.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.visual(images[:1])[0], features[:1], rtol=1e-4, atol=1e-5)

    path = save_checkpoint(tmp_path, 1, model, None, {"config": {}})
    other = create_model("tiny", vision={"depth": 1, "stem": "conv", "patch_size": 16}, text={"depth": 1})
    load_weights(path, other)
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other.visual(images)[0], model.visual(images)[0], rtol=0, atol=0)


def test_conv_stem_width_sets_its_channels():
    """vision.stem_width: the last stem stage has that many channels and each earlier one half as many; 0 keeps the
    layout of earlier checkpoints (ending at width / 2), so they still load."""

    def channels(**overrides):
        vision = {"depth": 1, "stem": "conv", "patch_size": 16, "stem_full_res_width": 0, "stem_half_res_width": 0}
        vision.update(overrides)
        model = create_model("tiny", vision=vision, text={"depth": 1})
        return [m.out_channels for m in model.visual.trunk.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]

    assert channels(width=128, stem_width=0) == [8, 16, 32, 64]  # tiny sets 256: pin the default
    assert channels(width=256, stem_width=0) == [16, 32, 64, 128]
    assert channels(width=128, stem_width=256) == [32, 64, 128, 256]
    assert channels(width=128, stem_width=16) == [8, 8, 8, 16]  # never thinner than 8


def test_conv_stem_full_res_block_keeps_the_resolution_and_the_token_grid():
    """vision.stem_full_res_width adds one stride-1 block ahead of the stride-2 stages; 0 adds none (older layout)."""
    vision = {"depth": 1, "stem": "conv", "patch_size": 16, "width": 128, "stem_width": 256, "stem_half_res_width": 0}
    stem = create_model("tiny", vision={**vision, "stem_full_res_width": 8}, text={"depth": 1}).visual.trunk
    convs = [m for m in stem.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride) for c in convs] == [(8, (1, 1)), (32, (2, 2)), (64, (2, 2)), (128, (2, 2))] + [
        (256, (2, 2))
    ]
    assert stem.patch_embed.backbone[:3](torch.zeros(1, 3, 64, 64)).shape == (1, 8, 64, 64)
    assert stem(torch.zeros(2, 3, 64, 64)).shape == (2, 128)  # still a 4x4 grid behind the CLS token
    plain = create_model("tiny", vision={**vision, "stem_full_res_width": 0}, text={"depth": 1}).visual.trunk
    assert [m.stride for m in plain.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 4
    # vision.stem_half_res_width: one more stride-1 block after the first stride-2 one, at 32 px.
    both = {**vision, "stem_full_res_width": 8, "stem_half_res_width": 32}
    stem = create_model("tiny", vision=both, text={"depth": 1}).visual.trunk
    convs = [m for m in stem.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(8, 1), (32, 2), (32, 1), (64, 2), (128, 2), (256, 2)]
    assert stem.patch_embed.backbone[:9](torch.zeros(1, 3, 64, 64)).shape == (1, 32, 32, 32)
    assert stem(torch.zeros(2, 3, 64, 64)).shape == (2, 128)


def test_text_pooling_is_at_eot():
    """The text embedding must not change when padding after EOT changes (EOT pooling, causal mask)."""
    torch.manual_seed(0)
    model = create_model("tiny", **SHALLOW).eval()
    tokens = create_tokenizer(32)(["a red circle"])
    altered = tokens.clone()
    eot = int(tokens.argmax())
    altered[0, eot + 1 :] = 123  # garbage after EOT
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(altered))


def test_text_tower_stops_at_the_longest_caption_with_open_clips_result():
    """The tower runs only on real tokens, up to the batch's last one; embeddings and the states of real tokens
    match open_clip's full-context pass, and padding states are zero."""
    torch.manual_seed(0)
    model = create_model("tiny", **SHALLOW).eval()
    tokens = create_tokenizer(32)(["a red circle", "there is a small blue star at the top left of a big heart"])
    longest = int((tokens != 0).sum(dim=1).max())
    with torch.no_grad():
        pooled, states = model.text(tokens)
        full_pooled, full_states = model.text.transformer(tokens)  # open_clip's forward over all 32 positions
    assert states.shape[1] == longest < 32
    torch.testing.assert_close(pooled, full_pooled, rtol=1e-5, atol=1e-5)
    real = (tokens != 0)[:, :longest]  # a prefix in each row: "!" (id 0) never occurs in these captions
    torch.testing.assert_close(states[real], full_states[:, :longest][real], rtol=1e-5, atol=1e-5)
    assert not states[~real].any()
    with torch.no_grad():  # a prefix without padding (what caption decoding feeds) keeps every position
        assert model.text(tokens[:1, :2])[1].shape[1] == 2


def test_logit_bias_only_when_configured():
    assert create_model("tiny", **SHALLOW).logit_bias is None
    assert create_model("tiny", logit_bias=True, **SHALLOW).logit_bias is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_model(
        "tiny", vision={"depth": 2, "width": 64, "heads": 2}, text={"depth": 2, "width": 64, "heads": 2}
    )
    batch = {"image": torch.randn(2, 3, 64, 64), "text": create_tokenizer(32)(["a red circle", "a blue star"])}

    def grads():
        model.zero_grad()
        out = model(batch)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.visual.trunk.grad_checkpointing and model.text.transformer.transformer.grad_checkpointing
    checkpointed = grads()
    assert checkpointed.keys() == plain.keys() and len(plain) > 10
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name], msg=name)
