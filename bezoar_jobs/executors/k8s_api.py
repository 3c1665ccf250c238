"""Small pieces of the Kubernetes client every part of the controller uses.

Objects stay plain dicts (``_preload_content=False`` and :func:`raw`): the client's typed models
refuse fields newer than the client, so a newer API server would otherwise break the controller.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import BadInput


def make_api_client(context: str | None = None, kubeconfig: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster config inside a pod, else the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    # One watch per kind plus one log stream per running pod share the pool: leave room.
    cfg.connection_pool_maxsize = 64
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(configuration=cfg)
        path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        return config.new_client_from_config(config_file=path, context=context, client_configuration=cfg)
    except config.ConfigException as e:
        raise BadInput(
            f"no usable Kubernetes configuration ({e}); set KUBECONFIG, or run inside a cluster "
            "(KUBERNETES_SERVICE_HOST set by Kubernetes)"
        ) from None


def api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    exc: type[Exception] = ApiException
    return exc


def raw(resp: Any) -> dict[str, Any]:
    """The JSON body of a ``_preload_content=False`` response (objects stay plain dicts)."""
    try:
        data: dict[str, Any] = json.loads(resp.data)
        return data
    finally:
        resp.release_conn()


def condition(job: dict[str, Any]) -> dict[str, Any] | None:
    """The Job's terminal condition (Complete or Failed, status True), if any."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return dict(c)
    return None


def container_started(pod: dict[str, Any]) -> bool:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "running" in state or "terminated" in state:
            return True
    return False
