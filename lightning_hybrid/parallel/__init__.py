"""Plain functions, one module per technique, usable without Lightning.

- `embedding`: find and shard torchrec embedding modules in place.
- `embedding_optim`: give sharded tables the optimizer the user configured.
- `embedding_comm`: count the bytes of torchrec's embedding collectives.
- `replica_lookup`: one embedding lookup per data-parallel replica under tensor parallelism.
- `data`: data parallelism for the dense rest.
- `tensor`: tensor (and sequence) parallelism by module-name plans.
- `pipeline`: pipeline stages and schedules.
- `clip`: gradient-norm clipping across shards.
- `amp`: fp16 loss scaling when gradients are sharded.
- `tied_output`: item scores through the sharded item table itself (exact shard-parallel softmax, ranks, top-k).
- `lookup_load`: lookups served per rank, from the plan's shard row ranges.
- `table_groups`: tables sharded inside groups of ranks (a node), one copy per group (torchrec's 2D layout).
"""
