"""meddiff: diffusion models for medical-image anomaly detection and denoising.

Layers (arrows point one way): ``data`` and ``nets`` know nothing of models; ``diffusion`` (the scheduler
core, pure torch) knows nothing of Lightning, data or anomaly detection; ``models`` compose the rest;
``anomaly`` turns a model's healthy reconstruction into maps and scores; ``metrics`` turns scores into numbers.
"""

__version__ = "0.1.0"
