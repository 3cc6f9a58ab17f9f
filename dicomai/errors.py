"""The exception hierarchy; edges turn it into a DICOM status or an exit code."""

from __future__ import annotations


class DicomaiError(Exception):
    """Base of every error dicomai raises on purpose; its message is safe to show a user."""


class ConfigError(DicomaiError):
    """The configuration file or environment is invalid."""


class InvalidInstance(DicomaiError):
    """A received object cannot be stored (bad UID, unreadable header, ...)."""


class StorageUnavailable(DicomaiError):
    """The spool or database cannot take the object now; the sender should retry later."""


class DatabaseUnavailable(StorageUnavailable):
    """The database cannot record the object now (nor, likely, an audit row about it)."""


class ModelPackageError(DicomaiError):
    """A model package is malformed, its weights do not match, or it cannot be loaded."""


class NotEvaluable(DicomaiError):
    """An image cannot be turned into a model input (undecodable, wrong shape, ...)."""


class DeliveryError(DicomaiError):
    """A destination did not accept an output object."""


class NotFound(DicomaiError):
    """A named object (model, job, study) does not exist."""


class InvalidTransition(DicomaiError):
    """A state change that the state machine does not allow."""


class DatasetError(DicomaiError):
    """A training or evaluation data set is laid out wrongly or names files that do not exist."""


class TrainingError(DicomaiError):
    """Training cannot go on: the network cannot take the inputs, or it diverged."""
