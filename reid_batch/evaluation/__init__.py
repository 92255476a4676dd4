"""The phases of `reid-batch evaluate`, one module each: stage 1's image sets (`stage1`), the likely samples and their
neighbours (`likely`), re-identification (`reidentify`), the leak statistic's measurements (`membership`), the ppa
attack's samples (`ppa`), the positive controls (`controls`), and what is committed (`outputs`). The stage
(reid_batch.stages.evaluate) calls them in order."""
