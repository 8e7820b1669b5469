"""Settings, read from ``LETHE_*`` environment variables through one cached ``get_settings()``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the API and the workers read from the environment.

    Unset URLs fall back to an embedded set-up under ``home``: SQLite for the database, Celery's
    SQLAlchemy transport on a SQLite file for the queue, a folder for artifacts.
    """

    model_config = SettingsConfigDict(env_prefix="LETHE_", extra="ignore")

    home: Path = Field(Path("./var"), description="where embedded state lives")
    database_url: str | None = Field(None, description="postgresql+psycopg://... in production")
    broker_url: str | None = Field(None, description="redis://... in production")
    artifacts_uri: str | None = Field(None, description="folder for model versions")
    data_roots: str = Field("", description="colon-separated folders forget-set URIs may point into")
    deadline_days: int = Field(30, ge=1, description="legal deadline: due_at = received_at + this")
    max_extension_days: int = Field(60, ge=0, description="GDPR Art. 12(3): up to two more months")
    gate_max_retain_drop: float = Field(5.0, ge=0, description="publish gate: cumulative Acc_r drop, points")
    gate_max_eval_forget_acc: float = Field(5.0, ge=0, le=100, description="publish gate: held-out Acc_f, %")
    retention_hours: float = Field(72.0, ge=0, description="superseded versions are deleted after this")
    lease_seconds: int = Field(120, ge=2, description="a worker's lease on a run; renewed by its heartbeat")
    sweep_seconds: float = Field(30.0, gt=0, description="how often the periodic sweep runs")
    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description="largest accepted weights upload")
    dashboard_refresh_seconds: float = Field(15.0, ge=1, description="how often the requests table refreshes itself")
    dashboard_session_hours: float = Field(8.0, gt=0, le=24 * 30, description="a dashboard login lasts this long")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'lethe.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.db'}"

    @property
    def artifacts(self) -> Path:
        return Path(self.artifacts_uri).expanduser().resolve() if self.artifacts_uri else self.home / "artifacts"

    @property
    def allowed_data_roots(self) -> list[Path]:
        return [Path(p).expanduser().absolute() for p in self.data_roots.split(":") if p.strip()]


class UnlearnSettings(BaseSettings):
    """The engine's hyper-parameters for service runs (``LETHE_UNLEARN_*``); unset: the engine's defaults."""

    model_config = SettingsConfigDict(env_prefix="LETHE_UNLEARN_", extra="ignore")

    lr: float | None = Field(None, gt=0)
    max_steps: int = Field(100, ge=1)
    target_forget_acc: float = Field(1.0, ge=0, le=100, description="also the publish gate's forget-set target")
    l1_weight: float = Field(1e-3, ge=0)
    rank: int = Field(8, ge=1)
    eval_every: int = Field(1, ge=1)
    patience: int = Field(5, ge=1)


@lru_cache
def get_settings() -> Settings:
    return Settings()


@lru_cache
def get_unlearn_settings() -> UnlearnSettings:
    return UnlearnSettings()
