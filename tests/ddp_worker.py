"""Run under torchrun by tests/test_ddp.py: train a few steps, then write this rank's weight digest."""

import hashlib
import os
import sys
from pathlib import Path

from mmfusion.config import load_config
from mmfusion.train import train

run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
result = train(load_config("tiny", overrides), run_dir=run_dir, progress=False)
digest = hashlib.sha256()
for name, tensor in sorted(result["model"].state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
(run_dir / f"rank{os.environ['RANK']}.sha256").write_text(digest.hexdigest())
