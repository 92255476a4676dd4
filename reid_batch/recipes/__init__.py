"""Self-contained training recipes, one per job, driven by the manifest."""
