#!/usr/bin/env python
"""Evaluate a checkpoint on held-out shards; prints one JSON object of metrics.

Contrastive models: text->image and image->text recall@1/5/10 (a hit is an item with the same caption text),
zero-shot top-1 when the samples' json carries a "label", and each again on samples whose json says
"unseen": true (held-out attribute combinations of the synthetic dataset); with the fusion head also caption
metrics (BLEU-4, CIDEr, attribute accuracy) and reranked R@1; with an audio tower audio->image/text recall.
Text-to-image runs: validation loss and, for held-out single-object captions, the colour and position accuracy
of generated images measured from pixels; --shape-classifier adds shape accuracy (an evaluator CNN trained
separately on synthetic images, trained and saved there if the file does not exist) and --clip adds CLIP
R-precision with a contrastive checkpoint.

examples:
  python tools/eval.py --checkpoint runs/NAME --shards "heldout/*.tar"
  python tools/eval.py --checkpoint runs/GEN --shards "val/*.tar" --shape-classifier runs/shape_clf --clip runs/CLIP
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint directory")
    parser.add_argument("--shards", required=True, help='shard pattern, e.g. "heldout/*.tar" or "s/{000..009}.tar"')
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--shape-classifier", metavar="PATH", help="text-to-image: evaluator for shape accuracy")
    parser.add_argument("--clip", metavar="RUN", help="text-to-image: contrastive checkpoint for R-precision")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import mmfusion
    from mmfusion.cli import error_line
    from mmfusion.data import ShardError
    from mmfusion.train.checkpoint import CheckpointError

    try:
        extra = {}
        if args.shape_classifier:
            from mmfusion.eval.text_to_image import load_or_train_shape_classifier

            extra["shape_classifier"] = load_or_train_shape_classifier(args.shape_classifier)
        if args.clip:
            extra["clip"] = mmfusion.load(args.clip, device=args.device)
        model = mmfusion.load(args.checkpoint, device=args.device)
        metrics = model.evaluate(args.shards, batch_size=args.batch_size, **extra)
    except (ShardError, CheckpointError, ValueError) as exn:
        print(f"error: {error_line(exn)}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
