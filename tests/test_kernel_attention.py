"""The Triton kernel against the torch reference: outputs and both gradients.

Runs on CUDA when present, otherwise in Triton's CPU interpreter (TRITON_INTERPRET=1,
set by conftest.py), so every shape stays small.
"""

import math

import pytest
import torch

from fastattrec.kernels import position_encoding, short_term_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

triton = pytest.importorskip("triton")
attention = pytest.importorskip("fastattrec.kernels.attention")
attention_split = pytest.importorskip("fastattrec.kernels.experimental.attention_split")
attention_tiles = pytest.importorskip("fastattrec.kernels.attention_tiles")
launch = pytest.importorskip("fastattrec.kernels.launch")
launch.set_autotune(False)  # one compiled configuration per shape keeps CUDA runs short

# (B, L, d, masking): awkward sizes on purpose: B = 1, L = 1, d = 1 and d = 7, d = 100
# (not a power of two), d = 128, long windows, and a B not divisible by windows/program.
SHAPES = [
    (1, 5, 100, "partial"),
    (3, 1, 7, "partial"),
    (13, 5, 100, "partial"),
    (4, 5, 1, "partial"),
    (6, 5, 128, "full"),
    (5, 5, 100, "none"),
    (2, 50, 16, "partial"),
    (2, 200, 8, "partial"),
    (2, 100, 40, "prefix"),
    (1, 65, 24, "none"),
    (3, 7, 33, "prefix"),
    (3, 8, 20, "partial"),
    (2, 9, 20, "prefix"),
]
if DEVICE == "cuda":  # sizes that would take minutes in the interpreter
    SHAPES += [(4097, 5, 100, "prefix"), (1000, 50, 64, "partial"), (257, 200, 100, "partial"),
               (300, 5, 256, "partial"), (70000, 5, 100, "prefix"), (5000, 8, 100, "partial")]
# "triton": the layout the entry point picks (tiles for L <= 8, blocks, long); "blocks":
# the block layout forced where the entry point would pick tiles; "split": cuBLAS layout.
VARIANTS = ["triton", "blocks", "split"]


def make_inputs(b, length, d, masking, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=g)
    w = torch.empty(d, d).uniform_(-0.3, 0.3, generator=g)
    upstream = torch.randn(b, d, generator=g)
    if masking == "none":  # every window fully masked: SPEC says attention is uniform
        mask = torch.zeros(b, length, dtype=torch.bool)
    elif masking == "full":
        mask = torch.ones(b, length, dtype=torch.bool)
    elif masking == "prefix":  # realistic left padding with a random number of items
        n = torch.randint(0, length + 1, (b,), generator=g)
        mask = torch.arange(length)[None, :] >= (length - n)[:, None]
    else:
        mask = torch.rand(b, length, generator=g) > 0.35
        mask[:1] = False  # always include one fully masked window
    pos = position_encoding(length, d)
    return [t.to(device) for t in (x, mask, w, pos, upstream)]


def run(backend, x, mask, w, pos, upstream, precision="ieee"):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    if backend == "split":  # the cuBLAS-projection layout, not (yet) a public backend
        out = attention_split.short_term_attention_split(x, mask, w, pos, precision)
    elif backend in ("tiles", "blocks", "long"):
        out = attention.short_term_attention_triton(x, mask, w, pos, precision, backend)
    else:
        out = short_term_attention(x, mask, w, pos, backend=backend, precision=precision)
    dx, dw = torch.autograd.grad(out, (x, w), upstream)
    return out.detach(), dx, dw


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_close(got, ref32, ref64, what):
    """Within 1e-5 of the float32 reference, or, where the problem itself is badly
    conditioned (peaked softmax), no further from the float64 truth than 3x the float32
    reference's own error."""
    err32 = rel_err(got, ref32)
    if err32 < 1e-5:
        return
    own = rel_err(got, ref64)
    floor = rel_err(ref32, ref64)
    assert own <= max(1e-5, 3 * floor), f"{what}: {own:.2e} from float64 (reference {floor:.2e})"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,length,d,masking", SHAPES)
