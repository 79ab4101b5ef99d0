"""The ``vertex`` platform: custom jobs, endpoints with traffic-split rollouts, Cloud Monitoring metrics.

The v1 GAPIC clients of ``google-cloud-aiplatform`` (credentials and project from the google provider's
``GoogleBaseHook``), imported only when the platform is used.
"""

from airflow_llmops.platforms.vertex.adapter import Vertex
from airflow_llmops.platforms.vertex.requests import VertexConfigError, VertexSettings

__all__ = ["Vertex", "VertexConfigError", "VertexSettings"]
