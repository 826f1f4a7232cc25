"""Speech Commands data: indexing, decoding, sampling, augmentation, the DataModule, synthetic speech."""
