"""``make_client(endpoint)``: the one place that turns a recipe endpoint into a client.

:data:`BACKENDS` names each backend's client class (``module:Class``). Backend modules are imported
when a client is made, so importing ``bezoar_jobs.llm`` stays light (no torch, transformers or HTTP
SDKs): the Kubernetes controller imports recipe code without any of them installed.

A new backend is a client module here, a line in :data:`BACKENDS`, and its name in
``recipe_base.Endpoint.backend`` (with ``RAW_PROMPT_BACKENDS`` if it sends raw prompts).
"""

from __future__ import annotations

from ..errors import BadInput
from ..recipe_base import Endpoint
from ..registry import load_attr
from .base import LLMClient
from .keys import resolve_api_key

# backend -> the client class; remote clients take (endpoint, api key, role), the in-process one
# (endpoint, role=...) and loads its model when made
BACKENDS: dict[str, str] = {
    "local": "bezoar_jobs.llm.local:LocalClient",
    "tgi": "bezoar_jobs.llm.tgi:TGIClient",
    "openai-completions": "bezoar_jobs.llm.openai_api:OpenAICompletionsClient",
    "openai-chat": "bezoar_jobs.llm.openai_api:OpenAIChatClient",
    "anthropic": "bezoar_jobs.llm.anthropic_api:AnthropicClient",
}
IN_PROCESS = frozenset({"local"})


def make_client(endpoint: Endpoint, role: str = "endpoint", teacher_url: str | None = None,
                teacher: LLMClient | None = None, teacher_backend: str | None = None) -> LLMClient:
    """Build the client for ``endpoint``; ``role`` ("teacher", "judge") names it in error messages;
    ``teacher_url``: the recipe's teacher's base URL, whose fleet of replicas a judge on the teacher's own
    server uses too (llm/fleet.py ``Fleet.beside``); ``teacher``: the teacher's client in this process, whose
    count of requests at each replica that judge shares (its requests are part of the pod's share);
    ``teacher_backend``: the teacher's backend, for a judge on the teacher's server with no teacher client in
    its process, which then gets its pod's share of the teacher's capacity (llm/budget.py ``plan``).

    The local backend loads its model here (it may take a while); remote clients connect lazily on
    their first ``run``.
    """
    ref = BACKENDS.get(endpoint.backend)
    if ref is None:
        raise BadInput(f"{role}.backend: unknown backend {endpoint.backend!r}")
    cls = load_attr(ref)
    if endpoint.backend in IN_PROCESS:
        client: LLMClient = cls(endpoint, role=role)
    else:
        from .budget import plan  # a teacher server's capacity is shared by every pod calling it
        from .fleet import Fleet, on_teacher
        from .pool import RemoteClient

        key = resolve_api_key(endpoint, role)
        # the teacher's replicas (each request to one of them), found once: the budget asks each one's /info and
        # the fleet keeps each within its share of what it said
        if role == "teacher":
            fleet = Fleet.from_env(endpoint.base_url)
        else:  # a judge beside the teacher's client shares its books at the teacher's server, one server or several
            mate = (teacher.fleet_of_one() if isinstance(teacher, RemoteClient)
                    and on_teacher(endpoint.base_url, teacher_url) else None)
            fleet = Fleet.beside(endpoint.base_url, teacher_url, teacher=mate)
        server = (teacher_url, teacher_backend or "") if teacher_url else None
        ep, budget = plan(endpoint, role, key, teacher=server, teacher_here=teacher is not None, fleet=fleet)
        remote = cls(ep, key, role)
        remote.budget = budget  # several pods share the teacher: stages/common.open_client lets the share move
        remote.use_fleet(fleet)
        client = remote
    return client
