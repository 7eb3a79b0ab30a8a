"""Sampling schedule, solvers and the `python -m sparge_jax.tools.sample` CLI on the tiny Wan."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparge_jax.compile_options import TRITON_GEMM_OFF, model_call_options
from sparge_jax.tools import sample as sample_cli
from sparge_jax.tools.capture import capture_qkv
from sparge_jax.masks import make_plan
from sparge_jax.models import WAN_CONFIGS, WanModel, load_wan, save_wan_params
from sparge_jax.sampling import SIGMA_MAX, sample, shifted_sigmas


def test_shifted_sigmas_match_formula():
    sig = shifted_sigmas(7, 5.0)
    u = SIGMA_MAX * (1 - np.arange(7) / 7)
    np.testing.assert_allclose(sig[:-1], 5 * u / (1 + 4 * u), rtol=1e-12)
    assert sig[-1] == 0 and np.all(np.diff(sig) < 0)
    with pytest.raises(ValueError, match="steps"):
        shifted_sigmas(0, 5.0)


def gaussian_velocity(mu, std):
    """Exact flow velocity E[noise - x0 | x_s] for data N(mu, std^2) per coordinate."""
    def v(x, s, i):
        var = (1 - s) ** 2 * std ** 2 + s ** 2
        c = x - (1 - s) * mu
        return s / var * c - (mu + (1 - s) * std ** 2 / var * c)
    return v


def test_solvers_converge_on_gaussian_flow_unipc_faster(rng):
    """Data N(mu, std^2): the flow ODE maps the start quantile z to mu + std z exactly."""
    mu, std = 0.7, 0.3
    z = rng.standard_normal(512)
    errors = {}
    for solver in ("euler", "unipc"):
        for steps in (64, 256, 512):
            sig = shifted_sigmas(steps, 3.0)
            start = (1 - sig[0]) * mu + np.sqrt((1 - sig[0]) ** 2 * std ** 2 + sig[0] ** 2) * z
            out = np.asarray(sample(gaussian_velocity(mu, std), jnp.asarray(start, jnp.float32), sig, solver=solver))
            errors[solver, steps] = np.abs(out - (mu + std * z)).max()
    # Euler is first order: 8x the steps gives ~8x less error
    assert 6 < errors["euler", 64] / errors["euler", 512] < 10
    # UniPC (second order, with a large first log-SNR step) converges faster and is far more accurate
    assert errors["unipc", 64] / errors["unipc", 512] > 10
    for steps in (64, 256, 512):
        assert errors["unipc", steps] < errors["euler", steps] / 10


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    config = WAN_CONFIGS["tiny"]
    model = WanModel(config, rngs=nnx.Rngs(1))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_wan_params(str(path), nnx.to_pure_dict(nnx.state(model)), config)
    return path


def test_generate_reports_each_steps_clean_prediction(rng):
    """`train.generate.generate(on_prediction=...)` on the exact Gaussian flow: at each step the
    reported x0 is the posterior mean E[x0 | x_s] (closed form) of the x the step starts from,
    at the step's sigma; the samples are those of a run without the hook."""
    from train.generate import generate

    mu, std = 0.7, 0.4
    flow, starts = gaussian_velocity(mu, std), []

    def velocity(params, x, t, context):  # make_velocity's signature; sigma = t / 1000
        starts.append(np.asarray(x, np.float64))
        return flow(x, t[:, None] / 1000.0, None)

    noise, context = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32), jnp.zeros((3, 1, 1))
    kwargs = dict(steps=6, shift=3.0, guidance=1.0)
    plain = generate(velocity, None, noise, context, **kwargs)
    starts.clear()
    seen = []
    out = generate(velocity, None, noise, context, **kwargs, on_prediction=lambda i, s, x0: seen.append((i, s, x0)))
    np.testing.assert_array_equal(out, plain)
    assert [(i, s) for i, s, _ in seen] == list(enumerate(shifted_sigmas(6, 3.0)[:-1])) and len(starts) == 6
    for (_, s, x0), x in zip(seen, starts):
        var = (1 - s) ** 2 * std ** 2 + s ** 2
        posterior = mu + (1 - s) * std ** 2 / var * (x - (1 - s) * mu)
        np.testing.assert_allclose(np.asarray(x0), posterior, rtol=1e-5, atol=1e-5)


