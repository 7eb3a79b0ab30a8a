"""benchmarks/caption_fidelity.py: the read-out recovers, from rendered pixels alone, the
attributes the renderer drew (the oracle: each clip's own attributes), and the script runs end
to end on small clips."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from caption_fidelity import main, read_attributes, score, silhouettes, speed_along_caption, truth  # noqa: E402
from caption_following import WIDE_CLIPS, colour_mask, one_shape_attributes  # noqa: E402
from token_grid import teacher_config  # noqa: E402

from sparge_jax.sampling import shifted_sigmas  # noqa: E402
from train.procedural import COLOURS, SIZE_CHANGES, render_attributes  # noqa: E402


def _rendered_clips():
    """(spec, 12 one-shape attribute dicts, their rendered clips `(12, 8, 128, 128, 3)`, their truths): clips of
    128 x 128 pixels, where few shapes bounce in the 6 frames a course is read from."""
    _, spec = teacher_config(["data.procedural.start_region=true", "data.procedural.frames=8", *WIDE_CLIPS])
    attrs = one_shape_attributes(spec, 12)
    return spec, attrs, np.asarray(render_attributes(attrs, spec)), [truth(a, spec) for a in attrs]


def _read_all(videos, attrs, spec) -> list[dict]:
    """`read_attributes` of each video for its caption's colour, against the video's own frame-0 area."""
    colours, templates, reads = list(COLOURS.values()), silhouettes(), []
    for clip, a in zip(videos, attrs):
        colour = colours[int(a["colour"][0])]
        reads.append(read_attributes(clip, colour, float(colour_mask(clip[:1], colour).sum()), spec, templates))
    return reads


def test_read_out_of_rendered_clips_gives_their_attributes():
    spec, attrs, clips, truths = _rendered_clips()
    colours, templates = list(COLOURS.values()), silhouettes()
    assert len({t["shape"] for t in truths}) >= 3 and len({t["direction"] for t in truths}) >= 4
    reads = _read_all(clips, attrs, spec)
    scores = score(reads, truths)
    for name in ("colour", "one object", "shape", "size change", "start region"):
        assert scores[name] == (12, 12), (name, scores)
    assert scores["direction"][0] >= 10, scores  # a shape that bounces within its first frames reads otherwise
    # a caption of another colour is not found in the clip; a steady shape read as steady
    other = next(c for c in colours if c != colours[int(attrs[0]["colour"][0])])
    assert read_attributes(clips[0], other, 100.0, spec, templates) == {"colour": False}
    steady = list(SIZE_CHANGES).index("steady")
    assert all(r["size change"] == steady for r, a in zip(reads, attrs) if a["change"][0] == steady)


def test_speed_along_caption_of_rendered_still_and_mirrored_clips():
    """Rendered clips read about their own speed along the caption's direction (least-squares over
    6 frames; a bounce in them lowers it), the same clips held still at frame 0 read 0, and mirrored
    left to right, their horizontal captions read backwards."""
    spec, attrs, clips, truths = _rendered_clips()

    def reads(videos):
        return _read_all(videos, attrs, spec)

    speed = np.mean([np.linalg.norm(a["velocity"][0]) for a in attrs])
    along, n = speed_along_caption(reads(clips), truths)
    assert n == 12 and 0.8 * speed < along <= 1.05 * speed, (along, speed)
    still = np.repeat(clips[:, :1], clips.shape[1], axis=1)
    still_along, n = speed_along_caption(reads(still), truths)
    assert n == 12 and abs(still_along) < 1e-9, still_along
    horizontal = [i for i, t in enumerate(truths) if t["direction"] in (0, 4)]  # east, west
    mirrored = reads(clips[:, :, :, ::-1])
    backwards, m = speed_along_caption([mirrored[i] for i in horizontal], [truths[i] for i in horizontal])
    assert m == len(horizontal) >= 1 and backwards < -0.8 * min(np.linalg.norm(attrs[i]["velocity"][0])
                                                                for i in horizontal), backwards


def test_script_runs_on_small_clips(tmp_path, capsys):
    result = main(["--clips", "2", "--steps", "2", "--trajectory", "--out", str(tmp_path), "data.procedural.height=64",
                   "data.procedural.width=64", "data.procedural.frames=8"])
    assert result["scores"]["rendered"]["colour"] == (2, 2)
    assert result["scores"]["sampled"]["colour"][1] == 2
    saved = np.load(tmp_path / "caption_fidelity.npz")
    assert saved["sampled"].shape == saved["rendered"].shape == (2, 8, 64, 64, 3)
    steps = result["trajectory"]
    assert [(row["step"], row["sigma"]) for row in steps] == list(enumerate(shifted_sigmas(2, 3.0)[:-1]))
    assert all(row["scores"]["colour"][1] == 2 for row in steps)
    out = capsys.readouterr().out
    assert "| shape |" in out and "| step | sigma | colour | one object |" in out
    assert "| speed along the caption, px a frame (clips) |" in out
    assert np.isfinite(result["speeds"]["rendered"][0]) and result["speeds"]["rendered"][1] == 2
