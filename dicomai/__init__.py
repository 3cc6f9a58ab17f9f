"""dicomai: a DICOM AI worker daemon beside the PACS."""

__version__ = "0.1.0"
