"""The memory model of the hybrid loop: a small KV-cached transformer with its own
sentencepiece tokenizer that reads (prompt, chain-of-thought) and writes a condensed,
refined prompt. Pretrained on packaged text, warm-started on extractive condensations,
then post-trained with REINFORCE against the large model's answer likelihood.

Entry point: `python -m memory_model --help`. The shipped checkpoint lives in
`memory_model/checkpoints/default` and is what the server loads for the hybrid loop.
"""
