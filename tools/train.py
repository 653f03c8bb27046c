#!/usr/bin/env python
"""Train an mmfusion model (CLIP-style) on webdataset shards or the built-in synthetic dataset.

With no arguments this is the default main job: configs/tiny.yaml on synthetic data, on the CPU,
in a new directory under runs/. Runs unchanged under torchrun for DDP.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
overrides are key.sub=value pairs checked against the config schema, e.g.
  data.train="shards/{000000..000009}.tar"  data.val="heldout/*.tar"  train.epochs=5
  train.batch_size=128  train.accum_steps=4  train.loss=siglip  model.vision.depth=4

examples:
  python tools/train.py                                       # tiny model, synthetic data, ~7 min on 2 cores
  python tools/train.py --config configs/tiny.yaml --run-dir runs/mine data.train="shards/{000000..000009}.tar"
  torchrun --nproc_per_node=2 tools/train.py --config configs/small.yaml ...
  python tools/train.py --resume runs/mine                    # continue at the exact sample it stopped at
  python tools/train.py --resume runs/mine train.epochs=10    # ... and train for longer
  python tools/train.py --config configs/tiny-fusion.yaml      # + captioning and matching head, ~11 min
  python tools/train.py --config configs/tiny-gen.yaml         # stage 1: image tokenizer, stage 2: generator
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny", help="YAML recipe or shipped config name (default: tiny)")
    parser.add_argument("--run-dir", help="where checkpoints and metrics go (default: runs/<model>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mmfusion.cli import error_line, setup_logging
    from mmfusion.config import ConfigError, apply_overrides, load_config
    from mmfusion.data import ShardError
    from mmfusion.train import config_from_run, train_stages
    from mmfusion.train.checkpoint import CheckpointError

    setup_logging(verbose=True)
    try:
        if args.resume:
            if any(o.startswith("model.") for o in args.overrides):
                raise ConfigError("the model of a run cannot change on --resume; start a new run instead")
            cfg = apply_overrides(config_from_run(args.resume), args.overrides)
            run_dir = args.resume
        else:
            cfg = load_config(args.config, args.overrides)
            run_dir = args.run_dir
        if run_dir is None and cfg.model.kind == "text_to_image":
            from mmfusion.train.loop import default_run_dir

            run_dir = default_run_dir(cfg)
        train_stages(cfg, run_dir=run_dir, resume=bool(args.resume), progress=not args.no_progress)
    except (ConfigError, ShardError, CheckpointError) as exn:
        print(f"error: {error_line(exn)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
