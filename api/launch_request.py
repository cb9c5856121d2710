"""The V3 compute launch request bodies: ``V3ComputeLaunchPrecheckRequest`` and
``V3ComputeLaunchSubmitRequest`` (the same fields plus ``name``), shared by the
precheck query and the submit command."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from api.fields import JsonObject


class V3ComputeLaunchPrecheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sku: str = Field(min_length=1)
    resource_class: Literal["gpu_baremetal", "gpu_slice", "cpu_vm", "cpu_baremetal",
                            "control_plane"] | None = None
    unit_count: int | None = Field(default=None, ge=1)
    os_image_slug: str | None = None
    region_code: str | None = None
    scheduler_type: Literal["bare_metal", "slurm", "k8s", "ray"] | None = None
    # lax items: model-wide strict=True would refuse a uuid sent as a JSON string
    ssh_key_ids: list[Annotated[UUID, Field(strict=False)]] = Field(default_factory=list)
    storage_bucket_ids: list[str] = Field(default_factory=list)
    network_policy_id: str | None = None
    scheduler_request: JsonObject = Field(default_factory=dict)


class V3ComputeLaunchSubmitRequest(V3ComputeLaunchPrecheckRequest):
    name: str | None = Field(default=None, max_length=120)
