"""CUDA C++ ragged attention (vitslim_kernels._C, forward only) against the reference.

The kernel tests need a GPU (marker gpu; skipped without one). On CPU, in CI: the same kernel source run on
CPU threads by csrc/emulate (indexing, masking, softmax, shuffles, shared memory, under AddressSanitizer and
UndefinedBehaviorSanitizer), and the dispatch, launcher and torch.compile tests (fake CUDA tensors need no GPU).
"""
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vitslim_kernels import _ext, explain, ragged_attention, ragged_attention_ref, select
from vitslim_kernels.ops import ragged_attention as launcher
from vitslim_kernels.ops.ragged_attention import RAGGED_CUDA_MAX_WORK, cuda_refusals

from .test_ext import expected_build_missing
from .tolerance import assert_within_spec  # noqa: E402

CSRC = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "csrc")

SCALE = 64 ** -0.5  # a pruned head keeps its original width's scale (docs/design.md section 4)
FORWARD_ONLY = "the CUDA kernel is forward-only; training uses triton"

# Kernel error allowed on top of 2x the error of the reference run in the same dtype (docs/conventions.md), in units
# of the dtype's eps times the largest |expected| value. fp32: the reference is itself very accurate while the
# kernel sums in another order and takes exp2 of pre-scaled scores; an error of a few eps is rounding, while an
# indexing or masking bug gives errors of order 1, so 32 eps keeps the test strict (the same floor as the
# Triton kernel's). fp16/bf16: the kernel keeps scores and probabilities in fp32 and rounds once, at the
# output, so it is more accurate than the reference (which rounds scores, P and O); 4 eps covers that rounding.
FLOOR_EPS = {torch.float32: 32, torch.float16: 4, torch.bfloat16: 4}


