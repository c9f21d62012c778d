"""Plain functions, one module per technique, usable without Lightning.

- `embedding`: find and shard torchrec embedding modules in place.
- `embedding_optim`: give sharded tables the optimizer the user configured.
- `data`: data parallelism for the dense rest.
"""
