"""Test-session settings: one thread per process (2-core machines), quiet third-party warnings."""

import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")

import torch  # noqa: E402

torch.set_num_threads(1)
