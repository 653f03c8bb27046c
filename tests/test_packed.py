"""Packed text blocks: the same values and gradients as open_clip's blocks at real positions, padding skipped."""

import pytest
import torch

from mmfusion import create_model
from mmfusion.config import load_config
from mmfusion.models import create_tokenizer
from mmfusion.models.packed import Packing
from mmfusion.models.text import PAD
from tests.conftest import TINY

CAPTIONS = ["a red circle", "there is a small blue star at the top left of a big heart", "a green square"]


def test_packing_keeps_each_row_up_to_its_last_token_and_round_trips():
    tokens = torch.tensor([[5, 7, 9, 0, 0], [5, 0, 8, 9, 0], [5, 6, 0, 0, 0]])  # row 1: a "!" (id 0) inside
    packing = Packing(tokens != PAD)
    assert packing.real.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, False, False, False],
    ]
    assert packing.positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert tokens.flatten()[packing.index][packing.rows_at(torch.tensor([2, 3, 1]))].tolist() == [9, 9, 6]
    x = torch.randn(3, 5, 4)
    packed = packing.pack(x)  # (9, 4)
    assert packed.shape == (9, 4)
    back = packing.unpack(packed)
    torch.testing.assert_close(back[packing.real], x[packing.real])
    assert not back[~packing.real].any()


def test_a_caption_of_padding_only_pools_as_open_clip_does():
    """Hand-made ids (not the tokenizer's) may hold a row of padding only: it keeps position 0, where open_clip's
    argmax pooling reads, wherever it sits in the batch; no row borrows another's state."""
    torch.manual_seed(0)
    model = create_model(load_config("tiny", TINY).model).eval()
    tokens = torch.zeros(3, 32, dtype=torch.long)
    tokens[1] = create_tokenizer(32)(["a red circle"])[0]  # padding-only rows first and last
    assert Packing(tokens != PAD).real.sum(dim=1).tolist() == [1, 5, 1]
    with torch.no_grad():
        pooled, _ = model.text(tokens)
        reference, _ = model.text.transformer(tokens)
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-5)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_text_tower_and_decoder_match_open_clip_in_values_and_gradients(grad_checkpointing):
    """The packed text tower + fusion decoder against open_clip's TextTransformer + MultimodalTransformer run over
    the whole padded grid: same states at real positions, same EOT embedding, same parameter gradients."""
    torch.manual_seed(0)
    cfg = load_config("tiny", [*TINY, "model.fusion.enabled=true", "model.fusion.heads=2"]).model
    model = create_model(cfg).train()
    if grad_checkpointing:
        model.text.set_grad_checkpointing()
        model.fusion.set_grad_checkpointing()
    tokens = create_tokenizer(32)(CAPTIONS)  # (3, 32)
    real = (tokens != PAD)[:, :, None].float()  # (3, 32, 1)
    memory = torch.randn(3, 17, cfg.text.width)
    weights = torch.randn(3, 32, cfg.text.width)  # a loss that reads every real state

    def loss_and_grads(packed: bool):
        model.zero_grad()
        if packed:
            pooled, states = model.text(tokens)  # (3, L', W): up to the longest caption
            hidden = model.fusion.fuse(memory, states, tokens)
        else:  # open_clip's own forward passes over all 32 positions
            pooled, states = model.text.transformer(tokens)
            hidden = model.fusion.decoder(memory, states)
        length = hidden.shape[1]
        loss = (hidden * weights[:, :length] * real[:, :length]).sum() + pooled.square().sum()
        loss.backward()
        return hidden * real[:, :length], pooled, _grads(model)

    hidden, pooled, grads = loss_and_grads(packed=True)
    ref_hidden, ref_pooled, ref_grads = loss_and_grads(packed=False)
    torch.testing.assert_close(hidden, ref_hidden[:, : hidden.shape[1]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any(n.startswith("fusion.decoder") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