@pytest.mark.matmul_precision("highest")
def test_cli_end_to_end_against_a_plain_euler_loop(tiny_checkpoint, tmp_path, rng, capsys):
    ctx = rng.standard_normal((7, 32)).astype(np.float32)
    neg = rng.standard_normal((1, 7, 32)).astype(np.float32)
    np.save(tmp_path / "ctx.npy", ctx)
    np.save(tmp_path / "neg.npy", neg)
    out = tmp_path / "lat.npy"
    summary = sample_cli.main([
        "--checkpoint", str(tiny_checkpoint), "--context", str(tmp_path / "ctx.npy"),
        "--negative-context", str(tmp_path / "neg.npy"), "--out", str(out), "--latent-shape", "3", "6", "10",
        "--steps", "3", "--solver", "euler", "--shift", "3", "--guidance", "2.5", "--dense-steps", "1",
        "--seed", "4", "--compare-dense"])
    printed = capsys.readouterr().out
    assert printed.count("step ") == 3 and json.loads(printed.strip().splitlines()[-1]) == summary
    sparse, dense = np.load(out), np.load(tmp_path / "lat_dense.npy")
    assert sparse.shape == dense.shape == (1, 3, 6, 10, 16)

    # oracle: the same run written as a plain loop over the model, guidance in float64
    model = load_wan(str(tiny_checkpoint))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert printed.splitlines()[0] == (
        f"loaded weights from {tiny_checkpoint}: preset tiny, {count:,} parameters in float32, computing in float32; "
        "sparse steps use sparge2 rule (topk=0.25, topp=0.5), blocks 32x16")
    assert f"wrote latents (1, 3, 6, 10, 16) float32 to {out}" in printed
    assert f"wrote the all-dense latents to {tmp_path / 'lat_dense.npy'}" in printed
    sig = shifted_sigmas(3, 3.0)

    kept = []  # per sparse step: per layer, the fraction of unpadded block pairs the mask keeps
    # The model's calls jitted (op by op they compile hundreds of small programs: minutes on a GPU box),
    # with the sampler's compiler options (on a GPU its GEMMs are cuBLASLt's, not Triton's).
    velocity = jax.jit(lambda x, t, c, mode: model(x, t, c, attention_mode=mode)[0], static_argnames="mode",
                       compiler_options=model_call_options())
    capture = functools.partial(nnx.jit(capture_qkv), model)

    def run(modes):
        x = np.asarray(jax.random.normal(jax.random.key(4), (1, 3, 6, 10, 16)), np.float64)
        for i, mode in enumerate(modes):
            t = jnp.full((1,), 1000 * sig[i], jnp.float32)
            if mode == "sparse":  # the masks of this step, from its CFG batch
                both = jnp.asarray(np.concatenate([x, x]), jnp.float32)
                qkv = capture(both, jnp.concatenate([t, t]), jnp.asarray(np.concatenate([ctx[None], neg])))
                cfg = model.config.sparse
                masks = [np.asarray(make_plan(*qkv[f"L{layer}"], cfg.method, cfg.kernel)[0].mask) for layer in range(2)]
                kept.append([m[..., :-(-45 // cfg.kernel.block_q), :-(-45 // cfg.kernel.block_k)].mean() for m in masks])
            vc = np.asarray(velocity(jnp.asarray(x, jnp.float32), t, jnp.asarray(ctx[None]), mode), np.float64)
            vu = np.asarray(velocity(jnp.asarray(x, jnp.float32), t, jnp.asarray(neg), mode), np.float64)
            x = x + (sig[i + 1] - sig[i]) * (vu + 2.5 * (vc - vu))
        return x

    want_dense, want_sparse = run(["dense"] * 3), run(["dense", "sparse", "sparse"])
    np.testing.assert_allclose(dense, want_dense, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sparse, want_sparse, rtol=1e-4, atol=1e-4)
    assert np.abs(sparse - dense).max() > 1e-3  # the sparse steps changed something
    # achieved sparsity: 45 tokens, steps 1 and 2 sparse, step 0 dense (counts as 0)
    per_layer = [(1 - np.mean([step[layer] for step in kept])) * 2 / 3 for layer in range(2)]
    assert summary["sparsity_steps"] == [1, 2]
    np.testing.assert_allclose(summary["layer_block_sparsity"], per_layer, atol=1e-6)
    assert summary["block_sparsity"] == pytest.approx(np.mean(per_layer), abs=1e-6)
    assert summary["block_sparsity_sparse_steps"] == pytest.approx(np.mean(per_layer) * 3 / 2, abs=1e-6)
    assert 0.05 < summary["block_sparsity"] < 0.95
    assert f"achieved block sparsity {100 * summary['block_sparsity']:.1f} % over the run" in printed
    diff = np.asarray(sparse, np.float64) - dense
    assert summary["rel_l2"] == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(dense), rel=1e-6)
    peak = dense.max() - dense.min()
    assert summary["psnr_db"] == pytest.approx(10 * np.log10(peak ** 2 / np.mean(diff ** 2)), rel=1e-6)


def test_cli_rejects_bad_embeddings(tiny_checkpoint, tmp_path):
    np.save(tmp_path / "ctx.npy", np.ones((2, 5, 32), np.float32))
    with pytest.raises(ValueError, match="embeddings"):
        sample_cli.main(["--checkpoint", str(tiny_checkpoint), "--context", str(tmp_path / "ctx.npy"),
                         "--out", str(tmp_path / "o.npy"), "--latent-shape", "1", "4", "4", "--steps", "1"])
    np.save(tmp_path / "ctx.npy", np.ones((5, 31), np.float32))
    with pytest.raises(ValueError, match="text_dim"):
        sample_cli.main(["--checkpoint", str(tiny_checkpoint), "--context", str(tmp_path / "ctx.npy"),
                         "--out", str(tmp_path / "o.npy"), "--latent-shape", "1", "4", "4", "--steps", "1"])


@pytest.mark.matmul_precision("highest")
def test_cli_method_option(tiny_checkpoint, tmp_path, rng, capsys):
    ctx = rng.standard_normal((7, 32)).astype(np.float32)
    np.save(tmp_path / "ctx.npy", ctx)
    args = ["--checkpoint", str(tiny_checkpoint), "--context", str(tmp_path / "ctx.npy"),
            "--latent-shape", "5", "8", "16", "--steps", "2", "--solver", "euler"]  # 5x4x8 tokens
    keep_all = sample_cli.main([*args, "--out", str(tmp_path / "radial.npy"), "--compare-dense",
                                "--method", '{"kind": "radial", "dense_distance": 8}'])
    assert keep_all["rel_l2"] < 1e-5  # a radial mask dense over every frame distance is dense attention
    assert keep_all["block_sparsity"] == 0 and keep_all["layer_block_sparsity"] == [0, 0]
    warning = capsys.readouterr().err
    assert "no block was skipped" in warning and "the method's settings (RadialMethod(" in warning
    sample_cli.main([*args, "--out", str(tmp_path / "svg.npy"), "--method", '{"kind": "svg", "band_frames": 0.3}'])
    svg = np.load(tmp_path / "svg.npy")
    assert "no block was skipped" not in capsys.readouterr().err
    assert np.isfinite(svg).all() and np.abs(svg - np.load(tmp_path / "radial.npy")).max() > 1e-4
    with pytest.raises(ValueError, match="--method"):
        sample_cli.main([*args, "--out", str(tmp_path / "x.npy"), "--method", "{not json"])
    with pytest.raises(ValueError, match="kind"):
        sample_cli.main([*args, "--out", str(tmp_path / "x.npy"), "--method", "no-such-method"])
    sample_cli.main([*args, "--out", str(tmp_path / "svg_default.npy"), "--method", "svg"])  # a bare kind works


def test_cli_residual_dtype(tiny_checkpoint, tmp_path, rng):
    """--residual-dtype bfloat16 stores the residual stream in bf16: latents near the float32
    default's but not equal (bf16 roundings of the stream, 2^-9 relative each, several per block:
    0.93 % relative L2 here, on the tiny random checkpoint's 2 Euler steps); anything else is refused."""
    np.save(tmp_path / "ctx.npy", rng.standard_normal((7, 32)).astype(np.float32))
    args = ["--checkpoint", str(tiny_checkpoint), "--context", str(tmp_path / "ctx.npy"),
            "--latent-shape", "5", "8", "16", "--steps", "2", "--solver", "euler"]
    sample_cli.main([*args, "--out", str(tmp_path / "f32.npy")])
    sample_cli.main([*args, "--out", str(tmp_path / "bf16.npy"), "--residual-dtype", "bfloat16"])
    f32, bf16 = np.load(tmp_path / "f32.npy"), np.load(tmp_path / "bf16.npy")
    rel = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert 1e-4 < rel < 4e-2, rel
    with pytest.raises(SystemExit):
        sample_cli.main([*args, "--out", str(tmp_path / "x.npy"), "--residual-dtype", "float16"])


def test_model_call_options_turn_triton_gemms_off_on_gpus_only():
    assert model_call_options(backend="gpu") == TRITON_GEMM_OFF
    assert TRITON_GEMM_OFF == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": True}
    assert model_call_options(triton_gemm=True, backend="gpu") is None
    assert model_call_options(backend="cpu") is None and model_call_options(backend="tpu") is None
    assert model_call_options() == model_call_options(backend=jax.default_backend())


def test_cli_compiles_the_model_call_with_model_call_options(tiny_checkpoint, tmp_path, monkeypatch):
    """The sampler's model call compiles with `model_call_options(triton_gemm=--triton-gemm)`:
    options naming no XLA option (in place of the GPU ones, which XLA's CPU backend accepts and
    ignores) fail its compile, and --triton-gemm, which asks for none, samples."""
    np.save(tmp_path / "ctx.npy", np.ones((5, 32), np.float32))
    args = ["--checkpoint", str(tiny_checkpoint), "--context", str(tmp_path / "ctx.npy"), "--out",
            str(tmp_path / "o.npy"), "--latent-shape", "1", "4", "4", "--steps", "1", "--guidance", "1"]
    asked = []

    def options(triton_gemm=False):
        asked.append(triton_gemm)
        return None if triton_gemm else {"no_such_option": True}

    monkeypatch.setattr(sample_cli, "model_call_options", options)
    with pytest.raises(Exception, match="No such compile option: 'no_such_option'"):
        sample_cli.main(args)
    assert not (tmp_path / "o.npy").exists()
    sample_cli.main([*args, "--triton-gemm"])
    assert np.isfinite(np.load(tmp_path / "o.npy")).all() and asked == [False, True]


@pytest.mark.slow
def test_cli_svg2_carries_centroids_across_steps(tiny_checkpoint, tmp_path, rng, capsys):
    """--method svg2: each sparse step starts k-means from the previous step's centroids,
    as a plain Euler loop threading `WanModel.__call__`'s state does (and not as afresh every step)."""
    from sparge_jax.method_config import SVG2Method

    ctx = rng.standard_normal((7, 32)).astype(np.float32)
    np.save(tmp_path / "ctx.npy", ctx)
    method = SVG2Method(q_clusters=4, k_clusters=8, topp=0.5, init_iters=3, step_iters=1)
    out = tmp_path / "svg2.npy"
    sample_cli.main(["--checkpoint", str(tiny_checkpoint), "--context", str(tmp_path / "ctx.npy"), "--out", str(out),
                     "--latent-shape", "5", "8", "16", "--steps", "3", "--solver", "euler", "--shift", "3",
                     "--guidance", "1", "--seed", "5", "--method", json.dumps(dataclasses.asdict(method))])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert ["compilation" in line for line in printed] == [True, True, False]  # steps 0 and 1 compile

    model = load_wan(str(tiny_checkpoint), sparse=WAN_CONFIGS["tiny"].sparse.replace(method=method))
    sig = shifted_sigmas(3, 3.0)
    graphdef, weights = nnx.split(model)  # jitted as the sampler compiles its model call
    step = functools.partial(jax.jit(lambda weights, x, t, state: nnx.merge(graphdef, weights)(
        x, t, jnp.asarray(ctx[None]), state, attention_mode="sparse"), compiler_options=model_call_options()), weights)

    def run(carry: bool):
        x = jax.random.normal(jax.random.key(5), (1, 5, 8, 16, 16))  # 5x4x8 tokens
        state = None
        for i in range(3):
            t = jnp.full((1,), 1000 * sig[i], jnp.float32)
            v, new_state = step(x, t, state if carry else None)
            state = new_state
            x = x + (sig[i + 1] - sig[i]) * v
        return np.asarray(x)

    got, carried, fresh = np.load(out), run(True), run(False)
    np.testing.assert_allclose(got, carried, rtol=1e-4, atol=1e-4)
    assert np.abs(carried - fresh).max() > 1e-4


def test_cli_warns_when_the_sequence_fits_in_one_block(tiny_checkpoint, tmp_path, capsys):
    np.save(tmp_path / "ctx.npy", np.ones((5, 32), np.float32))
    summary = sample_cli.main(["--checkpoint", str(tiny_checkpoint), "--context", str(tmp_path / "ctx.npy"),
                               "--out", str(tmp_path / "o.npy"), "--latent-shape", "1", "4", "4", "--steps", "1",
                               "--guidance", "1"])
    assert summary["block_sparsity"] == 0 and summary["sparsity_steps"] == [0]
    err = capsys.readouterr().err
    assert "no block was skipped" in err and "(4 tokens, grid (1, 2, 2)) fits in one block" in err


def test_cli_user_errors_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    """Each user error: status 2 and one line on stderr naming the option, before any sampling."""
    np.save(tmp_path / "ctx.npy", np.ones((5, 32), np.float32))
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "config.json").write_text(json.dumps(WAN_CONFIGS["tiny-i2v"].to_dict()))
    base = ["--context", str(tmp_path / "ctx.npy"), "--out", str(tmp_path / "o.npy"), "--latent-shape", "1", "4", "4"]
    ckpt = ["--checkpoint", str(tiny_checkpoint)]
    cases = [
        ([*ckpt, *base, "--method", "sla"], "--method 'sla': SLA needs its learnable linear-branch projection"),
        ([*ckpt, *base, "--method", "foo"], "--method 'foo': config method: kind must be one of"),
        ([*ckpt, *base, "--method", '{"kind": "svg", "bogus": 1}'], "config method: unknown SVGMethod field(s) ['bogus']"),
        ([*ckpt, *base, "--latent-shape", "3", "7", "10"],
         "--latent-shape: latent shape (3, 7, 10) must be a multiple of patch_size (1, 2, 2)"),
        (["--checkpoint", str(i2v), *base], "holds an i2v model; this sampler is text-to-video only"),
        (["--checkpoint", str(tmp_path / "none"), *base], "--checkpoint: checkpoint_dir must hold config.json"),
        ([*ckpt, *base, "--context", str(tmp_path / "missing.npy")], "--context: [Errno 2] No such file"),
        ([*ckpt, *base, "--topk", "7"], "--topk / --topp: "),
        ([*ckpt, *base, "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
        ([*ckpt, *base, "--steps", "0"], "--steps must be at least 1; got 0"),
        ([*ckpt, *base, "--context-parallel", "0"], "--context-parallel must lie in [1, "),
        ([*ckpt, *base, "--out", str(tmp_path / "no" / "o.npy")], f"--out: the directory {tmp_path / 'no'} does not"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            sample_cli.cli(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, argv
        assert message in err[-1] and err[-1].startswith("python -m sparge_jax.tools.sample: error: "), (err, message)
        assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o.npy").exists()
