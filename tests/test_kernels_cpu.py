"""fedmri.kernels on CPU: results and every gradient against F.conv3d on the concatenated
input, opcheck, torch.compile, errors, and the model swap."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kernels_reference import make_inputs, reference, rel_err

from fedmri.kernels import conv3d, conv_transpose3d, load, use_fedmri_conv

# n, c, cout, (d, h, w), k, stride, halo_lo, halo_hi, activation
CASES = [
    (2, 3, 4, (5, 6, 7), 3, 1, True, True, "relu"),
    (1, 2, 5, (7, 5, 6), 3, 2, True, False, "leaky_relu"),
    (3, 4, 3, (6, 9, 8), 3, 2, False, True, None),
    (2, 5, 6, (4, 7, 3), 1, 1, False, False, None),
    (1, 3, 2, (1, 4, 5), 3, 1, True, True, None),     # one-plane slab: both halos reach it
    (2, 2, 3, (3, 5, 5), 3, 2, True, True, "relu"),   # odd depth at stride 2 reads halo_hi
    (1, 6, 7, (8, 3, 9), 1, 2, False, False, "relu"),
    # im2col chunks of 4 MB (36 output rows of these widths in float64) that start and end
    # inside a plane: 78 rows at stride 1, 39 at stride 2
    (1, 16, 4, (6, 13, 33), 3, 1, True, True, None),
    (1, 16, 4, (6, 26, 66), 3, 2, True, False, None),
]


def _grads(out: torch.Tensor, inputs: dict[str, torch.Tensor | None], gy: torch.Tensor
           ) -> dict[str, torch.Tensor]:
    names = [k for k in ("x", "w", "b", "lo", "hi") if inputs[k] is not None]
    grads = torch.autograd.grad(out, [inputs[k] for k in names], gy)  # type: ignore[misc]
    return dict(zip(names, grads, strict=True))


def _ours(t: dict[str, torch.Tensor | None], stride: int, act: str | None) -> torch.Tensor:
    return conv3d(t["x"], t["w"], t["b"], halo_lo=t["lo"], halo_hi=t["hi"],  # type: ignore[arg-type]
                  stride=stride, activation=act, negative_slope=0.1)


def _ref(t: dict[str, torch.Tensor | None], stride: int, act: str | None) -> torch.Tensor:
    return reference(t["x"], t["w"], t["b"], t["lo"], t["hi"], stride, act)  # type: ignore[arg-type]


def _against_float64(t: dict[str, torch.Tensor | None], stride: int, act: str | None,
                     channels_last: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor],
                                dict[str, torch.Tensor]]:
    """Our op on `t` (x made channels-last if asked) and the float64 reference on the same
    values: both outputs and both sets of gradients for one random output gradient."""
    if channels_last:
        t["x"] = t["x"].detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()  # type: ignore[union-attr]
    t64 = {key: v.detach().double().requires_grad_() if v is not None else None
           for key, v in t.items()}
    y, ref = _ours(t, stride, act), _ref(t64, stride, act)
    gy = torch.randn(ref.shape, dtype=torch.float64)
    return y, ref, _grads(y, t, gy.to(y.dtype)), _grads(ref, t64, gy)


@pytest.mark.parametrize("case", CASES)
def test_float64_equals_reference_with_all_gradients(case) -> None:  # type: ignore[no-untyped-def]
    n, c, cout, dhw, k, stride, lo, hi, act = case
    torch.manual_seed(hash(case) % 2**31)
    t = make_inputs(n, c, cout, dhw, k, lo, hi, torch.float64)
    y, ref = _ours(t, stride, act), _ref(t, stride, act)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(ref)
    ours, theirs = _grads(y, t, gy), _grads(ref, t, gy)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-11, atol=1e-11,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_bound(case, dtype) -> None:  # type: ignore[no-untyped-def]
    """float32 goes through oneDNN; half types are computed in float32 and rounded once."""
    n, c, cout, dhw, k, stride, lo, hi, act = case
    t = make_inputs(n, c, cout, dhw, k, lo, hi, dtype)
    y, ref, ours, theirs = _against_float64(t, stride, act)
    bound = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert y.dtype == dtype
    assert rel_err(y, ref) < bound
    for name, g in theirs.items():
        assert ours[name].dtype == dtype
        assert rel_err(ours[name], g) < 4 * bound, name


def test_halos_are_used_not_zero_padding() -> None:
    t = make_inputs(1, 2, 3, (4, 5, 5), 3, True, True, torch.float64)
    with_halos = _ours(t, 1, None)
    zero_padded = conv3d(t["x"], t["w"], t["b"])  # type: ignore[arg-type]
    interior = slice(1, -1)
    torch.testing.assert_close(with_halos[:, :, interior], zero_padded[:, :, interior])
    assert not torch.allclose(with_halos[:, :, 0], zero_padded[:, :, 0])
    assert not torch.allclose(with_halos[:, :, -1], zero_padded[:, :, -1])
    # zero halos are the same as no halos
    zeros = {**t, "lo": torch.zeros_like(t["lo"]), "hi": torch.zeros_like(t["hi"])}  # type: ignore[arg-type]
    torch.testing.assert_close(_ours(zeros, 1, None), zero_padded)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last_in_channels_last_out(dtype) -> None:  # type: ignore[no-untyped-def]
    t = make_inputs(2, 4, 6, (5, 6, 7), 3, True, False, dtype)
    x_cl = t["x"].detach().contiguous(memory_format=torch.channels_last_3d)  # type: ignore[union-attr]
    y = conv3d(x_cl, t["w"], t["b"], halo_lo=t["lo"])  # type: ignore[arg-type]
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, conv3d(t["x"], t["w"], t["b"], halo_lo=t["lo"]))  # type: ignore[arg-type]


def test_opcheck() -> None:
    load()
    for lo, hi, dtype in [(True, True, torch.float64), (False, False, torch.float32),
                          (True, False, torch.float32)]:
        t = make_inputs(2, 3, 4, (4, 5, 6), 3, lo, hi, dtype)
        torch.library.opcheck(torch.ops.fedmri.conv3d_forward.default,
                              (t["x"], t["w"], t["b"], t["lo"], t["hi"], 1, 2, 0.1))
        grad = torch.randn(2, 4, 4, 5, 6, dtype=dtype)
        detached = [v.detach() if v is not None else None for v in t.values()]
        x, w, _, hl, hh = detached
        torch.library.opcheck(torch.ops.fedmri.conv3d_backward_input.default,
                              (grad, x, w, hl, hh, 1))
        torch.library.opcheck(torch.ops.fedmri.conv3d_backward_weight.default,
                              (grad, x, w, hl, hh, 1))
    torch.library.opcheck(torch.ops.fedmri.norm_row_moments.default, (torch.randn(3, 5000),))


def test_torch_compile_fullgraph_forward_and_backward() -> None:
    t = make_inputs(2, 3, 4, (6, 5, 5), 3, True, True, torch.float32)

    def layer(x, w, b, lo, hi):  # type: ignore[no-untyped-def]
        return conv3d(x, w, b, halo_lo=lo, halo_hi=hi, stride=2, activation="relu").sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    args = [t[k] for k in ("x", "w", "b", "lo", "hi")]
    out = compiled(*args)
    torch.testing.assert_close(out, layer(*args))
    grads = torch.autograd.grad(out, args)  # type: ignore[arg-type]
    expected = torch.autograd.grad(layer(*args), args)  # type: ignore[arg-type]
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_torch_compile_before_any_eager_call() -> None:
    # A fresh process: the library is loaded while dynamo traces the first call.
    code = ("import torch; from fedmri.kernels import conv3d; "
            "f = torch.compile(lambda x, w: conv3d(x, w), fullgraph=True, backend='aot_eager'); "
            "x, w = torch.randn(1, 2, 3, 4, 4), torch.randn(2, 2, 3, 3, 3); "
            "assert torch.allclose(f(x, w), torch.nn.functional.conv3d(x, w, padding=1), "
            "atol=1e-5)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: {**t, "lo": t["lo"][:, :, :, :-1]}, "halo_lo has shape"),
    (lambda t: {**t, "hi": t["hi"].double()}, "halo_hi is Double"),
    (lambda t: {**t, "w": torch.randn(4, 3, 5, 5, 5)}, "kernel must be 1x1x1 or 3x3x3"),
    (lambda t: {**t, "w": torch.randn(4, 2, 3, 3, 3)}, "weight expects 2 input channels, x has 3"),
    (lambda t: {**t, "b": torch.randn(5)}, "bias must have shape [4]"),
    (lambda t: {**t, "x": t["x"][0]}, "x must be (N, C, D, H, W)"),
])
def test_bad_input_is_named(change, message) -> None:  # type: ignore[no-untyped-def]
    t = {k: v.detach() if v is not None else None
         for k, v in make_inputs(2, 3, 4, (4, 5, 6), 3, True, True, torch.float32).items()}
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        _ours(change(t), 1, None)


def test_bad_arguments_are_named() -> None:
    t = make_inputs(1, 2, 2, (3, 3, 3), 3, False, False, torch.float32)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2, got 3"):
        conv3d(t["x"], t["w"], stride=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation must be one of"):
        conv3d(t["x"], t["w"], activation="gelu")  # type: ignore[arg-type]


def test_unet_on_fedmri_conv_matches_aten() -> None:
    from fedmri.common.config import RunConfig
    from fedmri.common.models import build_model
    from fedmri.kernels import Conv3d, ConvTranspose3d

    reference_model = build_model(RunConfig(conv_backend="aten")).double()
    ours = build_model(RunConfig(conv_backend="aten")).double()
    swapped = use_fedmri_conv(ours)
    convs = [m for m in reference_model.modules() if type(m) is torch.nn.Conv3d]
    ups = [m for m in reference_model.modules() if type(m) is torch.nn.ConvTranspose3d]
    assert swapped == len(convs) + len(ups) and convs and ups
    by_default = build_model(RunConfig())  # the trainer's default backend is ours
    assert sum(type(m) in (Conv3d, ConvTranspose3d) for m in by_default.modules()) == swapped
    assert ours.state_dict().keys() == reference_model.state_dict().keys()
    x = torch.randn(1, 1, 24, 24, 24, dtype=torch.float64)
    y_ref, y = reference_model(x), ours(x)
    torch.testing.assert_close(y, y_ref)
    y_ref.square().mean().backward()
    y.square().mean().backward()
    for (name, p_ref), p in zip(reference_model.named_parameters(), ours.parameters(),
                                strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 5), (1, 16, 4, 7, 6), (1, 3, 1, 1, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_equals_aten(shape, bias) -> None:  # type: ignore[no-untyped-def]
    # Odd, one-plane and one-voxel edges; float64 to 1e-10, float32 to float32 rounding.
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        gen = torch.Generator().manual_seed(sum(shape))
        x = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()
        w = torch.randn(shape[1], 4, 3, 3, 3, dtype=dtype, generator=gen).requires_grad_()
        b = torch.randn(4, dtype=dtype, generator=gen).requires_grad_() if bias else None
        inputs = [t for t in (x, w, b) if t is not None]
        y, y_ref = conv_transpose3d(x, w, b), F.conv_transpose3d(x, w, b, 2, 1, 1)
        assert y.shape == y_ref.shape == (shape[0], 4, *(2 * e for e in shape[2:]))
        gy = torch.randn(y.shape, dtype=dtype, generator=gen)
        for ours, ref in zip((y, *torch.autograd.grad(y, inputs, gy)),
                             (y_ref, *torch.autograd.grad(y_ref, inputs, gy)), strict=True):
            assert rel_err(ours, ref) <= tol


def test_conv_transpose_swap_only_what_it_computes() -> None:
    from fedmri.kernels import ConvTranspose3d

    model = torch.nn.Sequential(torch.nn.ConvTranspose3d(4, 2, 3, 2, 1, 1),
                                torch.nn.ConvTranspose3d(2, 2, 2, 2),
                                torch.nn.ConvTranspose3d(2, 2, 3, 2, 1, 0))
    assert use_fedmri_conv(model) == 1
    assert [type(m) is ConvTranspose3d for m in model] == [True, False, False]
    x = torch.randn(1, 4, 2, 3, 3)
    torch.testing.assert_close(model[0](x), F.conv_transpose3d(x, model[0].weight,
                                                               model[0].bias, 2, 1, 1))
    # output_size asks for ATen's own resolution of the output shape
    assert model[0](x, output_size=[4, 6, 6]).shape == (1, 2, 4, 6, 6)


# Few channels at stride 1 take our direct kernel (16-column register blocks): widths below,
# at and across the block size, every output-channel count it is built for at the extremes.
DIRECT_CASES = [
    # n, c, cout, (d, h, w), k, halo_lo, halo_hi, activation
    (2, 3, 3, (5, 6, 40), 3, True, True, None),
    (1, 1, 8, (4, 3, 5), 3, False, True, "relu"),
    (2, 4, 1, (3, 4, 16), 3, True, False, "leaky_relu"),
    (1, 2, 5, (2, 5, 17), 1, False, False, None),
    (3, 3, 7, (6, 2, 33), 3, False, False, "relu"),
]


@pytest.mark.parametrize("case", DIRECT_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_direct_kernel_few_channels(case, channels_last) -> None:  # type: ignore[no-untyped-def]
    n, c, cout, dhw, k, lo, hi, act = case
    t = make_inputs(n, c, cout, dhw, k, lo, hi, torch.float32)
    y, ref, ours, theirs = _against_float64(t, 1, act, channels_last)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-6
    # With <= 4 output channels the input gradient (the flipped convolution) is direct too.
    for name, g in theirs.items():
        assert rel_err(ours[name], g) < 1e-5, name


@pytest.mark.parametrize("c,cout", [(3, 2), (16, 12)])  # direct and oneDNN input gradient
@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_halo_gradients_of_thin_slabs(c, cout, depth, channels_last) -> None:  # type: ignore[no-untyped-def]
    """The halo planes' input gradients come from a few output-gradient planes each side,
    also where the slab is thinner than the kernel."""
    t = make_inputs(1, c, cout, (depth, 5, 6), 3, True, True, torch.float32)
    _, _, ours, theirs = _against_float64(t, 1, None, channels_last)
    for name, g in theirs.items():
        assert ours[name].shape == g.shape
        assert rel_err(ours[name], g) < 1e-5, name


def test_float64_path_matches_onednn_path() -> None:
    """The two CPU routes (im2col + GEMM for float64, oneDNN for float32) agree."""
    t = make_inputs(2, 4, 5, (6, 7, 5), 3, True, True, torch.float64)
    y64 = _ours(t, 2, "relu")
    t32 = {k: v.detach().float() if v is not None else None for k, v in t.items()}
    y32 = _ours(t32, 2, "relu")
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)
    assert F.relu(y64).equal(y64)


def test_kernels_info_json_names_backends_and_reasons() -> None:
    import json

    load()  # the CPU backend is built by now
    done = subprocess.run([sys.executable, "-m", "fedmri.kernels.cli", "info", "--json"],
                          capture_output=True, text=True, check=True)
    info = json.loads(done.stdout)
    assert info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert info["backends"]["cpu"]["compiled"] is True
    cuda = info["backends"]["cuda"]
    assert set(cuda) >= {"compiled", "archs", "reason"}
    if torch.version.cuda is None:  # a CPU torch: no CUDA backend, and it says why
        assert cuda["compiled"] is False and "CPU build" in cuda["reason"]


def test_inference_path_equals_autograd_path() -> None:
    """Without gradients the op skips its Python autograd kernel; the result is the same."""
    t = make_inputs(2, 3, 4, (5, 6, 7), 3, True, True, torch.float32)
    y = _ours(t, 1, "relu")
    assert y.requires_grad
    with torch.no_grad():
        y_inference = _ours(t, 1, "relu")
    assert not y_inference.requires_grad
    torch.testing.assert_close(y_inference, y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("c,cout", [(2, 3), (16, 16)])  # direct kernel and oneDNN
def test_second_derivatives_are_refused(c, cout) -> None:  # type: ignore[no-untyped-def]
    t = make_inputs(1, c, cout, (4, 5, 6), 3, True, True, torch.float32)
    y = _ours(t, 1, None)
    (grad,) = torch.autograd.grad(y.square().sum(), t["x"], create_graph=True)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_cpu_autocast_casts_the_drop_in_as_it_casts_conv3d() -> None:
    layer = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1),
                                torch.nn.Conv3d(4, 3, 3, padding=1))
    x = torch.rand(1, 2, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        use_fedmri_conv(layer)
        got = layer(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel_err(got.double(), want.double()) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_row_moments_are_exact_to_rounding(dtype) -> None:  # type: ignore[no-untyped-def]
    # Against the exact mean and variance (fractions): rows of lengths around the op's
    # 2048-value blocks, one with a large offset (1e4, spread 1e-3) and one whose first value
    # is a far outlier; ATen's torch.var is 1e-10 off on the offset row in float64.
    load()
    gen = torch.Generator().manual_seed(3)
    for length in (1, 7, 2048, 2049, 5000):
        rows = torch.randn(4, length, generator=gen, dtype=torch.float64)
        rows[1] = rows[1] * 1e-3 + 1e4
        rows[2, 0] = 1e7
        rows = rows.to(dtype)
        mean, var = torch.ops.fedmri.norm_row_moments(rows)
        assert mean.dtype == dtype and var.dtype == dtype
        tol = 1e-14 if dtype == torch.float64 else 2e-7  # the result's own rounding
        for row, m, v in zip(rows.tolist(), mean.tolist(), var.tolist(), strict=True):
            exact_mean, exact_var = statistics.fmean(row), statistics.pvariance(row)
            # The mean to rounding on the scale that normalising uses: |mean| + spread.
            assert abs(m - exact_mean) <= tol * (abs(exact_mean) + exact_var ** 0.5)
            assert v == pytest.approx(exact_var, rel=tol, abs=1e-300)
    empty_mean, empty_var = torch.ops.fedmri.norm_row_moments(torch.empty(2, 0, dtype=dtype))
    assert empty_mean.tolist() == [0.0, 0.0] and empty_var.tolist() == [0.0, 0.0]


def test_norm_row_moments_refuse_what_they_cannot_read() -> None:
    load()
    with pytest.raises(RuntimeError, match="contiguous 2-D CPU tensor"):
        torch.ops.fedmri.norm_row_moments(torch.zeros(4, 6).t())
    with pytest.raises(RuntimeError, match="contiguous 2-D CPU tensor"):
        torch.ops.fedmri.norm_row_moments(torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="float32 or float64, got Int"):
        torch.ops.fedmri.norm_row_moments(torch.zeros(2, 3, dtype=torch.int32))
