"""Real reasoning tasks (SVAMP, GSM8K): loading, the seeded SVAMP split, chain-of-thought
targets written from SVAMP's equations, and answer checking. Stdlib only; imports nothing
of this project, so compress (task fine-tuning), memory_model (condensation training) and
the benchmarks (evaluation) all read the same problems the same way."""
