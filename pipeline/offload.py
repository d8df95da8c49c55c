"""Where a pipeline's modules wait while they do not run, for GPUs too small to hold a whole stage.

- `none`: every module stays on the device.
- `model`: each module (text encoder, Stage C; text encoder, Stage B, Stage A) waits in CPU memory, pinned on CUDA,
  and is copied to the device whole while it runs. The copy of the module that runs next starts, on a copy stream,
  while the current one runs (CUDA only; elsewhere copies happen in order when a module starts). Peak device memory
  is that of two consecutive modules instead of all of them.
- `sequential`: one block at a time: every module that holds weights of its own (a convolution, a linear layer, a
  CLIP embedding, a Stage A mixing block, an attention block) is copied to the device just before its forward pass
  and dropped after it. Least memory, slowest: every weight crosses the bus on every sampler step.

A waiting module's weights are zero-size placeholders on the device, so any use outside a `running` block fails at
once (on the CPU too) instead of computing with weights in the wrong place. Copies never change values: images are
identical in the three modes.
"""

from contextlib import contextmanager

import torch
from torch import nn

OFFLOAD_MODES = ("none", "model", "sequential")


def check_offload(mode) -> str:
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
    return mode


def host_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU copy a tensor waits in: pinned when it goes to a CUDA device, so copies can run asynchronously."""
    host = tensor.detach().to("cpu")
    return host.pin_memory() if device.type == "cuda" else host


class CopyStream:
    """A CUDA stream for copies that overlap computation; on other devices copies run in order and this is inert."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextmanager
    def copying(self):
        if self.stream is None:
            yield
        else:
            with torch.cuda.stream(self.stream):
                yield

    def hand_over(self, tensors: list[torch.Tensor]) -> None:
        """Makes the computing stream wait for the copies, and keeps the copy stream from reusing their memory
        while the computing stream may still read it."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for tensor in tensors:
            tensor.record_stream(current)


class _Slot:
    """Tensors that move together: a module's own parameters and buffers, or those of its whole subtree."""

    def __init__(self, module: nn.Module, recurse: bool, device: torch.device):
        self.device = device
        owners = module.modules() if recurse else [module]
        self.entries = [(owner, store, name, host_copy(tensor, device))
                        for owner in owners for store in ("_parameters", "_buffers")
                        for name, tensor in getattr(owner, store).items() if tensor is not None]
        self.state = "loaded"
        self.unload()

    def _set(self, owner: nn.Module, store: str, name: str, tensor: torch.Tensor) -> None:
        if store == "_parameters":
            owner._parameters[name].data = tensor
        else:
            owner._buffers[name] = tensor

    def load(self, state: str = "loaded") -> list[torch.Tensor]:
        """Copies the tensors to the device (asynchronously from pinned memory on CUDA); `state` is "copying"
        when the copies run on a copy stream that the computing stream has yet to wait for."""
        non_blocking = self.device.type == "cuda"
        loaded = []
        for owner, store, name, host in self.entries:
            tensor = host.to(self.device, non_blocking=non_blocking)
            self._set(owner, store, name, tensor)
            loaded.append(tensor)
        self.state = state
        return loaded

    def unload(self) -> None:
        if self.state == "offloaded":
            return
        for owner, store, name, host in self.entries:
            self._set(owner, store, name, torch.empty(0, dtype=host.dtype, device=self.device))
        self.state = "offloaded"


class Offloader:
    """Places a pipeline's modules for an offload mode and moves them while they run (see the module's docstring)."""

    def __init__(self, mode: str = "none", device=None):
        self.mode = check_offload(mode)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.copies = CopyStream(self.device) if mode == "model" else None
        self.slots: dict[nn.Module, _Slot] = {}
        self.in_flight: dict[nn.Module, list[torch.Tensor]] = {}

    def manage(self, module: nn.Module) -> nn.Module:
        """Places a module (loaded on the CPU) for this mode; returns it."""
        if self.mode == "none":
            return module.to(self.device)
        if self.mode == "model":
            self.slots[module] = _Slot(module, recurse=True, device=self.device)
        else:
            for unit in self.units(module):
                self.attach(unit)
        return module

    @staticmethod
    def units(module: nn.Module):
        """The blocks of sequential offload: modules with weights of their own, taken whole with their children,
        and modules that read their children's weights outside the children's forward (attention's key_value)."""
        own = any(t is not None for t in [*module._parameters.values(), *module._buffers.values()])
        if own or hasattr(module, "key_value"):
            yield module
            return
        for child in module.children():
            yield from Offloader.units(child)

    def attach(self, unit: nn.Module) -> None:
        slot = _Slot(unit, recurse=True, device=self.device)
        self.slots[unit] = slot

        def load(module, args) -> None:
            slot.load()

        def unload(module, args, output) -> None:
            slot.unload()

        unit.register_forward_pre_hook(load)
        unit.register_forward_hook(unload)
        if hasattr(unit, "key_value"):
            key_value = unit.key_value

            def loaded_key_value(*args, **kwargs):
                slot.load()
                try:
                    return key_value(*args, **kwargs)
                finally:
                    slot.unload()
            unit.key_value = loaded_key_value

    def resident(self) -> list[nn.Module]:
        """The managed modules whose weights are on the device now (for tests and diagnostics)."""
        return [module for module, slot in self.slots.items() if slot.state != "offloaded"]

    @contextmanager
    def running(self, module: nn.Module, then: nn.Module | None = None):
        """Holds `module` on the device for the block (in model mode), and starts copying `then`, which runs next."""
        if self.mode != "model":
            yield
            return
        slot = self.slots[module]
        if slot.state == "copying":
            self.copies.hand_over(self.in_flight.pop(module))
            slot.state = "loaded"
        elif slot.state == "offloaded":
            slot.load()
        if then is not None and self.slots[then].state == "offloaded" and self.copies.stream is not None:
            with self.copies.copying():
                self.in_flight[then] = self.slots[then].load(state="copying")
        try:
            yield
        finally:
            slot.unload()