def _gpu_extension_missing() -> str | None:
    """Why the GPU tests cannot run here (None: they run). Fails instead where the extension should work."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    reason = _ext.device_unavailable(torch.device("cuda", torch.cuda.current_device()))
    if reason is not None and expected_build_missing() is None:
        pytest.fail(f"a GPU is here and the extension should have been built, but: {reason}")
    return reason


@pytest.fixture
def cuda_ext():
    reason = _gpu_extension_missing()
    if reason is not None:
        pytest.skip(reason)
    return _ext.load()


@pytest.fixture
def poisoned(monkeypatch):
    """The output starts as NaN, so an element the kernel skips stays NaN."""
    monkeypatch.setattr(launcher, "_alloc", lambda shape, like: torch.full(tuple(shape), float("nan"),
                                                                          dtype=like.dtype, device=like.device))


def _assert_within_spec(name, got, ref_same_dtype, expected):
    assert_within_spec(name, got, ref_same_dtype, expected, FLOOR_EPS[got.dtype], got.dtype)


def _qkv(qkv64, dtype, layout):
    """q, k, v in `dtype` from a (B, N, 3D) float64 tensor.

    "split": strided views of one (B, N, 3D) tensor, as a fused qkv projection gives them;
    "separate": three contiguous tensors; "transposed": views of (B, D, N) tensors (column stride N).
    """
    x = qkv64.to(dtype)
    D = x.shape[-1] // 3
    if layout == "split":
        return x.split(D, dim=-1)
    if layout == "separate":
        return tuple(t.contiguous() for t in x.split(D, dim=-1))
    return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in x.split(D, dim=-1))


def _check(head_dims, N, B, dtype, layout="split"):
    torch.manual_seed(0)
    D = sum(head_dims)
    qkv = 1.5 * torch.randn(B, N, 3 * D, dtype=torch.float64, device="cuda")  # peaked softmax rows
    with torch.no_grad():
        q, k, v = _qkv(qkv, dtype, layout)
        out = ragged_attention(q, k, v, head_dims, SCALE, implementation="cuda")
        ref = ragged_attention_ref(q, k, v, head_dims, SCALE)
        expected = ragged_attention_ref(*_qkv(qkv, torch.float64, layout), head_dims, SCALE)
    assert out.dtype == dtype and out.shape == (B, N, D) and out.is_contiguous()
    _assert_within_spec("out", out, ref, expected)
    return out


# ---------------------------------------------------------------------------------------------------------
# GPU: the kernel
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dims", [(41, 17, 52, 0, 64, 1), (64, 63)])
@pytest.mark.parametrize("N", [197, 50, 17])
def test_matches_reference(cuda_ext, poisoned, dtype, head_dims, N):
    _check(head_dims, N, B=3, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dims, N", [
    ((100, 0, 3), 50),      # capacity 128
    ((200, 7), 17),         # capacity 256
    ((256, 1), 33),         # the widest head accepted; N one past a key tile
    ((0, 0, 5, 0), 1),      # every head pruned but one; a single token
    ((16, 32, 48), 64),     # N a multiple of the tiles
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_capacities_and_sizes(cuda_ext, poisoned, head_dims, N, dtype):
    _check(head_dims, N, B=3, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["separate", "transposed"])
def test_layouts(cuda_ext, poisoned, layout):
    _check((41, 17, 52, 0, 64, 1), 197, B=3, dtype=torch.bfloat16, layout=layout)


@pytest.mark.gpu
def test_deterministic_and_on_the_current_stream(cuda_ext):
    first = _check((41, 17, 52, 0, 64, 1), 197, B=3, dtype=torch.float16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        again = _check((41, 17, 52, 0, 64, 1), 197, B=3, dtype=torch.float16)
    stream.synchronize()
    assert torch.equal(first, again)


@pytest.mark.gpu
def test_empty_inputs(cuda_ext):
    with torch.no_grad():
        for B, N, dims in ((2, 17, (0, 0, 0)), (0, 17, (3, 1)), (2, 0, (3, 1))):
            q = torch.randn(B, N, sum(dims), device="cuda")
            out = ragged_attention(q, q, q, dims, SCALE, implementation="cuda")
            assert out.shape == (B, N, sum(dims))


@pytest.mark.gpu
def test_refuses_what_it_cannot_do(cuda_ext):
    q = torch.randn(2, 17, 257, device="cuda")
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="heads up to 256 wide, got a head of width 257"):
            ragged_attention(q, q, q, (257,), SCALE, implementation="cuda")
        q = torch.randn(2, 17, 129, device="cuda")
        with pytest.raises(RuntimeError, match="at most 128 heads of non-zero width"):
            ragged_attention(q, q, q, (1,) * 129, SCALE, implementation="cuda")
    q = torch.randn(2, 17, 18, device="cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        launcher.ragged_attention_cuda(q, q.detach(), q.detach(), (17, 1), SCALE)
    out = torch.empty(2, 17, 18, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        cuda_ext.ragged_attention_fwd(q.detach(), q.detach(), q.detach(), out, [17, 1], SCALE)


@pytest.mark.gpu
def test_dispatch_on_gpu(cuda_ext):
    q = torch.randn(2, 17, 18, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert select("ragged_attention", q) is launcher.ragged_attention_cuda
    q.requires_grad_()
    assert dict(explain("ragged_attention", q))["cuda"] == FORWARD_ONLY
    out = ragged_attention(q, q, q, (17, 1), SCALE)  # training: Triton, with a graph
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.gpu
def test_opcheck(cuda_ext):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 17, 3 * 18, device="cuda").split(18, dim=-1)
    torch.library.opcheck(torch.ops.vitslim.ragged_attention_fwd_cuda, (q, k, v, [17, 0, 1], SCALE))
    # Inputs that require grad: the op's registered backward (the Triton one) under AOT dispatch too.
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vitslim.ragged_attention_fwd_cuda, (q, k, v, [17, 0, 1], SCALE))


@pytest.mark.gpu
@pytest.mark.slow  # a cold inductor compile: not in gpu-check's tests slice
def test_torch_compile_fullgraph(cuda_ext):
    q, k, v = torch.randn(2, 50, 3 * 58, device="cuda", dtype=torch.bfloat16).split(58, dim=-1)
    fn = torch.compile(lambda q, k, v: ragged_attention(q, k, v, (41, 17), SCALE) * 2, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(q, k, v), 2 * ragged_attention_ref(q, k, v, (41, 17), SCALE),
                                   atol=2e-2, rtol=2e-2)


def _compute_sanitizer() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "compute-sanitizer")):
            return os.path.join(home, "bin", "compute-sanitizer")
    return shutil.which("compute-sanitizer")


_SANITIZED_RUN = textwrap.dedent("""
    import torch
    from vitslim_kernels.cuda.ragged_attention import ragged_attention_cuda
    for dtype, dims, N in ((torch.bfloat16, (41, 17, 52, 0, 64, 1), 197), (torch.float32, (100, 0, 3), 50),
                           (torch.float16, (200, 7), 17)):
        q, k, v = torch.randn(2, N, 3 * sum(dims), device="cuda", dtype=dtype).split(sum(dims), dim=-1)
        with torch.no_grad():
            ragged_attention_cuda(q, k, v, dims, 0.125)
    torch.cuda.synchronize()
    print("sanitized run done")
