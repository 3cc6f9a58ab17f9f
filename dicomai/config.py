"""Settings: defaults < dicomai.toml < DICOMAI_* environment, read once and passed down."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicomai.errors import ConfigError
from dicomai.inference.device import DEVICE_PATTERN
from dicomai.uids import is_valid_uid

# The number formats a worker may run its networks in (see dicomai.inference.precision).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# A host name as RFC 1123 allows it: labels of letters, digits and hyphens.
# Underscores too: RFC 1123 forbids them, but hospital networks name machines pacs_1.
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


def _ae_title(value: str) -> str:
    # PS3.5 Table 6.2-1: AE is 1-16 characters, no backslash or control characters; leading
    # and trailing spaces are not significant.
    value = value.strip()
    if not 0 < len(value) <= 16 or "\\" in value or not value.isascii() or not value.isprintable():
        raise ValueError(
            f"ae_title must be 1 to 16 printable ASCII characters without backslash, got {value!r}"
        )
    return value


def _is_host(value: str) -> bool:
    """Whether `value` is an IP address or a host name (not a URL, not a dotted number)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(_HOST_NAME.match(value)) and not value.replace(".", "").isdigit()
    return True


class Section(BaseModel):
    """A table of the TOML file: a key it does not know is an error, not silently ignored
    (a typo such as ``study_quit_seconds`` would otherwise leave the default in force)."""

    model_config = ConfigDict(extra="forbid")


class Peer(Section):
    """A sender allowed to associate: its calling AE title and the hosts it may come from."""

    ae_title: str
    hosts: list[str] = Field(default_factory=list)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                if "/" in host or not _is_host(host):
                    raise ValueError(
                        f"{host!r} is not an IP address, network (10.0.0.0/8) or host name"
                    ) from None
        return hosts


