"""Generation schemes, one module each (see bezoar_jobs.registry.SCHEMES)."""
