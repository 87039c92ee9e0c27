"""CUDA-graph replay of slim-model inference (vitslim.cuda_graphs): a pass-through everywhere it cannot replay,
and equal to the eager forward where it does (GPU tests)."""
import contextlib

import pytest
import torch

import vitslim
from vitslim.cuda_graphs import GraphedForward

from .tiny_models import images_for, make_vit, randomize_gates, searchable_copy


def _slim_model(cuda_graphs, device="cpu"):
    model = make_vit("deit_tiny_patch16_224", dtype=torch.float32)
    searchable = searchable_copy(model)
    randomize_gates(searchable)
    plan = vitslim.threshold(searchable, budget_attn=0.7, budget_mlp=0.7, budget_tokens=0.7)
    return vitslim.slim(searchable, plan, fused=True, cuda_graphs=cuda_graphs).to(device).eval(), searchable


def test_cuda_graphs_pass_through_on_cpu_and_keep_the_model():
    graphed, searchable = _slim_model(cuda_graphs=True)
    eager, _ = _slim_model(cuda_graphs=False)
    eager.load_state_dict(graphed.state_dict())
    assert isinstance(graphed.forward, GraphedForward) and not isinstance(eager.forward, GraphedForward)
    x = images_for(graphed, batch=2, dtype=torch.float32)
    with torch.no_grad():
        assert not graphed.forward.replays(x)  # a CPU tensor: the ordinary forward
        assert torch.equal(graphed(x), eager(x))
    assert graphed.slim_plan is not None and vitslim.count_params(graphed) == vitslim.count_params(eager)
    assert vitslim.use_cuda_graphs(graphed, enabled=False) is graphed
    assert not isinstance(graphed.forward, GraphedForward)


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: all replays() reads of an input."""
    is_cuda = property(lambda self: True)


def test_cuda_graphs_replay_only_inference_without_autograd():
    graphed, _ = _slim_model(cuda_graphs=True)
    x = torch.empty(1).as_subclass(_CudaLooking)
    with torch.no_grad():
        assert graphed.forward.replays(x)
        graphed.train()
        assert not graphed.forward.replays(x)  # training: the ordinary forward
        graphed.eval()
    assert not graphed.forward.replays(x)  # autograd on: the ordinary forward


def test_capture_runs_under_the_callers_autocast_with_its_weight_cache_off(monkeypatch):
    """With autocast's weight-cast cache on, a graph captured inside the caller's autocast would read cast weights
    that autocast frees when that autocast exits (torch's make_graphed_callables refuses the case). The CUDA
    calls are stand-ins here: what is checked is the autocast state every warm-up and the capture run under."""
    class FakeStream:
        def wait_stream(self, other):
            pass
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    seen = []

    def forward(x):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     torch.is_autocast_cache_enabled()))
        return x * 2
    graphed = GraphedForward(torch.nn.Identity(), forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        graphed._capture(torch.ones(2))
        assert torch.is_autocast_cache_enabled()  # the caller's cache setting is back
    assert seen == [(True, torch.bfloat16, False)] * 3  # two warm-up calls and the capture
    seen.clear()
    graphed._capture(torch.ones(2))  # no autocast: none during capture either
    assert [s[0] for s in seen] == [False] * 3 and not any(s[2] for s in seen)


def test_load_slim_takes_the_option(tmp_path):
    graphed, _ = _slim_model(cuda_graphs=False)
    vitslim.save_slim(graphed, tmp_path / "slim")
    loaded = vitslim.load_slim(tmp_path / "slim", fused=True, cuda_graphs=True)
    assert isinstance(loaded.forward, GraphedForward)
    x = images_for(loaded, batch=1, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), graphed(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_replay_equals_eager_on_gpu(batch):
    graphed, _ = _slim_model(cuda_graphs=True, device="cuda")
    eager, _ = _slim_model(cuda_graphs=False, device="cuda")
    eager.load_state_dict(graphed.state_dict())
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(3):  # capture, then replays with new inputs
                x = torch.randn(batch, 3, 224, 224, device="cuda")
                assert graphed.forward.replays(x)
                torch.testing.assert_close(graphed(x), eager(x), rtol=0, atol=0)
    # Replays after the caller's autocast has exited and the allocator has returned its free memory (and the
    # memory is reused by other tensors): the graphs must not read cast weights autocast freed.
    torch.cuda.empty_cache()
    filler = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]
    for dtype in (torch.float32, torch.bfloat16):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            x = torch.randn(batch, 3, 224, 224, device="cuda")
            torch.testing.assert_close(graphed(x), eager(x), rtol=0, atol=0)
    del filler
    graphed.forward.reset()
    assert not graphed.forward._graphs
