"""Gradient exchange on the data-parallel axis: compression, byte accounting, sync/async modes.

- `compress`: compressors that average a list of gradients over a process group with fewer bytes
  (fp16/bf16 casting, PowerSGD, top-k sparsification, 1-bit sign), each with error feedback where
  the method needs it, all working on gloo (CPU) and NCCL (GPU).
- `hooks`: the same compressors as DDP communication hooks.
- `modes`: local SGD (periodic model averaging) and bounded-staleness asynchronous updates.
"""

from lightning_hybrid.comm.compress import (
    ByteCounter,
    CastCompressor,
    Compressor,
    GradientCompression,
    NoCompression,
    PowerSGDCompressor,
    SignCompressor,
    TopKCompressor,
    build_compressor,
)

__all__ = [
    "ByteCounter",
    "CastCompressor",
    "Compressor",
    "GradientCompression",
    "NoCompression",
    "PowerSGDCompressor",
    "SignCompressor",
    "TopKCompressor",
    "build_compressor",
]
