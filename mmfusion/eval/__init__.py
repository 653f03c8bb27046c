"""Evaluation: retrieval, captioning, audio, tokenizer and text-to-image metrics on held-out shards.

``EVALUATORS[model.kind](model, tokenizer, batches, device, autocast=None)`` is what the training loop and
``MMFusion.evaluate`` run for each kind of model.
"""

from mmfusion.eval.retrieval import evaluate, evaluate_embeddings, retrieval_metrics
from mmfusion.eval.text_to_image import text_to_image_metrics
from mmfusion.eval.tokenizer import tokenizer_metrics

EVALUATORS = {"clip": evaluate, "image_tokenizer": tokenizer_metrics, "text_to_image": text_to_image_metrics}

__all__ = ["EVALUATORS", "evaluate", "evaluate_embeddings", "retrieval_metrics", "text_to_image_metrics"]
