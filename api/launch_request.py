"""The V3 compute launch request bodies: ``V3ComputeLaunchPrecheckRequest`` and
``V3ComputeLaunchSubmitRequest`` (the same fields plus ``name``), shared by the
precheck query and the submit command."""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class V3ComputeLaunchPrecheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sku: str = Field(min_length=1)
    resource_class: Literal["gpu_baremetal", "gpu_slice", "cpu_vm", "cpu_baremetal",
                            "control_plane"] | None = None
    unit_count: int | None = Field(default=None, ge=1)
    os_image_slug: str | None = None
    region_code: str | None = None
    scheduler_type: Literal["bare_metal", "slurm", "k8s", "ray"] | None = None
    ssh_key_ids: list[UUID] = Field(default_factory=list, strict=False)
    storage_bucket_ids: list[str] = Field(default_factory=list)
    network_policy_id: str | None = None
    scheduler_request: dict[str, Any] = Field(default_factory=dict)


class V3ComputeLaunchSubmitRequest(V3ComputeLaunchPrecheckRequest):
    name: str | None = Field(default=None, max_length=120)
