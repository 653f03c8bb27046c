"""Losses against naive reference computations, and gradient accumulation against one big batch."""

import math

import torch
import torch.nn.functional as F

from mmfusion.models import create_model, create_tokenizer
from mmfusion.train.losses import contrastive_loss, create_contrastive_loss
from mmfusion.train.tasks import ContrastiveTask


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_matches_naive_infonce():
    image, text = _features()
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    naive = 0.0
    for i in range(len(image)):  # written out per row, the way the paper states it
        naive += -math.log(logits[i].softmax(0)[i]) / 2 + -math.log(logits[:, i].softmax(0)[i]) / 2
    naive /= len(image)
    loss = contrastive_loss(
        create_contrastive_loss("clip"), {"image_features": image, "text_features": text, "logit_scale": scale}
    )
    assert abs(loss.item() - naive) < 1e-5


def test_clip_loss_hand_computed_value():
    # two orthogonal pairs, scale 1: each row's softmax is [e/(e+1), 1/(e+1)] -> loss = log(1 + 1/e)
    eye = torch.eye(2)
    out = {"image_features": eye, "text_features": eye, "logit_scale": torch.tensor(1.0)}
    assert abs(contrastive_loss(create_contrastive_loss("clip"), out).item() - math.log(1 + math.exp(-1))) < 1e-6


def test_siglip_loss_matches_naive_sigmoid():
    image, text = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    naive = 0.0
    for i in range(len(image)):
        for j in range(len(text)):
            z = (scale * image[i] @ text[j] + bias).item()
            label = 1.0 if i == j else -1.0
            naive += math.log(1 + math.exp(-label * z))
    naive /= len(image)  # SigLIP normalises by the batch size, not the number of pairs
    out = {"image_features": image, "text_features": text, "logit_scale": scale, "logit_bias": bias}
    assert abs(contrastive_loss(create_contrastive_loss("siglip"), out).item() - naive) < 1e-4


def test_gradient_accumulation_equals_full_batch():
    """accum_steps=2 with cached features must give the gradients of one batch of twice the size."""
    torch.manual_seed(0)
    model = create_model(
        "tiny", vision={"depth": 1, "width": 32, "heads": 2}, text={"depth": 1, "width": 32, "heads": 2}, embed_dim=16
    )
    tokens = create_tokenizer(32)([f"caption number {i}" for i in range(8)])
    images = torch.randn(8, 3, 64, 64)
    batches = [{"image": images[:4], "text": tokens[:4]}, {"image": images[4:], "text": tokens[4:]}]
    task = ContrastiveTask(create_contrastive_loss("clip"), torch.device("cpu"))

    task.step(model, [{"image": images, "text": tokens}])
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    task.step(model, batches)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[name], rtol=1e-4, atol=1e-6, msg=name)
