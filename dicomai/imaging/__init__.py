"""DICOM to model input: decoding, modality and VOI LUTs, MONOCHROME1, resizing, normalising."""
