"""Models: towers, the CLIP dual encoder, and the factory."""

from mmfusion.models.clip import CLIPModel
from mmfusion.models.factory import create_model, list_models, resolve_model_config
from mmfusion.models.text import create_tokenizer

__all__ = ["CLIPModel", "create_model", "create_tokenizer", "list_models", "resolve_model_config"]
