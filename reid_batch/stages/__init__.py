"""Stage 2 at cluster scale: sample candidates (sharded, chunked, resumable), select the likely ones, score them.

    sample.py   every candidate id -> one Parquet row of objective terms, Mahalanobis distance, image statistics;
                shard i of `sampling.num_shards` owns a fixed contiguous id range, committed chunk by chunk
    select.py   global thresholds over all committed shards -> <target>/selection/ (ids low on BOTH scores)
    score.py    demographic model on the selected ids' regenerated images -> <target>/scores/shard=<i>/

A candidate is never stored as an image unless asked: its latent is a pure function of (sampling.seed, id), so
any stage regenerates it from its id with the fine-tuned generator.
"""
