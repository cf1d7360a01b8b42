"""The job system: manifest, prompts, shards, the Ray actor pool, workers, writer and output."""
