"""The job spec's old home: it lives in ``core.spec`` (loading a spec imports no Ray). Kept for one release."""

from ..core.spec import DataSpec, JobSpec, ModelSpec, ProtocolSpec, ResourceSpec

__all__ = ["DataSpec", "JobSpec", "ModelSpec", "ProtocolSpec", "ResourceSpec"]
