#!/usr/bin/env python
"""Evaluate a checkpoint on held-out shards; prints one JSON object of metrics.

Metrics: text->image and image->text recall@1/5/10 (a hit is an item with the same caption text),
zero-shot top-1 when the samples' json carries a "label", and each again on samples whose json
says "unseen": true (held-out attribute combinations of the synthetic dataset).
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import mmfusion
    from mmfusion.cli import error_line
    from mmfusion.data import ShardError
    from mmfusion.train.checkpoint import CheckpointError

    try:
        metrics = mmfusion.load(args.checkpoint, device=args.device).evaluate(args.shards, batch_size=args.batch_size)
    except (ShardError, CheckpointError, ValueError) as exn:
        print(f"error: {error_line(exn)}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
