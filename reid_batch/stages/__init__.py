"""The pipeline's stages, one module per `reid-batch` command, as peers: no stage imports another.

    make_phantoms ....... the synthetic world          finetune .. stage 1: the generator toward a frozen target
    train_prior ......... the PGGAN prior              sample .... stage 2: every candidate id -> one Parquet row
    train_target ........ the target model(s)          select .... stage 2: ids low on objective AND Mahalanobis
    train_demographics .. the age/sex model            score ..... age and sex of the selected candidates
                                                       evaluate .. what the attack recovered; report .. the report

Each reads top to bottom: set up from the manifest and the committed inputs, do the work, commit. What they share
lives beneath them (attack/, analysis/, models/, data/, artifacts, layout, storage, runtime); the stage list, what
each needs and how it shards is reid_batch/registry.py.
"""
