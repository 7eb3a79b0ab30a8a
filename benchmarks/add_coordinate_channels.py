"""Give a trained Wan DiT coordinate channels (CPU, seconds for the teacher).

    python benchmarks/add_coordinate_channels.py IN OUT

Reads the converted model at IN (`config.json` + `params/`), widens its patch embedding by
zero-weighted coordinate channels (`sparge_jax.models.wan.with_coordinate_channels`: the same
velocities until training moves those weights) and writes it to OUT in its stored dtype, with
`coordinate_channels` set in its config. A training run continues from OUT with
`model.weights=OUT` and a config whose `model.overrides` set `"coordinate_channels": true`
(`train/configs/teacher_wide_regions_coordinates.json`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flax import nnx

from sparge_jax.models.checkpoint import check_new_output_dir, load_wan, save_wan_params
from sparge_jax.models.wan import with_coordinate_channels


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="converted Wan DiT (config.json + params/)")
    p.add_argument("out", type=Path, help="new, empty folder for the widened model")
    args = p.parse_args(argv)
    if not (args.source / "config.json").is_file():
        p.error(f"source: no converted model (config.json) in {args.source}")
    try:
        check_new_output_dir(str(args.out), "out:")
    except ValueError as e:
        p.error(str(e))
    model = load_wan(str(args.source))
    if model.config.coordinate_channels:
        p.error(f"source: {args.source} has coordinate channels already")
    params, config = with_coordinate_channels(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config)
    save_wan_params(str(args.out), params, config)
    print(f"wrote {args.out}: {args.source} with coordinate channels (patch embedding kernel "
          f"{tuple(params['patch_embedding']['kernel'].shape)})")
    return args.out


if __name__ == "__main__":
    main()