class TlsSettings(Section):
    """DICOM TLS: a server certificate and key; optionally client certificates checked by a CA."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False


def _listen_host(value: str) -> str:
    # Checked here, not at bind time: the resolver's "Name or service not known" names no
    # setting. Empty is every interface, as the socket module takes it.
    if value and not _is_host(value):
        raise ValueError(f"host {value!r} is not an IP address or host name")
    return value


class IngestSettings(Section):
    ae_title: str = "DICOMAI"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    study_quiet_seconds: float = Field(default=30.0, gt=0)
    complete_on_association_end: bool = False
    study_max_wait_seconds: float = Field(default=3600.0, gt=0)
    allow_any: bool = False
    peers: list[Peer] = Field(default_factory=list)
    # PS3.8 9.3.1: a receiver may announce any maximum; dcmtk accepts 4096 at least.
    max_pdu: int = Field(default=131072, ge=4096, le=2**32 - 1)
    max_dataset_mb: int = Field(default=2048, ge=1)
    max_associations: int = Field(default=16, ge=1)
    # A peer silent this long, even in the middle of a PDU, loses its association.
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    listener_processes: int = Field(default=1, ge=1, le=64)
    resend_policy: Literal["keep", "replace"] = "keep"
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _listen_host(value)


class MetricsSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0: no metrics endpoint

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # Empty is every interface, as for [ingest] host; the HTTP server resolves the name
        # and does not take "" for it.
        return _listen_host(value) or "0.0.0.0"


class StorageSettings(Section):
    dir: Path = Path("var")
    min_free_mb: int = Field(default=1024, ge=0)


class DatabaseSettings(Section):
    url: str = ""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(value)
            except ArgumentError:
                raise ValueError(
                    "not a database URL (postgresql+psycopg://user@host/db or sqlite:///path)"
                ) from None
        return value


class BrokerSettings(Section):
    url: str = ""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme = value.partition("://")[0].lower()
        if value and scheme not in ("redis", "rediss", "filesystem"):
            raise ValueError("give a redis:// (or rediss://) URL, or leave it empty")
        return value


class WorkerSettings(Section):
    """The worker, and the leases after which the reconciler rings a job again."""

    device: str = "auto"
    embedded: bool = True
    # A running job whose heartbeat is older than this is taken for abandoned (worker killed).
    heartbeat_lease_seconds: float = Field(default=60.0, gt=0)
    # A queued job rung this long ago without a worker taking it is rung again (lost ring).
    queued_lease_seconds: float = Field(default=300.0, gt=0)
    # A due delivery rung this long ago without an outcome is rung again.
    delivery_lease_seconds: float = Field(default=120.0, gt=0)
    # Runs a job gets: a run that fails (database or storage unreachable) or whose worker dies
    # uses one; after the last the job fails for good and another version may report instead.
    max_attempts: int = Field(default=3, ge=1)
    # A claimed job waits this long for queued jobs of the same model version to share its
    # forward pass (small studies that arrive together); 0 runs each job on its own.
    batch_window_seconds: float = Field(default=0.05, ge=0, le=10)
    # Most images per forward pass, gathered across jobs and cut from larger studies alike.
    max_batch_images: int = Field(default=16, ge=1)
    # Threads that decode and preprocess images while the model runs (0: in the worker's own
    # thread, one image after another).
    decode_threads: int = Field(default=2, ge=0, le=64)
    # Number format of the forward passes: auto is bf16 (else fp16) on a GPU, fp32 on a CPU.
    precision: Precision = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value.strip()):
            raise ValueError("device must be auto, cpu, cuda or cuda:N (N the GPU's index)")
        return value.strip()


class DeliverySettings(Section):
    max_attempts: int = Field(default=30, ge=1)
    backoff_initial_seconds: float = Field(default=5.0, ge=0)
    backoff_max_seconds: float = Field(default=1800.0, ge=0)
    timeout_seconds: float = Field(default=30.0, gt=0)


class RolloutSettings(Section):
    """The evaluation gate of `dicomai models activate` (see dicomai.rollout.gate)."""

    gate_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)


class Destination(Section):
    """Where results go: a C-STORE SCP (ae_title/host/port) or a folder (path)."""

    name: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    path: Path | None = None
    # Which output kinds it receives; a PACS whose viewer cannot show SEG or PMAP leaves them out.
    # (pydantic copies a mutable default for each instance.)
    kinds: list[Literal["sr", "sc", "seg", "pmap"]] = ["sr", "sc", "seg", "pmap"]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError(f"a destination needs a name of printable characters, got {value!r}")
        return value

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None and not _is_host(value):
            raise ValueError(f"host {value!r} is not an IP address or host name")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Destination:
        network = (self.ae_title, self.host, self.port)
        complete = all(part is not None for part in network)
        if self.path is not None and any(part is not None for part in network):
            raise ValueError(
                f"destination {self.name!r}: give either ae_title, host and port, or path, not both"
            )
        if self.path is None and not complete:
            raise ValueError(
                f"destination {self.name!r}: give either ae_title, host and port, or path"
            )
        return self


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    """Every setting of dicomai; see README.md for each key."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMAI_", env_nested_delimiter="__", extra="forbid"
    )

    ingest: IngestSettings = Field(default_factory=IngestSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    destinations: list[Destination] = Field(default_factory=list)
    uid_root: str = "2.25"
    log_level: str = "INFO"

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        # Room for the derived number after it (at least 16 digits: see `dicomai.uids`).
        if not is_valid_uid(value) or len(value) > 47:
            raise ValueError(
                "uid_root must be a UID (digits and dots, PS3.5 9.1) of at most 47 characters"
            )
        return value

    @model_validator(mode="after")
    def _destination_names(self) -> Settings:
        names = [destination.name for destination in self.destinations]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"destinations: the name {repeated[0]!r} is given twice")
        return self

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # toml_file is set in model_config by load_settings; without it the source is empty.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.storage.dir.resolve() / 'dicomai.db'}"

    @property
    def broker_url(self) -> str:
        return self.broker.url or "filesystem://"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url == "filesystem://"

    @property
    def spool_dir(self) -> Path:
        return self.storage.dir / "spool"

    @property
    def outputs_dir(self) -> Path:
        return self.storage.dir / "outputs"

    @property
    def registry_dir(self) -> Path:
        return self.storage.dir / "models"

    @property
    def metrics_dir(self) -> Path:
        return self.storage.dir / "metrics"

    @property
    def broker_dir(self) -> Path:
        return self.storage.dir / "broker"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read settings from defaults, the TOML file and the environment.

    Parameters
    ----------
    config_file
        TOML file; when None, ``DICOMAI_CONFIG`` names it, else only defaults and environment.
    overrides
        Values that win over every source (used by tests).

    Raises
    ------
    ConfigError
        The file is missing or a value is invalid; the message names the key.
    """
    _check_environment()
    path = config_file or os.environ.get("DICOMAI_CONFIG") or None
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    # pydantic-settings reads the file name from the class, so each file gets a subclass.
    config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})
    settings_cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        variable = "DICOMAI_" + "__".join(str(p) for p in first["loc"]).upper()
        if any(name.upper() == variable for name in os.environ):
            where += f" (from the environment: {variable})"
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {where} (README.md lists the keys)") from None
        message = first["msg"].removeprefix("Value error, ")
        # A check across settings (two destinations of one name) has no location of its own.
        raise ConfigError(
            f"invalid setting {where}: {message}" if where else f"invalid setting: {message}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"invalid config file {path}: {exc}") from None


# Variables of ours that are not settings: the config file, and the listening socket that
# `serve` hands its listener processes.
_NOT_SETTINGS = frozenset({"DICOMAI_CONFIG", "DICOMAI_LISTEN_FD"})


def _check_environment() -> None:
    """A `DICOMAI_*` variable that names no setting is an error, as a mistyped key in the file
    is: pydantic ignores a variable of an unknown section, and a deployment configured by
    environment (deploy/docker-compose.yml) would run on the default without a word."""
    for name in os.environ:
        upper = name.upper()
        if not upper.startswith("DICOMAI_") or upper in _NOT_SETTINGS:
            continue
        field = upper.removeprefix("DICOMAI_").split("__")[0].lower()
        if field not in Settings.model_fields:
            raise ConfigError(
                f"unknown setting in the environment: {name} (README.md lists the keys)"
            )
