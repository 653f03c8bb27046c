"""Evaluation: retrieval recall@K and zero-shot classification on held-out shards."""

from mmfusion.eval.retrieval import evaluate, evaluate_embeddings, retrieval_metrics

__all__ = ["evaluate", "evaluate_embeddings", "retrieval_metrics"]
