"""CUDA-graph replay of a model's inference forward: at batch 1 a slim ViT's latency is its ~270 kernel launches
(benchmarks/roofline.py: 0.05 ms of memory traffic at an H200's limits against ~0.7 ms of launches), and a
graph replays them all with one launch.

    model = vitslim.slim(searched, plan, fused=True, cuda_graphs=True).cuda().eval()
    with torch.inference_mode():
        y = model(x)        # first call per input shape: warm-up and capture; then: copy in, replay, copy out

Only inference on CUDA inputs is replayed (eval mode, autograd off); anything else (training, CPU tensors, grad
enabled) runs the ordinary forward, so the option is safe to leave on. A graph reads the weights where they were
when it was captured: after changing them (load_state_dict, an optimizer step, .to()) call
`model.forward.reset()`, which drops the graphs; they are captured again on the next call.

Capture runs under the caller's autocast (enabled, dtype) with autocast's weight-cast cache off: with the cache on,
the graph would read the cached low-precision copies of the weights, which autocast frees when the caller's
outermost autocast exits, so later replays would read freed memory (torch's make_graphed_callables refuses that
case; here the casts are recorded into the graph and redone by every replay instead).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

MAX_GRAPHS = 8  # input shapes kept captured per model (least recently used dropped): each holds its activations
WARMUP_CALLS = 2


class GraphedForward:
    """model.forward, replayed from a CUDA graph per (shape, dtype, device, autocast) when it can be."""

    def __init__(self, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._model_ref = model  # not a submodule attribute: stored on the instance, not in the module tree
        self._forward = forward
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._pool = None

    def replays(self, x: torch.Tensor) -> bool:
        """Whether a call on x is replayed from a graph (else the ordinary forward runs)."""
        return (isinstance(x, torch.Tensor) and x.is_cuda and not self._model_ref.training
                and not torch.is_grad_enabled())

    def reset(self) -> None:
        """Drop every captured graph (call after the weights change)."""
        self._graphs.clear()
        self._pool = None

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self.replays(x):
            return self._forward(x, *args, **kwargs)
        dev = x.device.type
        key = (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled(dev),
               torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            self._graphs[key] = entry
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with autocast_without_cache(x.device.type):
            with torch.cuda.stream(side):  # warm-up: lazy caches (head tables, padded weights, autotune) fill here
                for _ in range(WARMUP_CALLS):
                    self._forward(static_in)
            torch.cuda.current_stream(x.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self._forward(static_in)
        return graph, static_in, static_out


def autocast_without_cache(device_type: str) -> torch.autocast:
    """The caller's autocast state on device_type (enabled or not, its dtype) with the weight-cast cache off: what
    a CUDA graph is captured under (module docstring)."""
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)


def use_cuda_graphs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Replay model's inference forward from CUDA graphs (see the module docstring); enabled=False undoes it.
    Returns the model (the same object: its attributes, state dict and saving are unchanged)."""
    graphed = isinstance(model.__dict__.get("forward"), GraphedForward)
    if graphed and not enabled:
        del model.__dict__["forward"]  # the class's forward again
    elif enabled and not graphed:
        model.forward = GraphedForward(model, model.forward)
    return model
