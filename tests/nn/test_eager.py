"""The eager-mode helpers: module calls that skip ``nn.Module.__call__`` only when nothing would notice."""

from __future__ import annotations

import torch

from moe_lab.nn.eager import call_module


def test_call_module_skips_only_an_unhooked_call():
    """call_module goes straight to forward only when nothing would observe the call; every kind of hook
    still fires."""
    from torch.nn.modules.module import register_module_forward_hook

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    assert torch.equal(call_module(lin, x), lin(x))
    seen: list[str] = []
    handles = [
        lin.register_forward_pre_hook(lambda m, a: seen.append("pre")),
        lin.register_forward_hook(lambda m, a, o: seen.append("post")),
        lin.register_full_backward_hook(lambda m, gi, go: seen.append("backward")),
    ]
    call_module(lin, x).sum().backward()
    assert seen == ["pre", "post", "backward"]
    for h in handles:
        h.remove()
    seen.clear()
    call_module(lin, x)
    assert seen == []
    handle = register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        call_module(lin, x)
    finally:
        handle.remove()
    assert seen == ["Linear"]


def test_call_module_keeps_a_custom_dunder_call():
    class Loud(torch.nn.Linear):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs) * 2

    lin = Loud(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(call_module(lin, x), lin.forward(x) * 2)
