"""benchmarks/caption_fidelity.py: the read-out recovers, from rendered pixels alone, the
attributes the renderer drew (the oracle: each clip's own attributes), and the script runs end
to end on small clips."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from caption_fidelity import (main, read_attributes, score, silhouettes, speed_along_caption, truth,  # noqa: E402
                             whole_captions)
from caption_following import WIDE_CLIPS, captioned_attributes, colour_mask  # noqa: E402
from token_grid import teacher_config  # noqa: E402

from sparge_jax.sampling import shifted_sigmas  # noqa: E402
from train.procedural import COLOURS, SIZE_CHANGES, render_attributes  # noqa: E402


def _rendered_clips():
    """(spec, 12 one-shape attribute dicts, their rendered clips `(12, 8, 128, 128, 3)`, their truths): clips of
    128 x 128 pixels, where few shapes bounce in the 6 frames a course is read from."""
    _, spec = teacher_config(["data.procedural.start_region=true", "data.procedural.frames=8", *WIDE_CLIPS])
    attrs = captioned_attributes(spec, 12)
    return spec, attrs, np.asarray(render_attributes(attrs, spec)), [truth(a, spec) for a in attrs]


def _read_shapes(videos, attrs, spec, shapes: int) -> list[list[dict]]:
    """Per video, `read_attributes` for each of its caption's first `shapes` colours, against that colour's own
    frame-0 area in the video."""
    palette, templates = list(COLOURS.values()), silhouettes()
    return [[read_attributes(clip, colour, float(colour_mask(clip[:1], colour).sum()), spec, templates)
             for colour in (palette[int(c)] for c in a["colour"][:shapes])] for clip, a in zip(videos, attrs)]


def _read_all(videos, attrs, spec) -> list[dict]:
    """`_read_shapes` of one-shape captions: one read per video."""
    return [clip_reads[0] for clip_reads in _read_shapes(videos, attrs, spec, 1)]


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
    result = main(["--clips", "2", "--shapes", "2", "--steps", "2", "--trajectory", "--out", str(tmp_path),
                   "data.procedural.height=64", "data.procedural.width=64", "data.procedural.frames=8"])
    assert result["scores"]["rendered"]["colour"] == (4, 4)  # 2 clips x 2 shapes
    assert result["scores"]["sampled"]["colour"][1] == 4 and len(result["truths"]) == 4
    assert result["whole_captions"]["rendered"] >= 1  # 64 x 64: one clip has a shape read as another kind
    saved = np.load(tmp_path / "caption_fidelity.npz")
    assert saved["sampled"].shape == saved["rendered"].shape == (2, 8, 64, 64, 3)
    steps = result["trajectory"]
    assert [(row["step"], row["sigma"]) for row in steps] == list(enumerate(shifted_sigmas(2, 3.0)[:-1]))
    assert all(row["scores"]["colour"][1] == 4 for row in steps)
    out = capsys.readouterr().out
    assert "| shape |" in out and "| step | sigma | colour | one object |" in out
    assert "| speed along the caption, px a frame (clips) |" in out
    assert "| clips with every shape's colour found and kind right |" in out
    assert np.isfinite(result["speeds"]["rendered"][0]) and result["speeds"]["rendered"][1] >= 3


def test_read_out_of_rendered_multi_shape_clips_reads_each_shape_by_its_colour():
    """Captions naming 2 and 3 shapes of different colours: each shape of the rendered clips is read by its own
    colour as the caption's kind, and a clip whose second shape is given a third shape's colour loses that shape."""
    _, spec = teacher_config(["data.procedural.start_region=true", "data.procedural.frames=8", *WIDE_CLIPS])
    palette, templates = list(COLOURS.values()), silhouettes()
    for shapes in (2, 3):
        attrs = captioned_attributes(spec, 6, shapes)
        assert all(a["present"].sum() == shapes and len(set(a["colour"][:shapes])) == shapes for a in attrs)
        clips = np.asarray(render_attributes(attrs, spec))
        reads = _read_shapes(clips, attrs, spec, shapes)
        truths = [[truth(a, spec, i) for i in range(shapes)] for a in attrs]
        scores = score([r for clip in reads for r in clip], [t for clip in truths for t in clip])
        for name in ("colour", "one object", "shape"):
            assert scores[name] == (6 * shapes, 6 * shapes), (shapes, name, scores)
        assert whole_captions(reads, truths) == 6
        # the second shape's read swapped for a read of a colour no shape has: not found, the clip no longer whole
        unused = next(c for c in palette if c not in [palette[int(k)] for k in attrs[0]["colour"][:shapes]])
        reads[0][1] = read_attributes(clips[0], unused, 100.0, spec, templates)
        assert reads[0][1] == {"colour": False} and whole_captions(reads, truths) == 5


def test_shapes_beyond_the_clips_slots_is_refused():
    with pytest.raises(SystemExit, match="--shapes must be 1 to data.procedural.max_shapes"):
        main(["--shapes", "4", "--clips", "1", "--steps", "1"])
