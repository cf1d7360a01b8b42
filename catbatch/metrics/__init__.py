"""Per-sample metrics: row columns (MACs, latency, cost), CLIP score, fidelity, paper configs."""
