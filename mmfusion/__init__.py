"""mmfusion: multimodal contrastive and generative models.

import mmfusion
model = mmfusion.load("runs/NAME")
image_emb = model.encode_image([pil_image, "photo.jpg"])   # (N, E), L2-normalised float32
text_emb = model.encode_text(["a red circle"])              # (N, E)
captions = model.caption([pil_image])                        # with model.fusion.enabled=true
audio_emb = model.encode_audio(["clip.wav"])                 # with model.audio.enabled=true
"""

from mmfusion.api import ImageLoadError, MMFusion, load
from mmfusion.config import ConfigError, RunConfig, load_config
from mmfusion.data.audio import AudioLoadError
from mmfusion.index import SearchIndex
from mmfusion.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "AudioLoadError",
    "ConfigError",
    "ImageLoadError",
    "MMFusion",
    "RunConfig",
    "SearchIndex",
    "__version__",
    "create_model",
    "list_models",
    "load",
    "load_config",
]
