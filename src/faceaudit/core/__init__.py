"""Plumbing every stage shares: the stage runner, files and manifests, CLI helpers,
images, figures, ranking and statistics, geometry."""
