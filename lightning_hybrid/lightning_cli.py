"""LightningCLI with this package's defaults, for ``lightning-hybrid fit|validate|test|predict``
(`lightning_hybrid.cli` imports it only for those subcommands: it loads Lightning)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import lightning_hybrid  # noqa: F401 - registers strategy="hybrid"


class HybridCLI(LightningCLI):
    """LightningCLI whose defaults suit multi-process CPU/GPU runs of this package (module level:
    the spawn launcher pickles it by reference)."""

    def before_instantiate_classes(self) -> None:
        # one thread per rank unless the user chose otherwise: ranks share the machine's cores
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._follow_checkpoint_item_ids()

    def _follow_checkpoint_item_ids(self) -> None:
        """With --ckpt_path, a data module that can follow a checkpoint's id -> row mapping
        (SequenceDataModule(item_ids_from=...)) follows that checkpoint's, unless told otherwise."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        ckpt = config.get("ckpt_path") if config is not None else None
        init_args = config.get("data", {}).get("init_args") if config is not None and config.get("data") else None
        if not ckpt or init_args is None or "item_ids_from" not in init_args or init_args.get("item_ids_from"):
            return
        if os.path.exists(str(ckpt)):
            from lightning_hybrid.data.item_ids import saved_item_ids

            if saved_item_ids(str(ckpt)) is not None:
                init_args["item_ids_from"] = str(ckpt)


def run(args: list[str]) -> None:
    HybridCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
