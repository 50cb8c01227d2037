"""Data: raw files -> tokenized Megatron-compatible indexed datasets -> training micro-batches.

names.py       the file names of every data kind (preprocess writes them, training finds them)
indexed.py     .bin/.idx writer, memory-mapped reader, shard merge
sources.py     input discovery, splitting for workers, record streams
handlers/      pretrain, alpaca, sharegpt, openai, pairwise, prm: record -> token sequences
templates.py   chat templates and assistant spans (loss masks)
packing.py     packing SFT samples into fixed-size sequences
preprocess.py  the `meshtron preprocess` engine (workers, progress, atomic outputs)
samples.py     pretraining sample index, SFT/pairwise rows, blending
loader.py      build_dataset and the resumable, dp-sharded DataLoader
"""
