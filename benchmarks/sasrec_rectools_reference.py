"""The published SASRec, run here: RecTools' own SASRecModel on the same file and protocol as ours.

The Amazon figures issue 19 compares with (SASRec with sampled softmax, github.com/blondered/
transformer_benchmark, eSASRec, RecSys 2025) come from RecTools' ``SASRecModel``. This script runs
that implementation on one of S3Rec's line files with the benchmark's Beauty settings (1 block,
1 head, dropout 0.2, max_len 50, 256 negatives per position, Adam 1e-3, batch 128, Xavier init),
leave-one-out as transformer_benchmark splits it (last item test, cold test items dropped; the
last training item of each user is the validation target), validation recall@10 every epoch with
early stopping, then the best checkpoint's validation and test HR@10 / NDCG@10 with the user's
history filtered (``filter_viewed``), so its numbers sit beside `benchmarks/sasrec_quality.py`'s.

RecTools is not a dependency of this package (it pins its own pytorch-lightning):

    pip install --target /tmp/rtpkgs "rectools==0.19.0" "pytorch-lightning==2.5.2" pandas scipy ...
    PYTHONPATH=/tmp/rtpkgs python benchmarks/sasrec_rectools_reference.py --data Beauty.txt \\
        --workdir /tmp/r64 --d-model 64 --out r64.json
    PYTHONPATH=/tmp/rtpkgs python benchmarks/sasrec_rectools_reference.py --data Beauty.txt \\
        --evaluate /tmp/r64/lightning_logs/version_0/checkpoints/best.ckpt   # a checkpoint so far
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

try:
    import numpy as np
    import pandas as pd
    import torch
    from pytorch_lightning import Callback, Trainer
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel
except ImportError as error:  # pragma: no cover - an optional comparison
    raise SystemExit(f"sasrec_rectools_reference.py needs RecTools with torch ({error}); see the module docstring.") from error


def _rank_from_end(frame: pd.DataFrame) -> pd.Series:
    return frame.groupby(Columns.User)[Columns.Datetime].rank(ascending=False, method="first")


def load_splits(path: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """S3Rec lines -> (train, test) as transformer_benchmark splits them (timestamps = positions)."""
    rows = [(int(user), int(item), t, 1) for line in open(path) for user, *items in [line.split()] for t, item in enumerate(items, 1)]
    frame = pd.DataFrame(rows, columns=[Columns.User, Columns.Item, Columns.Datetime, Columns.Weight])
    last = _rank_from_end(frame) == 1
    train, test = frame[~last], frame[last]
    return train, test[test[Columns.Item].isin(train[Columns.Item].unique())]


class ValRecall(Callback):
    """recall@10 of the validation target, the batch's own history masked (transformer_benchmark's RecallCallback)."""

    def __init__(self) -> None:
        self.hits: list[torch.Tensor] = []

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "logits" in outputs:
            logits = outputs["logits"].clone()
        else:  # the sampled loss returns the sampled logits only: score the whole catalogue
            sessions = pl_module.torch_model.encode_sessions(batch, pl_module.item_embs)[:, -1, :]
            logits = pl_module.torch_model.similarity_module(sessions, pl_module.item_embs)
        logits.scatter_(1, batch["x"], float("-inf"))
        self.hits.append((logits.topk(10).indices == batch["y"][:, :1]).any(1).float())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        pl_module.log("recall@10", float(torch.cat(self.hits).mean()))
        self.hits.clear()


_ARGS: argparse.Namespace | None = None  # read by the module-level functions RecTools stores in its config


def validation_mask(frame: pd.DataFrame) -> np.ndarray:
    """Each user's last training interaction is the validation target."""
    return (_rank_from_end(frame) == 1).values


def make_trainer() -> Trainer:
    assert _ARGS is not None
    return Trainer(
        max_epochs=_ARGS.max_epochs, deterministic=True, enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(_ARGS.workdir), accelerator="cpu", devices=1,
        callbacks=[ValRecall(), ModelCheckpoint(monitor="recall@10", mode="max", filename="best"),
                   EarlyStopping(monitor="recall@10", mode="max", patience=_ARGS.patience)],
    )


def evaluate(model: SASRecModel, train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    def score(history: pd.DataFrame, target: pd.DataFrame) -> tuple[float, float]:
        reco = model.recommend(users=target[Columns.User].unique(), dataset=Dataset.construct(history), k=10, filter_viewed=True)
        hit = reco.merge(target[[Columns.User, Columns.Item]], on=[Columns.User, Columns.Item])
        return len(hit) / len(target), float((1 / np.log2(hit[Columns.Rank] + 1)).sum() / len(target))

    before_val = train[_rank_from_end(train) > 1]
    val = train[_rank_from_end(train) == 1]
    val = val[val[Columns.Item].isin(before_val[Columns.Item].unique())]
    (val_hr, val_ndcg), (test_hr, test_ndcg) = score(before_val, val), score(train, test)
    return {"val_hr@10": val_hr, "val_ndcg@10": val_ndcg, "test_hr@10": test_hr, "test_ndcg@10": test_ndcg}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="S3Rec line file (user item item ...)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--workdir", default="rectools_runs")
    parser.add_argument("--evaluate", default=None, help="only evaluate this checkpoint (e.g. best.ckpt of a run still going)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    train, test = load_splits(args.data)
    started = time.perf_counter()
    if args.evaluate:
        model = SASRecModel.load_from_checkpoint(
            args.evaluate, map_location="cpu", model_params_update={"get_val_mask_func": None, "get_trainer_func": None, "epochs": 10**6}
        )
        checkpoint, epochs = args.evaluate, None
    else:
        global _ARGS
        _ARGS = args
        model = SASRecModel(
            n_factors=args.d_model, session_max_len=50, n_blocks=1, n_heads=1, dropout_rate=0.2, loss="sampled_softmax",
            n_negatives=256, lr=1e-3, batch_size=128, get_val_mask_func=validation_mask,
            get_trainer_func=make_trainer,
        )
        model.fit(Dataset.construct(train))
        checkpoint, epochs = model.fit_trainer.checkpoint_callback.best_model_path, model.fit_trainer.current_epoch
        model.lightning_model.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    result = {"data": args.data, "d_model": args.d_model, "checkpoint": checkpoint, "epochs": epochs,
              "best_epoch": torch.load(checkpoint, weights_only=False)["epoch"], **evaluate(model, train, test),
              "seconds": round(time.perf_counter() - started)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
