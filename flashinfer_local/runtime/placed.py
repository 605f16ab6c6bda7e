"""A stored placement at run time: device-pinned neurons computed by torch on the device, the rest
by the CPU backend, the two partial outputs summed.

``PlacedFFN`` wraps an FFN backend (``backend.FFNBackend``). Per layer it launches the device's
share first (on CUDA the kernels run asynchronously while the CPU computes), hands the CPU backend
the token's mask with the device neurons taken out, then adds the device's output. The device
neurons' weights are f16 on an accelerator and f32 on ``cpu`` (where the "device" is torch on the
same cores: what the tests use, and exact to float rounding). The DRAM-pinned tier needs no code
here: the streaming backend holds those neurons at the front of its windows (``pinned``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from predictors.activation import gate_activation
from predictors.placement import DEVICE, PINNED
from storage import format as fmt
from storage.errors import FlashinferError
from storage.reader import Bundle

from flashinfer_local.runtime.backend import FFNCounters

DEVICES = ("cpu", "cuda", "mps")


def check_device(device: str) -> torch.device:
    """The torch device of a plan's device, or a one-line error when this machine has none."""
    if device not in DEVICES:
        raise FlashinferError(f"device {device!r} is not known (choose {', '.join(DEVICES)})")
    ok = device == "cpu" or (device == "cuda" and torch.cuda.is_available()) or \
        (device == "mps" and torch.backends.mps.is_available())
    if not ok:
        raise FlashinferError(f"the stored placement puts neurons on {device}, which this machine does not have; "
                              "re-run flashinfer-local plan with --device cpu (or without --gpu-mem), or run with "
                              "--placement none")
    return torch.device(device)


def device_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.float16


def device_bytes_per_neuron(cfg, device: str, gate_split: bool = False) -> int:
    """Device memory one device-pinned neuron takes: its gate (unless the bundle's gate is split:
    the gate values come computed), up and down vectors (and a bias)."""
    n = len(fmt.weight_fields(cfg, gate_split)) * cfg.d_model + (0 if cfg.gated else 1)
    return n * torch.tensor([], dtype=device_dtype(device)).element_size()


def device_ffn(x: torch.Tensor, w: dict, mask: torch.Tensor | None = None,
               gate: torch.Tensor | None = None, act=F.silu) -> torch.Tensor:
    """The FFN of the neurons whose fields ``w`` holds on a device (gate/up/down [n, d], or up,
    up_bias and down for ReLU models), for x [T, d] on the CPU; ``mask`` [T, n] keeps each token's
    own; ``gate`` [T, n] (on the CPU): their gate values where ``w`` holds no gate (a gate-split
    bundle); ``act`` the model's gate activation. Returns [T, d] on the device (asynchronous there)."""
    dev, dt = w["up"].device, w["up"].dtype
    xd = x.to(dev, dt, non_blocking=True)
    if gate is not None:
        h = act(gate.to(dev, dt, non_blocking=True)) * (xd @ w["up"].T)
    elif "gate" in w:
        h = act(xd @ w["gate"].T) * (xd @ w["up"].T)
    else:
        h = F.relu(xd @ w["up"].T + w["up_bias"])
    if mask is not None:
        h = h * mask.to(dev, h.dtype, non_blocking=True)
    return h @ w["down"]


def pinned_ids(tiers: list[np.ndarray]) -> list[np.ndarray]:
    return [np.flatnonzero(t == PINNED).astype(np.int64) for t in tiers]


class DevicePart:
    """The device-pinned neurons of every layer as torch tensors on ``device``."""

    def __init__(self, bundle: Bundle, tiers: list[np.ndarray], device: str):
        cfg = bundle.config
        self.dev, self.act = check_device(device), gate_activation(cfg)
        dt = device_dtype(device)
        self.ids, self.w = [], []
        for i, t in enumerate(tiers):
            ids = np.flatnonzero(t == DEVICE).astype(np.int64)
            self.ids.append(torch.from_numpy(ids))
            if not len(ids):
                self.w.append(None)
                continue
            rec = bundle.read_ffn_layer(i)[ids]

            def get(name, rec=rec):
                return torch.from_numpy(np.ascontiguousarray(bundle.field_f32(rec, name))).to(self.dev, dt)
            self.w.append({n: get(n) for n in bundle.layout.vectors}
                          | ({} if cfg.gated else {"up_bias": get("up_bias")[:, 0].contiguous()}))
        cpu = np.ones((len(tiers), cfg.d_ff), bool)
        for i, ids in enumerate(self.ids):
            cpu[i, ids.numpy()] = False
        self.cpu_mask = torch.from_numpy(cpu)          # [n_layers, d_ff]: neurons the CPU computes

    def tensors(self) -> list[torch.Tensor]:
        return [t for w in self.w if w for t in w.values()]

    def launch(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None,
               gate: torch.Tensor | None = None) -> torch.Tensor | None:
        """Start the layer's device share for x [T, d] (``gate`` [T, d_ff]: a gate-split bundle's
        gate values); returns its output [T, d] on the device."""
        w = self.w[layer]
        if w is None:
            return None
        ids = self.ids[layer]
        return device_ffn(x, w, None if mask is None else mask[:, ids], None if gate is None else gate[:, ids],
                          self.act)


class PlacedFFN:
    """An FFN backend whose device-pinned neurons run on the device (``DevicePart``) beside the
    CPU backend ``inner``, which computes the rest."""

    def __init__(self, inner, device: DevicePart):
        self.inner, self.device = inner, device

    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None) -> torch.Tensor:
        out_dev = self.device.launch(layer, x, mask, gate)
        if out_dev is None:
            return self.inner(layer, x, mask, gate)
        cpu = self.device.cpu_mask[layer:layer + 1]
        cpu_mask = cpu.expand(x.shape[0], -1).contiguous() if mask is None else mask & cpu
        out = self.inner(layer, x, cpu_mask, gate)
        return out + out_dev.to("cpu", torch.float32)

    def start_token(self) -> None:
        self.inner.start_token()

    def resident(self) -> dict[str, list]:
        r = self.inner.resident()
        if self.device.dev.type == "cpu":     # a CPU device's tensors are DRAM
            r = {**r, "ffn_dram": r.get("ffn_dram", []) + self.device.tensors()}
        return r

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.device.tensors())

    def counters(self) -> FFNCounters:
        return self.inner.counters()

    def cache_rows(self) -> list[int]:
        return self.inner.cache_rows()

    def resident_only(self):
        return self.inner.resident_only()

    def close(self) -> None:
        self.inner.close()
