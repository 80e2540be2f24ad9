"""The engine: requests become prompts and batches, batches become token streams.

``static`` (the Engine: prepare, batch, generate), ``batching`` (which rows run together, how
their inputs join), ``work`` (one job as the engine sees it), ``textstream`` (token ids to
whole-character deltas), ``sanitize`` (control tokens in request text) and ``publisher`` (one
Redis trip per step for every row)."""
