"""Sample data: user files and arrays in, model-ready batches out (calibration and validation).

- ``samples``: ``open_samples`` (files, folders, arrays, iterables) -> ``SampleSet``.
- ``preprocess``: ``Preprocess`` options and the image pipeline.
- ``text``: raw text tokenised with a Hugging Face ``tokenizer.json``.
"""
