"""Measuring the zoo's models without Inception weights (`ddserve eval`).

Generative quality is measured on the penultimate features of an evaluation classifier trained on
the same dataset (`<dataset>-eval-classifier`): the Fréchet distance (`frechet.py`) beside its data
floor, precision and recall (`precision_recall.py`), the classifier's accuracy on conditional
samples (`accuracy.py`); autoencoders by reconstruction (`autoencoder.py`); inpainting by RePaint
completions of half-masked test images (`inpainting.py`). `report.py` writes metrics.json, the
sample grid and the model card.
"""
