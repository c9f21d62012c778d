"""Run under torchrun by tests/test_simulated_nodes.py: the composition matrix's dp2 row-wise cell
as 2 nodes x 1 process; rank 0 saves the step losses and the whole weights to argv[1]."""

from __future__ import annotations

import sys
import warnings

import torch


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.composition import DATA, STEPS, USERS, _model, _record
    from tests.helpers import quiet_trainer

    model, record = _model(), _record()
    strategy = HybridStrategy(embedding_sharding={"item_id": "row_wise"}, timeout_s=120.0)
    trainer = quiet_trainer(strategy=strategy, devices=1, num_nodes=2, max_epochs=STEPS, limit_val_batches=0, callbacks=[record])
    trainer.fit(model, datamodule=SequenceDataModule(**DATA, batch_size=USERS // 2))
    state = full_state_dict(model)
    if trainer.global_rank == 0:
        torch.save({"losses": record.losses, "state": state, "num_nodes": trainer.num_nodes, "node_rank": trainer.node_rank}, out)


if __name__ == "__main__":
    main(sys.argv[1])
