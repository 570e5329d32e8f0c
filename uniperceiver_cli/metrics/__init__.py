"""Evaluation metrics as pure functions: captions, retrieval, classification, GLUE, VQA.

`caption` (BLEU/METEOR/ROUGE-L/CIDEr-D without Java) and `score` (COCO files -> caption metrics) are
torch-free; `retrieval` and `classification` take tensors. Import the submodule you need; this package
imports nothing heavy.
"""