def test_triton_matches_reference(b, length, d, masking, variant):
    if variant == "blocks" and attention.layout_for(length) != "tiles":
        pytest.skip("the entry point already runs the block layout (or long) here")
    inputs = make_inputs(b, length, d, masking)
    out, dx, dw = run(variant, *inputs)
    ref32 = run("torch", *inputs)
    ref64 = run("torch", *[t.double() if t.is_floating_point() else t for t in inputs])
    assert out.shape == (b, d) and dx.shape == (b, length, d) and dw.shape == (d, d)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    for got, r32, r64, what in zip((out, dx, dw), ref32, ref64, ("out", "dx", "dw"), strict=True):
        check_close(got, r32, r64, what)


@pytest.mark.parametrize("b,length,d,masking", [(4, 5, 100, "partial"), (3, 7, 33, "none")])
def test_structured_matches_reference(b, length, d, masking):
    inputs = make_inputs(b, length, d, masking, seed=3)
    ref64 = run("torch", *[t.double() if t.is_floating_point() else t for t in inputs])
    for got, r32, r64 in zip(run("structured", *inputs), run("torch", *inputs), ref64,
                             strict=True):
        check_close(got, r32, r64, "structured")


def test_fully_masked_window_is_uniform_mean():
    """SPEC: a window with no valid key attends uniformly, so short = mean of its rows."""
    x, mask, w, pos, _ = make_inputs(3, 5, 16, "none", seed=1)
    out = short_term_attention(x, mask, w, pos, backend="triton")
    assert torch.allclose(out, x.mean(dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["triton", "blocks", "split"])
def test_deterministic_bytes(variant):
    inputs = make_inputs(9, 5, 100, "partial", seed=2)
    a = run(variant, *inputs)
    b = run(variant, *inputs)
    for t1, t2 in zip(a, b, strict=True):
        assert torch.equal(t1, t2)


# Tolerances against float64 per precision mode: float32-level modes as the float32
# reference (check_close); bf16x3 about 1e-5 at these unit-scale inputs (2e-6 at the
# training scale, tests/test_kernel_precision.py); tf32 on tensor cores is loose, but
# in the interpreter its dots are float32.
def check_mode(got, ref32, ref64, what, mode):
    if mode == "bf16x3":
        assert rel_err(got, ref64) < 5e-5, f"{what}: {rel_err(got, ref64):.2e}"
    elif mode == "tf32" and DEVICE == "cuda":
        assert rel_err(got, ref64) < 3e-2, f"{what}: {rel_err(got, ref64):.2e}"
    else:
        check_close(got, ref32, ref64, what)


@pytest.mark.parametrize("mode", ["tf32", "tf32x3", "bf16x3"])
@pytest.mark.parametrize("layout,b,length,d", [("tiles", 13, 5, 100), ("blocks", 13, 5, 100),
                                                ("long", 2, 100, 40)])
def test_precision_modes_match_reference(layout, b, length, d, mode):
    """Each mode's whole forward and backward (the P-split and float32 value path
    included) against the reference; the interpreter runs the split formulas exactly."""
    inputs = make_inputs(b, length, d, "prefix", seed=5)
    ref32 = run("torch", *inputs)
    ref64 = run("torch", *[t.double() if t.is_floating_point() else t for t in inputs])
    got = run(layout, *inputs, precision=mode)
    for g, r32, r64, what in zip(got, ref32, ref64, ("out", "dx", "dw"), strict=True):
        check_mode(g, r32, r64, f"{layout} {mode} {what}", mode)


def test_tiles_persistent_grid_walks_several_tiles():
    """Small tiles force several tiles per program (three programs in the interpreter), so
    the per-program dW partials accumulate across tiles and the scratch is reused."""
    b, length, d = 70, 5, 24
    inputs = make_inputs(b, length, d, "partial", seed=6)
    cfg = (16, 16, 16, 4, 1)  # TW = 16 (not a GPU candidate): five tiles
    saved = launch.chosen_configs()
    try:
        for kind in ("tile_fwd", "tile_bwd"):
            launch.force_config(kind, length, d, "tf32x3", b, cfg)
        got = run("tiles", *inputs, precision="tf32x3")
        again = run("tiles", *inputs, precision="tf32x3")
    finally:
        launch.forget_configs(keep=saved)
    ref32 = run("torch", *inputs)
    ref64 = run("torch", *[t.double() if t.is_floating_point() else t for t in inputs])
    for g, r32, r64, what in zip(got, ref32, ref64, ("out", "dx", "dw"), strict=True):
        check_close(g, r32, r64, what)
    assert all(torch.equal(u, v) for u, v in zip(got, again, strict=True))


def test_layout_for():
    assert [attention.layout_for(n) for n in (1, 5, 8, 9, 64, 65, 200)] == \
        ["tiles", "tiles", "tiles", "blocks", "blocks", "long", "long"]
    assert attention.layout_for(5, "blocks") == "blocks"
    with pytest.raises(ValueError, match="at most 8 rows"):
        attention.layout_for(9, "tiles")
    with pytest.raises(ValueError, match="at most 64 rows"):
        attention.layout_for(65, "blocks")
    with pytest.raises(ValueError, match="layout must be one of"):
        attention.layout_for(5, "rows")


def test_hand_worked_window():
    """One window, d = 2, L = 2, W = I, no position effect checked against numbers
    written out by hand: both slots valid, so A = softmax of the scaled dot products."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], device=DEVICE)
    mask = torch.tensor([[True, True]], device=DEVICE)
    w = torch.eye(2, device=DEVICE)
    pos = torch.zeros(2, 2, device=DEVICE)
    # Q = relu(X) = X; S = Q Q^T / sqrt(2) = [[1, 0], [0, 4]] / sqrt(2)
    s = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64) / math.sqrt(2)
    a = torch.softmax(s, dim=1)
    p_bar = a.mean(dim=0)  # column means
    want = p_bar[0] * torch.tensor([1.0, 0.0], dtype=torch.float64) + p_bar[1] * torch.tensor(
        [0.0, 2.0], dtype=torch.float64)
    got = short_term_attention(x, mask, w, pos, backend="triton")[0].double().cpu()
    assert torch.allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("bad,message", [
    ("x_dtype", "x must be float32"),
    ("mask_shape", "mask must be (B, L)"),
    ("w_shape", "w must be (d, d)"),
    ("pos_shape", "pos must be (L, d)"),
    ("noncontig", "x must be contiguous"),
    ("x_dims", "x must be (B, L, d)"),
    ("precision", "precision must be one of"),
])
def test_launcher_errors(bad, message):
    x, mask, w, pos, _ = make_inputs(2, 5, 16, "partial")
    precision = "ieee"
    if bad == "x_dtype":
        x = x.double()
    elif bad == "mask_shape":
        mask = mask[:, :3]
    elif bad == "w_shape":
        w = w[:8]
    elif bad == "pos_shape":
        pos = pos[:2]
    elif bad == "noncontig":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif bad == "x_dims":
        x = x[0]
    elif bad == "precision":
        precision = "fp8"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        attention.attention_forward(x, mask, w, pos, precision)


def test_launcher_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, mask, w, pos, _ = make_inputs(2, 5, 16, "partial", device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention.attention_forward(x, mask, w, pos)


def test_empty_batch():
    x, mask, w, pos, _ = make_inputs(0, 5, 16, "partial")
    assert short_term_attention(x, mask, w, pos, backend="triton").shape == (0, 16)


@pytest.mark.parametrize("variant", ["tiles", "blocks", "split"])
def test_every_candidate_block_size(variant):
    """Each configuration the GPU autotuner may pick computes the same thing (the
    interpreter otherwise runs only one of them)."""
    b, length, d = 13, 5, 40
    inputs = make_inputs(b, length, d, "prefix", seed=4)
    ref32 = run("torch", *inputs)
    ref64 = run("torch", *[t.double() if t.is_floating_point() else t for t in inputs])
    prec = "tf32x3" if variant == "tiles" else "ieee"  # tiles: the list with two
    cands, kinds = {
        "tiles": (attention_tiles.tile_candidates(length, d, "tf32x3"),
                  ("tile_fwd", "tile_bwd")),
        "blocks": (attention.block_candidates(length, d), ("fwd", "bwd")),
        "split": (attention_split.split_candidates(length, d), ("split_fwd", "split_bwd")),
    }[variant]
    assert len(cands) >= 1
    saved = launch.chosen_configs()
    try:
        for cfg in cands:
            for kind in kinds:
                launch.force_config(kind, length, d, prec, b, cfg)
            for got, r32, r64, what in zip(run(variant, *inputs, precision=prec), ref32, ref64,
                                           ("out", "dx", "dw"), strict=True):
                check_close(got, r32, r64, f"{what} with {cfg}")
    finally:
        launch.forget_configs(keep=saved)
