"""Adaptive load balancing of pipeline stages (see `partition` and `profile`).

The balancer measures what each block costs on the actual hardware (forward + backward time,
memory), then cuts the blocks into contiguous stages so that the slowest stage is as fast as
possible (an exact dynamic program), counting the input part in the first stage and the loss head
in the last, and dividing each stage's cost by its rank's measured speed (heterogeneous devices). `adaptive` re-measures
while training and moves blocks (with their optimizer state) between ranks when stages drift.
"""

from lightning_hybrid.balance.partition import StagePlan, partition_blocks, stage_costs
from lightning_hybrid.balance.profile import BlockProfile, balanced_split_for, profile_blocks

__all__ = ["BlockProfile", "StagePlan", "balanced_split_for", "partition_blocks", "profile_blocks", "stage_costs"]
