"""`python -m convert <input> <output_dir> [--config NAME] [--dtype bf16|fp32]` (also `sparge-convert`)."""

from __future__ import annotations

import argparse
import sys

from sparge_jax.cli import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparge-convert",
        description="Convert a Wan2.1 torch checkpoint (original or diffusers key names; .safetensors, sharded "
                    "with *.index.json, or .pth) into an Orbax checkpoint + config.json for sparge_jax.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("input", help="checkpoint file (.safetensors, *.index.json, .pth) or directory")
    parser.add_argument("output_dir", help="new (or empty) directory to write params/ and config.json into")
    parser.add_argument("--config", default=None,
                        help="a sparge_jax WAN_CONFIGS name (t2v-1.3b, t2v-14b, i2v-14b, ...); "
                             "default: inferred from the tensor shapes")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="stored param dtype")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from convert.partial import Interrupted
    from convert.pipeline import convert_checkpoint

    try:
        config = convert_checkpoint(args.input, args.output_dir, config=args.config, dtype=args.dtype,
                                    progress=not args.no_progress)
    except (ValueError, OSError) as error:  # bad input, or a file system refusal (permissions, space)
        print(f"sparge-convert: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"sparge-convert: {stop}; nothing written", file=sys.stderr)
        return stop.exit_code
    print(f"wrote {args.output_dir}: {config.model_type}, dim {config.dim}, {config.num_layers} layers, "
          f"{args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