""")


def _first_line_with(text: str, proc: subprocess.CompletedProcess) -> str:
    return next(line.strip() for line in (proc.stdout + proc.stderr).splitlines() if text in line)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(cuda_ext, tool):
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH)")
    proc = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=1", sys.executable, "-c", _SANITIZED_RUN],
                          capture_output=True, text=True, timeout=900)
    if "Device not supported" in proc.stdout + proc.stderr:  # e.g. under gVisor: the tool cannot attach at all
        pytest.skip(f"compute-sanitizer does not support this device: {_first_line_with('Device not supported', proc)}")
    assert proc.returncode == 0 and "sanitized run done" in proc.stdout, \
        f"{tool}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------
# CPU (CI): dispatch, launcher checks, tracing
# ---------------------------------------------------------------------------------------------------------

def test_predicate_on_cpu_tensors():
    x = torch.zeros(2, 17, 18)
    assert dict(explain("ragged_attention", x))["cuda"] == "CPU tensor: the CUDA kernel runs on CUDA tensors"
    assert cuda_refusals(torch.zeros(2, 17, 18, device="meta")) == \
        ["meta tensor: the CUDA kernel runs on CUDA tensors"]


def test_predicate_on_cuda_stand_ins():
    def stand_in(dtype=torch.bfloat16, requires_grad=False):
        return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, requires_grad=requires_grad)
    extension = [r for r in [_ext.device_unavailable(torch.device("cuda"))] if r is not None]
    assert cuda_refusals(stand_in(torch.float64)) == \
        ["dtype torch.float64 is not supported by the CUDA kernel (float32, float16, bfloat16 are)"]
    with torch.enable_grad():
        assert cuda_refusals(stand_in(requires_grad=True)) == [FORWARD_ONLY]
    with torch.no_grad():  # no gradient will be taken: the kernel may run (if the extension and a GPU can)
        assert cuda_refusals(stand_in(requires_grad=True)) == extension
    with torch.inference_mode():
        assert cuda_refusals(stand_in()) == extension
    if not torch.cuda.is_available():
        assert cuda_refusals(stand_in()) in (
            ["no CUDA GPU is visible (torch.cuda.is_available() is False)"], [_ext.unavailable()])


def test_refusals_see_every_input_and_give_every_reason():
    """All of q, k, v count for the gradient; every reason is listed, the head limits of the kernel included."""
    q = torch.zeros(1, 4, 300, dtype=torch.float64)
    with torch.enable_grad():
        reasons = cuda_refusals(q, q, q.clone().requires_grad_(), (300,), SCALE)
    assert reasons == ["CPU tensor: the CUDA kernel runs on CUDA tensors",
                       "dtype torch.float64 is not supported by the CUDA kernel (float32, float16, bfloat16 are)",
                       FORWARD_ONLY, "the CUDA kernel takes heads up to 256 wide, got a head of width 300 in [300]"]
    assert cuda_refusals(q, q, q, (1,) * 129 + (171,), SCALE)[-1] == \
        "the CUDA kernel takes at most 128 heads of non-zero width, got 130"
    assert dict(explain("ragged_attention", q, q, q, (300,), SCALE))["cuda"] == "; ".join(reasons[:2] + reasons[3:])


def test_size_limit_sends_big_batches_to_triton(monkeypatch):
    monkeypatch.setattr(_ext, "device_unavailable", lambda device: None)  # as on a GPU with the extension
    def q(B, N, D):
        return SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, requires_grad=False,
                               shape=torch.Size((B, N, D)))
    with torch.no_grad():
        assert cuda_refusals(q(1, 197, 270)) == []        # bs 1: the latency case
        assert cuda_refusals(q(12, 197, 270)) == []
        (reason,) = cuda_refusals(q(256, 197, 270))
    assert reason.startswith("B * N^2 * sum(head_dims) = 2682478080 > 134217728: Triton's tensor-core kernel")
    assert RAGGED_CUDA_MAX_WORK == 2 ** 27


def test_forced_cuda_on_cpu_says_why():
    q = torch.randn(2, 17, 18)
    with pytest.raises(RuntimeError, match="implementation 'cuda' cannot run here: CPU tensor"):
        ragged_attention(q, q, q, (17, 1), SCALE, implementation="cuda")


def test_launcher_refuses_gradients_and_dropout():
    q = torch.randn(2, 17, 18, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only; training uses triton"):
        launcher.ragged_attention_cuda(q, q.detach(), q.detach(), (17, 1), SCALE)
    with pytest.raises(ValueError, match="no attention dropout"):
        launcher.ragged_attention_cuda(q.detach(), q.detach(), q.detach(), (17, 1), SCALE, dropout_p=0.1)
    with pytest.raises(ValueError, match="sum\\(head_dims\\)"):
        launcher.ragged_attention_cuda(q.detach(), q.detach(), q.detach(), (17, 2), SCALE)


@pytest.mark.parametrize("shape, head_dims, dtype, message", [
    ((2, 17, 18), [17, -1, 2], torch.float32, r"head_dims must be non-negative, got \[17, -1, 2\]"),
    ((2, 17, 257), [257], torch.float32, r"heads up to 256 wide, got a head of width 257 in \[257\]; use "
                                         r"implementation='triton'"),
    ((2, 17, 129), [1] * 129, torch.float32, "at most 128 heads of non-zero width"),
    ((2, 17, 18), [17, 2], torch.float32, r"last dim of q is 18 but sum\(head_dims\) = 19 for \[17, 2\]"),
    ((2, 17, 18), [17, 1], torch.float64, "dtype must be float32, float16 or bfloat16, got Double"),
    ((17, 18), [17, 1], torch.float32, r"q must be \(B, N, sum\(head_dims\)\), got shape \[17, 18\]"),
    ((2, 17, 18), [17, 1], torch.float32, "tensors must be on a CUDA device, got q on cpu"),
])
def test_extension_argument_checks_on_cpu(shape, head_dims, dtype, message):
    """The host checks of csrc/ragged_attention.cpp run before any device is touched, so CI tests them."""
    if _ext.unavailable() is not None:
        pytest.skip(_ext.unavailable())
    q = torch.zeros(shape, dtype=dtype)
    with pytest.raises(RuntimeError, match=message):
        _ext.load().ragged_attention_fwd(q, q, q, torch.empty_like(q), head_dims, SCALE)


def test_extension_checks_shapes_and_dtypes_of_every_tensor():
    if _ext.unavailable() is not None:
        pytest.skip(_ext.unavailable())
    q = torch.zeros(2, 17, 18)
    fwd = _ext.load().ragged_attention_fwd
    with pytest.raises(RuntimeError, match="must have the same shape"):
        fwd(q, q, q, torch.zeros(2, 17, 17), [17, 1], SCALE)
    with pytest.raises(RuntimeError, match="must share one dtype, got Float, Float, Half, Float"):
        fwd(q, q, q.half(), q, [17, 1], SCALE)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        fwd(q, q, q, q, [17, 1], float("nan"))


def test_fake_tensors_take_the_custom_op():
    with FakeTensorMode():
        q, k, v = torch.empty(3, 50, 3 * 58, device="cuda", dtype=torch.bfloat16).split(58, dim=-1)
        assert not launcher._plain(q, k, v)
        with torch.no_grad():
            out = launcher.ragged_attention_cuda(q, k, v, (41, 0, 17), SCALE)
    assert out.shape == (3, 50, 58) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert out.is_contiguous()


@pytest.mark.parametrize("gpu_usable", [True, False])
def test_dynamo_traces_dispatch_without_graph_breaks(monkeypatch, gpu_usable):
    """fullgraph=True on fake CUDA tensors: inference reaches the CUDA custom op where the extension can run,
    Triton's op where it cannot, with no graph break in dispatch (the extension check is a traced constant)."""
    if gpu_usable:
        monkeypatch.setattr(_ext, "device_unavailable", torch.compiler.assume_constant_result(lambda device: None))
    elif torch.cuda.is_available():
        pytest.skip("checks the no-GPU path")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: ragged_attention(q, k, v, (3, 5), SCALE) * 2, backend=backend,
                       fullgraph=True)
    mode = FakeTensorMode()
    with mode:
        q = torch.empty(2, 5, 8, device="cuda", dtype=torch.bfloat16)
    try:
        with torch.no_grad(), mode:
            out = fn(q, q, q)
    finally:
        torch._dynamo.reset()
    assert out.shape == (2, 5, 8)
    code = graphs[0].code
    assert ("ragged_attention_fwd_cuda" in code) is gpu_usable, code


