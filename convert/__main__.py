"""`python -m convert <input> <output_dir> [--config NAME] [--dtype bf16|fp32]` (also `sparge-convert`);
`sparge-convert --init PRESET <output_dir>` writes a random-weight checkpoint of a preset. A umT5
text-encoder checkpoint (goes to `convert.umt5`) or a Wan VAE input (`Wan2.1_VAE.pth` or a diffusers
`vae/` folder) is recognised by its key names."""

from __future__ import annotations

import argparse
import os
import sys

from sparge_jax.cli import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparge-convert",
        description="Convert a Wan2.1 torch checkpoint (original or diffusers key names; .safetensors, sharded\n"
                    "with *.index.json, or .pth) into an Orbax checkpoint + config.json for sparge_jax: the\n"
                    "DiT, the VAE (Wan2.1_VAE.pth or a diffusers vae/ folder) or the umT5 text encoder\n"
                    "(Wan2.1's models_t5_umt5-xxl-enc-bf16.pth or a transformers UMT5EncoderModel folder,\n"
                    "converted with its tokenizer), each recognised by its key names;\n"
                    "or, with --init PRESET OUT, write a random-weight checkpoint of a preset.",
        formatter_class=HelpFormatter,
    )
    from sparge_jax.models import WAN_CONFIGS

    parser.add_argument("input", nargs="?",
                        help="checkpoint file (.safetensors, *.index.json, .pth) or directory (not with --init)")
    parser.add_argument("output_dir", nargs="?", help="new (or empty) directory to write params/ and config.json into")
    parser.add_argument("--init", metavar="PRESET", choices=sorted(WAN_CONFIGS), default=None,
                        help="instead of converting, write random initial weights of this WAN_CONFIGS preset "
                             f"({', '.join(sorted(WAN_CONFIGS))}): `--init tiny OUT` (default: convert input)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --init weights")
    parser.add_argument("--config", default=None,
                        help="a sparge_jax WAN_CONFIGS name (t2v-1.3b, t2v-14b, i2v-14b, ...; a umT5 input: "
                             "a UMT5_CONFIGS name, umt5-xxl or tiny); default: inferred from the tensor shapes")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="stored param dtype (default: bf16 for the DiT and umT5, fp32 for the VAE)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="umT5 input only: folder with the tokenizer.json to copy along (default: the input's "
                             "folder, its google/umt5-xxl, or a sibling tokenizer/)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def input_line(path: str) -> str:
    """Which file(s) the converter reads for `path`, and the checkpoint files of a directory it
    leaves aside (e.g. a .pth beside .safetensors)."""
    from convert.readers import PTH_SUFFIXES, checkpoint_files

    kind, files = checkpoint_files(path)
    files = [os.path.abspath(f) for f in files]
    shown = files[0] if len(files) == 1 else f"{len(files)} {kind} shards ({files[0]}, ...)"
    line = f"reading {shown}"
    if os.path.isdir(path):
        others = sorted(os.path.abspath(os.path.join(path, n)) for n in os.listdir(path)
                        if n.endswith((".safetensors", *PTH_SUFFIXES)) and os.path.abspath(os.path.join(path, n)) not in files)
        if others:
            line += f"; not read: {', '.join(others)}"
    return line


def init_checkpoint(preset: str, output_dir: str, dtype: str, seed: int) -> None:
    """`--init`: a random-weight checkpoint of `preset`."""
    from sparge_jax.dtypes import dtype_named
    from sparge_jax.models import WAN_CONFIGS
    from sparge_jax.models.checkpoint import write_random_wan

    count = write_random_wan(output_dir, WAN_CONFIGS[preset], seed=seed, param_dtype=dtype_named(dtype))
    print(f"wrote {os.path.abspath(output_dir)}: preset {preset}, random weights (seed {seed}), "
          f"{count:,} parameters, {dtype}")


def convert_vae(args) -> int:
    """Convert the Wan VAE checkpoint `args.input` (errors propagate to `main`)."""
    from convert.vae import convert_vae_checkpoint

    if args.config is not None:
        raise ValueError(f"--config names a DiT preset, but {args.input} holds a Wan VAE (its architecture "
                         "is read from the tensor shapes); leave --config out")
    dtype = args.dtype or "fp32"
    config = convert_vae_checkpoint(args.input, args.output_dir, dtype=dtype, progress=not args.no_progress)
    print(f"wrote {os.path.abspath(args.output_dir)}: Wan VAE, base_dim {config.base_dim}, z_dim {config.z_dim}, "
          f"dim_mult {config.dim_mult}, {dtype}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.init is not None:
        if args.output_dir is not None or args.input is None or args.config is not None:
            parser.error("--init PRESET takes one directory, the output (e.g. `--init tiny OUT`), and no --config")
        try:
            init_checkpoint(args.init, args.input, args.dtype or "bf16", args.seed)
        except (ValueError, OSError) as error:
            print(f"sparge-convert: error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.output_dir is None:
        parser.error("the following arguments are required: input, output_dir (or --init PRESET output_dir)")
    from convert.partial import Interrupted
    from convert.pipeline import convert_checkpoint
    from convert.vae import is_vae_input

    try:
        print(input_line(args.input))
        from convert.umt5 import convert_umt5, is_umt5_checkpoint

        if is_umt5_checkpoint(args.input):
            args.dtype = args.dtype or "bf16"
            umt5, tokenizer = convert_umt5(args.input, args.output_dir, config=args.config, dtype=args.dtype,
                                           tokenizer=args.tokenizer, progress=not args.no_progress)
            print(f"wrote {os.path.abspath(args.output_dir)}: umT5 text encoder, d_model {umt5.d_model}, "
                  f"{umt5.num_layers} layers, {args.dtype}; "
                  + (f"tokenizer from {tokenizer}" if tokenizer else "no tokenizer (pass --tokenizer DIR)"))
            return 0
        if args.tokenizer is not None:
            raise ValueError("--tokenizer is for umT5 text-encoder checkpoints; the input is a Wan DiT or VAE")
        if is_vae_input(args.input):
            return convert_vae(args)
        args.dtype = args.dtype or "bf16"
        config = convert_checkpoint(args.input, args.output_dir, config=args.config, dtype=args.dtype,
                                    progress=not args.no_progress)
    except (ValueError, OSError) as error:  # bad input, or a file system refusal (permissions, space)
        print(f"sparge-convert: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"sparge-convert: {stop}; nothing written", file=sys.stderr)
        return stop.exit_code
    from sparge_jax.models import preset_of

    print(f"wrote {os.path.abspath(args.output_dir)}: preset {preset_of(config) or 'none (an architecture of its own)'}"
          f", {config.model_type}, dim {config.dim}, {config.num_layers} layers, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
