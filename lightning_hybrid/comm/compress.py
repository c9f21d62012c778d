"""Gradient compressors for the data-parallel axis, with error feedback and byte accounting.

Every compressor averages a list of gradient tensors over a process group *in place*
(``reduce(grads, key)``), working the same on gloo and NCCL:

- `NoCompression`: one fused all-reduce (the reference).
- `CastCompressor`: fp16 or bf16 on the wire, fp32 sums. On NCCL an all-reduce in the low
  precision; on gloo an all-gather of the low-precision tensors summed locally in fp32 (gloo has
  no bf16 reduction, which is why torch's bf16 hook refuses gloo).
- `PowerSGDCompressor`: rank-r approximation M ~ P Q^T with one power iteration per step, Q warm
  started from the previous step, error feedback (Vogels et al., 2019). Two all-reduces (P, Q) of
  (n + m) r numbers instead of n m. Exact at full rank.
- `TopKCompressor`: the ``density`` largest-magnitude entries of (residual + gradient), values and
  indices all-gathered and summed densely, so ranks may pick different indices; error feedback,
  optional momentum correction and factor masking and an exponential density warm-up as in Deep
  Gradient Compression (Lin et al., 2018). Exact at density 1.
- `SignCompressor`: 1 bit per entry plus one fp32 scale per tensor (mean |value|), error feedback
  (EF-SignSGD, Karimireddy et al., 2019; the scaling of 1-bit Adam).

Tensors with fewer than ``min_numel`` entries are sent uncompressed in one fused all-reduce (the
indices or factors would cost more than they save). State (residuals, Q) is kept per ``key`` and
tensor position and reset when a shape changes (DDP rebuilds its buckets after the first step).

`HierarchicalCompressor` (``hierarchical=True``) averages within each node exactly first and
only then across nodes with the chosen method: compression where the links are slow.

Byte accounting (`ByteCounter`) counts what this rank sends for each collective with the ring
algorithms gloo and NCCL use: all-reduce of B bytes over w ranks sends 2 (w-1)/w B, all-gather
of B bytes per rank sends (w-1) B.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from lightning_hybrid.timing import Stopwatch

MethodName = Literal["none", "fp16", "bf16", "powersgd", "topk", "sign"]
METHODS: tuple[str, ...] = ("none", "fp16", "bf16", "powersgd", "topk", "sign")


@dataclass
class GradientCompression:
    """How dense gradients are exchanged on the data-parallel axis (``HybridStrategy(gradient_compression=...)``).

    Attributes:
        method: ``"none"``, ``"fp16"``, ``"bf16"``, ``"powersgd"``, ``"topk"`` or ``"sign"``.
        rank: PowerSGD approximation rank.
        start_iter: steps exchanged uncompressed before compression starts (PowerSGD, top-k, sign;
            the first steps' large, fast-changing gradients are the ones compression hurts most).
        density: top-k fraction of entries sent, in (0, 1] (0.001 - 0.01 typical).
        warmup_steps: top-k density starts at 25% and decays exponentially to ``density`` over
            these steps after ``start_iter`` (DGC warm-up; 0: no warm-up).
        momentum: top-k momentum correction factor (DGC); 0 means plain error feedback. Use it with
            an optimizer without momentum (the correction is the momentum).
        min_numel: tensors with fewer entries are sent uncompressed.
        error_feedback: keep what compression dropped and add it to the next step's gradient.
        hierarchical: average within each node first (exactly), then across nodes with the chosen
            method, so compression only applies to the inter-node hop (nodes from the launcher's
            local world size). No effect when the data-parallel ranks share one node.
    """

    method: MethodName = "none"
    rank: int = 4
    start_iter: int = 10
    density: float = 0.01
    warmup_steps: int = 0
    momentum: float = 0.0
    min_numel: int = 1024
    error_feedback: bool = True
    hierarchical: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"GradientCompression(method={self.method!r}): use one of {list(METHODS)}.")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"GradientCompression(rank={self.rank!r}) must be an integer >= 1.")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"GradientCompression(density={self.density!r}) must be in (0, 1] (e.g. 0.01 keeps 1% of the entries).")
        if self.start_iter < 0 or self.warmup_steps < 0 or self.min_numel < 0:
            raise ValueError(
                f"GradientCompression: start_iter={self.start_iter}, warmup_steps={self.warmup_steps}, "
                f"min_numel={self.min_numel} must be >= 0."
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"GradientCompression(momentum={self.momentum!r}) must be in [0, 1).")


_THREAD = threading.local()


def untimed() -> None:
    """Stop `ByteCounter.timed` from timing this thread's collectives (the overlapped exchange's
    worker thread: the exchange times its exposed wait instead, where the step waits for it)."""
    _THREAD.untimed = True


class ByteCounter:
    """Bytes this rank sends, total and since the last `take_step`."""

    def __init__(self) -> None:
        self.total = 0
        self.step = 0
        self.seconds = 0.0  # time spent waiting in synchronous collectives since the last take_seconds
        self.watch: Stopwatch | None = None  # CUDA events of collectives on GPU tensors

    @contextmanager
    def timed(self, tensor: torch.Tensor) -> Iterator[None]:
        """Time a collective on ``tensor``: a host clock on CPU; CUDA events on GPUs (the host
        returns before the collective ends there), read by `take_seconds` one step later. Not
        on a thread marked `untimed`."""
        if getattr(_THREAD, "untimed", False):
            yield
            return
        if tensor.device.type != "cuda":
            started = time.perf_counter()
            try:
                yield
            finally:
                self.seconds += time.perf_counter() - started
            return
        if self.watch is None:
            self.watch = Stopwatch(tensor.device)
        with self.watch.span("collective"):
            yield

    def add(self, nbytes: float) -> None:
        self.total += int(nbytes)
        self.step += int(nbytes)

    def take_step(self) -> int:
        value, self.step = self.step, 0
        return value

    def take_seconds(self) -> float:
        """Seconds in collectives since the last call (on CUDA: those of the previous call's interval)."""
        value, self.seconds = self.seconds, 0.0
        if self.watch is not None:
            value += sum(self.watch.lap().values())
        return value

    @staticmethod
    def all_reduce_bytes(nbytes: int, world: int) -> float:
        return 2 * (world - 1) / world * nbytes if world > 1 else 0.0

    @staticmethod
    def all_gather_bytes(nbytes_per_rank: int, world: int) -> float:
        return (world - 1) * nbytes_per_rank


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Compressor:
    """Base class: averages ``grads`` over ``group`` in place; subclasses compress large tensors."""

    def __init__(self, config: GradientCompression | None = None, group: dist.ProcessGroup | None = None) -> None:
        self.config = config or GradientCompression()
        self.group = group
        self.counter = ByteCounter()
        self.state: dict[Any, dict[str, Any]] = {}
        self.calls: dict[str, int] = {}
        #: optimizer steps taken (advanced by whoever steps the optimizer; the DDP hook's iteration)
        self.optimizer_steps = 0

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    # -- collectives that count ---------------------------------------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.counter.add(ByteCounter.all_reduce_bytes(_nbytes(tensor), self.world))
        if self.world > 1:
            with self.counter.timed(tensor):
                dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.counter.add(ByteCounter.all_gather_bytes(_nbytes(tensor), self.world))
        if self.world == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        with self.counter.timed(tensor):
            dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def _dense_mean(self, tensors: list[torch.Tensor]) -> None:
        """Uncompressed average of ``tensors`` in one fused all-reduce."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self.all_reduce_sum(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    # -- the interface ------------------------------------------------------------------------

    def reduce(
        self, grads: list[torch.Tensor], key: str = "grads", *, names: list[str] | None = None, iteration: int | None = None
    ) -> None:
        """Replace every tensor of ``grads`` by its average over the group (approximately, for
        the lossy methods).

        ``names`` (one per tensor) key the per-tensor state (residuals, Q, momentum); without them
        it is keyed by ``key`` and position, which only holds while the same tensors come in the
        same order (DDP rebuilds its buckets after the first step, so the hook passes names).
        ``iteration`` (the optimizer step, for ``start_iter`` and the warm-up) defaults to the
        number of earlier calls with this ``key``.
        """
        if iteration is None:
            iteration = self.calls.get(key, 0)
            self.calls[key] = iteration + 1
        if names is None:
            names = [(key, i) for i in range(len(grads))]  # type: ignore[misc]
        kept = [(g, n) for g, n in zip(grads, names, strict=True) if g is not None]
        grads = [g for g, _ in kept]
        if self.world == 1 or not grads:
            return
        big = [i for i, g in enumerate(grads) if self._compressible(g)]
        if iteration < self.config.start_iter or not big:
            self._dense_mean(grads)
            return
        chosen = set(big)
        small = [g for i, g in enumerate(grads) if i not in chosen]
        self._dense_mean(small)
        self._compress_mean([grads[i] for i in big], [kept[i][1] for i in big], iteration)

    def _compressible(self, grad: torch.Tensor) -> bool:
        return grad.numel() >= self.config.min_numel

    def _compress_mean(self, grads: list[torch.Tensor], keys: list[Any], iteration: int) -> None:
        self._dense_mean(grads)

    def _slot(self, key: Any, shape: torch.Size) -> dict[str, Any]:
        slot = self.state.get(key)
        if slot is None or slot.get("shape") != shape:
            slot = {"shape": shape}
            self.state[key] = slot
        return slot

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: error-feedback residuals, PowerSGD's warm-start Q, top-k momentum
        (this rank's own; residuals differ per rank) and the per-key call counts that drive
        ``start_iter`` and the density warm-up."""
        return {
            "optimizer_steps": self.optimizer_steps,
            "calls": dict(self.calls),
            "state": {key: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in slot.items()} for key, slot in self.state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = dict(state["calls"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.state = {key: dict(slot) for key, slot in state["state"].items()}

    def residual_norm(self) -> float:
        """Sum of squares of the error-feedback residuals on this rank (what is still owed)."""
        return float(sum(float(s["residual"].double().pow(2).sum()) for s in self.state.values() if "residual" in s))


class NoCompression(Compressor):
    """The reference: every tensor averaged exactly, in one fused all-reduce."""

    def __init__(self, config: GradientCompression | None = None, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(GradientCompression(method="none", start_iter=0), group)

    def reduce(
        self, grads: list[torch.Tensor], key: str = "grads", *, names: list[str] | None = None, iteration: int | None = None
    ) -> None:
        grads = [g for g in grads if g is not None]
        if self.world > 1 and grads:
            self._dense_mean(grads)


class CastCompressor(Compressor):
    """fp16 / bf16 on the wire (no error feedback: the rounding is unbiased enough in practice).

    ``reduce_on_wire``: sum in the wire dtype with one all-reduce (default on NCCL, which reduces
    fp16/bf16 natively) instead of gathering and summing in fp32 (gloo). The gradients are divided
    by the world size *before* the cast, so the low-precision sum is of averages: a sum of
    world-size gradients could pass fp16's 65504 (and with precision="16-mixed" the gradients are
    loss-scaled) where each average does not.
    """

    def __init__(self, config: GradientCompression, group: dist.ProcessGroup | None = None, *, reduce_on_wire: bool | None = None) -> None:
        super().__init__(config, group)
        self.dtype = torch.float16 if config.method == "fp16" else torch.bfloat16
        self.reduce_on_wire = reduce_on_wire

    def reduce(
        self, grads: list[torch.Tensor], key: str = "grads", *, names: list[str] | None = None, iteration: int | None = None
    ) -> None:
        grads = [g for g in grads if g is not None]
        if self.world == 1 or not grads:
            return
        on_wire = self.reduce_on_wire if self.reduce_on_wire is not None else dist.get_backend(self.group) == "nccl"
        flat = torch.cat([g.reshape(-1).float() for g in grads]).div_(self.world).to(self.dtype)
        if on_wire:
            total = self.all_reduce_sum(flat).float()
        else:  # gloo: no low-precision reduction; gather and sum in fp32
            total = torch.stack([p.float() for p in self.all_gather(flat)]).sum(0)
        offset = 0
        for g in grads:
            g.copy_(total[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class PowerSGDCompressor(Compressor):
    """Rank-r PowerSGD with warm start and error feedback (tensors viewed as [shape[0], -1])."""

    def _compressible(self, grad: torch.Tensor) -> bool:
        return grad.dim() >= 2 and grad.numel() >= self.config.min_numel and min(grad.shape[0], grad[0].numel()) > 1

    def _compress_mean(self, grads: list[torch.Tensor], keys: list[Any], iteration: int) -> None:
        mats, slots = [], []
        for g, key in zip(grads, keys, strict=True):
            # (fp32 gradients are viewed, not copied: each is overwritten with its average at the end)
            m = g.reshape(g.shape[0], -1) if g.dtype == torch.float32 else g.reshape(g.shape[0], -1).float()
            slot = self._slot(key, g.shape)
            r = min(self.config.rank, m.shape[0], m.shape[1])
            if "q" not in slot:
                # the same random start on every rank (a fixed seed), as the averaged P needs
                gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(str(key).encode()))
                slot["q"] = torch.randn(m.shape[1], r, generator=gen).to(m.device)
                slot["residual"] = torch.zeros_like(m)
            if self.config.error_feedback:
                m.add_(slot["residual"])  # in place: no new full-size tensor per step
            mats.append(m)
            slots.append(slot)
        # P = M Q, averaged (summed) over ranks in one all-reduce, then orthonormalised
        ps = [m @ s["q"] for m, s in zip(mats, slots, strict=True)]
        flat_p = self.all_reduce_sum(torch.cat([p.reshape(-1) for p in ps]))
        offset = 0
        for i, p in enumerate(ps):
            ps[i] = torch.linalg.qr(flat_p[offset : offset + p.numel()].view_as(p), mode="reduced").Q
            offset += p.numel()
        # Q = M^T P, averaged
        qs = [m.t() @ p for m, p in zip(mats, ps, strict=True)]
        flat_q = self.all_reduce_sum(torch.cat([q.reshape(-1) for q in qs]))
        flat_q /= self.world
        offset = 0
        for g, m, p, q, slot in zip(grads, mats, ps, qs, slots, strict=True):
            q_avg = flat_q[offset : offset + q.numel()].view_as(q)
            offset += q.numel()
            approx = p @ q_avg.t()
            if self.config.error_feedback:
                torch.sub(m, approx, out=slot["residual"])
            slot["q"] = q_avg.clone()  # warm start for the next step
            g.copy_(approx.view_as(g))


class TopKCompressor(Compressor):
    """Top-k sparsification with error feedback, DGC momentum correction and density warm-up."""

    def density_at(self, iteration: int) -> float:
        target = float(self.config.density)
        steps = self.config.warmup_steps
        done = iteration - self.config.start_iter
        if steps <= 0 or done >= steps or target >= 0.25:
            return target
        return 0.25 * (target / 0.25) ** (done / steps)  # exponential 25% -> target

    def _compress_mean(self, grads: list[torch.Tensor], keys: list[Any], iteration: int) -> None:
        density = self.density_at(iteration)
        values, indices, ks = [], [], []
        scratch = torch.empty(max(g.numel() for g in grads), device=grads[0].device)  # |acc|, reused per tensor
        for g, key in zip(grads, keys, strict=True):
            flat = g.reshape(-1).float()
            slot = self._slot(key, g.shape)
            if "residual" not in slot:
                slot["residual"] = torch.zeros_like(flat)
                slot["velocity"] = torch.zeros_like(flat)
            # the accumulator is updated in place (the residual, or the velocity, becomes it): no
            # full-size tensor is allocated per step; values are read before anything is zeroed
            if self.config.momentum > 0:  # momentum correction: accumulate velocities, not gradients
                slot["velocity"].mul_(self.config.momentum).add_(flat)
                source = slot["velocity"]
            else:
                source = flat
            acc = slot["residual"].add_(source) if self.config.error_feedback else source
            k = max(1, math.ceil(density * acc.numel()))
            idx = top_k_indices(torch.abs(acc, out=scratch[: acc.numel()]), k)
            values.append(acc[idx])
            indices.append(idx.to(torch.int32))
            if self.config.error_feedback:
                acc[idx] = 0.0  # (the residual keeps what was not sent)
            if self.config.momentum > 0:
                slot["velocity"][idx] = 0.0  # momentum factor masking
            ks.append(k)
        all_values = self.all_gather(torch.cat(values))
        all_indices = self.all_gather(torch.cat(indices))
        # every rank sends k_t entries of tensor t (k depends on the shape only), so each rank's
        # message splits by the same sizes; the mean is written straight into the gradients (no
        # flat buffer to fill, divide and copy back: those were three passes over every value)
        per_rank = [(v.div_(self.world).split(ks), i.split(ks)) for v, i in zip(all_values, all_indices, strict=True)]
        for t, g in enumerate(grads):
            in_place = g.dtype == torch.float32 and g.is_contiguous()
            out = g.view(-1).zero_() if in_place else torch.zeros(g.numel(), device=g.device)
            for v, i in per_rank:
                out.index_add_(0, i[t], v[t])  # ranks may pick different indices: sum densely
            if not in_place:
                g.copy_(out.view_as(g))


_SAMPLES: dict[tuple[int, str], torch.Tensor] = {}


def top_k_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` largest entries of the 1-D ``magnitude`` (any order), as
    ``magnitude.topk(k).indices`` but faster on large tensors: a fixed random sample of up to 8192
    entries estimates the value above which about 2k entries lie, the entries above it are the
    candidates, and an exact top-k runs on the candidates only. With fewer than ``k`` candidates
    (an unlucky sample) it falls back to the full top-k, so the result is always exact."""
    n = magnitude.numel()
    if n < 16384 or 16 * k > n:  # small, or dense enough that the full top-k costs no more
        return magnitude.topk(k, sorted=False).indices
    key = (n, str(magnitude.device))
    sample = _SAMPLES.get(key)
    if sample is None:
        size = min(8192, n // 4)
        sample = torch.randint(0, n, (size,), generator=torch.Generator().manual_seed(n)).to(magnitude.device)
        _SAMPLES[key] = sample
    want = max(1, math.ceil(2 * k * sample.numel() / n))  # about 2k entries above the threshold
    threshold = magnitude[sample].topk(want, sorted=False).values.min()
    candidates = (magnitude >= threshold).nonzero().squeeze(1)
    if candidates.numel() < k:
        return magnitude.topk(k, sorted=False).indices
    return candidates[magnitude[candidates].topk(k, sorted=False).indices]


class SignCompressor(Compressor):
    """1-bit (sign) compression with one scale per tensor and error feedback."""

    def _compress_mean(self, grads: list[torch.Tensor], keys: list[Any], iteration: int) -> None:
        accs, scales = [], []
        for g, key in zip(grads, keys, strict=True):
            flat = g.reshape(-1).float()
            slot = self._slot(key, g.shape)
            if "residual" not in slot:
                slot["residual"] = torch.zeros_like(flat)
            acc = slot["residual"] + flat if self.config.error_feedback else flat
            scale = acc.abs().mean()
            if self.config.error_feedback:
                slot["residual"] = acc - scale * _sign(acc)
            accs.append(acc)
            scales.append(scale)
        bits = torch.cat([a >= 0 for a in accs])
        packed = _pack_bits(bits)
        all_packed = self.all_gather(packed)
        all_scales = self.all_gather(torch.stack(scales))
        total = torch.zeros(bits.numel(), device=bits.device)
        sizes = [a.numel() for a in accs]
        for p, s in zip(all_packed, all_scales, strict=True):
            signs = _unpack_bits(p, bits.numel()).float() * 2 - 1
            total += signs * torch.repeat_interleave(s, torch.tensor(sizes, device=s.device))
        total /= self.world
        offset = 0
        for g, n in zip(grads, sizes, strict=True):
            g.copy_(total[offset : offset + n].view_as(g))
            offset += n


def _sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n / 8)], 8 entries per byte."""
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, (-bits.numel()) % 8)).view(-1, 8)
    return (padded * _BIT_WEIGHTS.to(bits.device)).sum(1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    weights = _BIT_WEIGHTS.to(packed.device)
    return ((packed.unsqueeze(1) & weights) > 0).view(-1)[:n]


def build_compressor(config: GradientCompression | None, group: dist.ProcessGroup | None) -> Compressor:
    """The compressor for ``config`` (``None`` or method ``"none"``: exact averaging)."""
    if config is None or config.method == "none":
        return NoCompression(None, group)
    if config.method in ("fp16", "bf16"):
        return CastCompressor(config, group)
    if config.method == "powersgd":
        return PowerSGDCompressor(config, group)
    if config.method == "topk":
        return TopKCompressor(config, group)
    return SignCompressor(config, group)


def node_groups(ranks: list[int], local_world_size: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Create, collectively, the within-node and across-node subgroups of the process group made
    of ``ranks`` (global ranks; a node holds ``local_world_size`` consecutive ranks). Returns this
    rank's (intra-node, inter-node) groups, None where this rank is not in ``ranks``.

    Every rank of the job must call this with the same arguments in the same order.
    """
    by_node: dict[int, list[int]] = {}
    for r in sorted(ranks):
        by_node.setdefault(r // local_world_size, []).append(r)
    me = dist.get_rank()
    intra = inter = None
    for members in by_node.values():
        group = dist.new_group(members)
        if me in members:
            intra = group
    positions = max(len(m) for m in by_node.values())
    for position in range(positions):
        members = [m[position] for m in by_node.values() if position < len(m)]
        group = dist.new_group(members)
        if me in members:
            inter = group
    return intra, inter


class HierarchicalCompressor(Compressor):
    """Average within each node exactly (fast links), then across nodes with ``inter``, which may
    compress: compression applied only where it pays, on the slow links.

    ``counter`` counts both hops; ``intra_counter`` and ``inter.counter`` each hop.
    """

    def __init__(self, intra: dist.ProcessGroup, inter: Compressor) -> None:
        super().__init__(inter.config, inter.group)
        self.intra = intra
        self.inter = inter
        self.intra_counter = ByteCounter()

    @property
    def world(self) -> int:
        return dist.get_world_size(self.intra) * self.inter.world

    def state_dict(self) -> dict[str, Any]:
        return self.inter.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inter.load_state_dict(state)

    @property
    def optimizer_steps(self) -> int:  # type: ignore[override]
        return self.inter.optimizer_steps

    @optimizer_steps.setter
    def optimizer_steps(self, value: int) -> None:
        if hasattr(self, "inter"):
            self.inter.optimizer_steps = value

    def reduce(
        self, grads: list[torch.Tensor], key: str = "grads", *, names: list[str] | None = None, iteration: int | None = None
    ) -> None:
        if names is not None:
            names = [n for g, n in zip(grads, names, strict=True) if g is not None]
        grads = [g for g in grads if g is not None]
        if not grads:
            return
        before = self.inter.counter.total
        local = dist.get_world_size(self.intra)
        if local > 1:
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            nbytes = ByteCounter.all_reduce_bytes(_nbytes(flat), local)
            self.intra_counter.add(nbytes)
            self.counter.add(nbytes)
            with self.counter.timed(flat):
                dist.all_reduce(flat, group=self.intra)
            flat /= local
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        self.inter.reduce(grads, key, names=names, iteration=iteration)
        self.counter.add(self.inter.counter.total - before)
        self.counter.seconds += self.inter.counter.take_seconds()