# ---------------------------------------------------------------------------------------------------------
# CPU (CI): the kernel itself, emulated on CPU threads
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    """csrc/emulate/ragged_attention_fwd_emulate.cpp built with g++ (with the sanitizers where they link)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CPU emulation of the kernel")
    exe = str(tmp_path_factory.mktemp("emulate") / "ragged_attention_fwd_emulate")
    source = os.path.join(CSRC, "emulate", "ragged_attention_fwd_emulate.cpp")
    base = [cxx, "-std=c++20", "-O1", "-g", "-pthread", "-Wall", "-Wno-attributes", "-Wno-unknown-pragmas",
            "-I", os.path.join(CSRC, "emulate", "shim"), source, "-o", exe]
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    proc = subprocess.run(base + sanitizers, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("sanitize" in proc.stderr or "asan" in proc.stderr):
        proc = subprocess.run(base, capture_output=True, text=True, timeout=600)  # no sanitizer runtime here
    if proc.returncode != 0 and ("barrier" in proc.stderr or "c++20" in proc.stderr):
        pytest.skip(f"{cxx} has no C++20 <barrier>, which the emulation needs: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _emulate(exe, qkv64, head_dims, dtype, layout):
    """The kernel's output on CPU threads for q, k, v taken from qkv64 (B, N, 3D) in `dtype`."""
    B, N, D3 = qkv64.shape
    D = D3 // 3
    x = qkv64.to(dtype)
    buf = x.contiguous() if layout == "split" else torch.cat([t.contiguous().reshape(-1) for t in x.split(D, -1)])
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype  # numpy has no bfloat16: pass its bits
    name = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    proc = subprocess.run([exe, name, layout, str(B), str(N), repr(SCALE)] + [str(w) for w in head_dims],
                          input=buf.view(raw_dtype).numpy().tobytes(), capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    return torch.frombuffer(bytearray(proc.stdout), dtype=raw_dtype).view(dtype).reshape(B, N, D)


@pytest.mark.parametrize("head_dims, N, B, dtype, layout", [
    ((41, 17, 52, 0, 64, 1), 197, 1, torch.bfloat16, "split"),   # 7 query tiles, the last one 5 rows
    ((64, 63), 50, 3, torch.float32, "split"),
    ((41, 17, 52, 0, 64, 1), 17, 3, torch.float16, "split"),
    ((100, 0, 3), 50, 1, torch.float32, "split"),                # capacity 128
    ((200, 7), 17, 1, torch.bfloat16, "split"),                  # capacity 256
    ((0, 0, 5, 0), 1, 2, torch.float32, "split"),                # one token; every head pruned but one
    ((41, 17), 50, 2, torch.float32, "separate"),                # contiguous inputs
])
def test_kernel_emulated_on_cpu(emulated_kernel, head_dims, N, B, dtype, layout):
    torch.manual_seed(0)
    D = sum(head_dims)
    qkv = 1.5 * torch.randn(B, N, 3 * D, dtype=torch.float64)
    out = _emulate(emulated_kernel, qkv, head_dims, dtype, layout)
    ref = ragged_attention_ref(*qkv.to(dtype).split(D, dim=-1), head_dims, SCALE)
    expected = ragged_attention_ref(*qkv.split(D, dim=-1), head_dims, SCALE)
    _assert_within_spec("out", out, ref, expected)


def test_kernel_emulation_catches_a_masking_bug(emulated_kernel, tmp_path):
    """The emulation test can fail: a kernel that lets one key past N into the softmax is caught."""
    kernel = open(os.path.join(CSRC, "kernels", "ragged_attention_fwd.cuh")).read()
    mask = "if (key0 + kKeysPerThread * cg + c >= N)"
    assert kernel.count(mask) == 1
    (tmp_path / "kernels").mkdir()
    (tmp_path / "emulate").mkdir()
    (tmp_path / "kernels" / "ragged_attention_fwd.cuh").write_text(kernel.replace(mask, mask.replace(">=", ">")))
    shutil.copy(os.path.join(CSRC, "kernels", "ragged_attention_fwd.h"), tmp_path / "kernels")
    shutil.copy(os.path.join(CSRC, "emulate", "ragged_attention_fwd_emulate.cpp"), tmp_path / "emulate")
    exe = str(tmp_path / "broken")
    subprocess.run([shutil.which("g++") or "c++", "-std=c++20", "-O1", "-pthread", "-Wno-attributes",
                    "-Wno-unknown-pragmas", "-I", os.path.join(CSRC, "emulate", "shim"),
                    str(tmp_path / "emulate" / "ragged_attention_fwd_emulate.cpp"), "-o", exe], check=True,
                   capture_output=True, timeout=600)
    torch.manual_seed(0)
    qkv = 1.5 * torch.randn(1, 50, 3 * 58, dtype=torch.float64)
    out = _emulate(exe, qkv, (41, 17), torch.float32, "split")
    ref = ragged_attention_ref(*qkv.float().split(58, dim=-1), (41, 17), SCALE)
    expected = ragged_attention_ref(*qkv.split(58, dim=-1), (41, 17), SCALE)
    with pytest.raises(AssertionError, match="kernel error"):
        _assert_within_spec("out", out, ref, expected)
