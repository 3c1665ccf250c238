"""The teacher the cluster says is there: ``BEZOAR_TEACHER_URL`` / ``BEZOAR_TEACHER_BACKEND``.

The Helm chart knows where its teacher Service is (release name, namespace, port) and which server
runs it (TGI, or vLLM's OpenAI-compatible ``/v1``); the recipe, written once for every cluster, does
not. So the Job builder passes the cluster's endpoint to the pods of the stages that call the
teacher, and here it overrides the recipe's ``teacher.base_url`` (and ``teacher.backend``) for that
stage's run: logged, and recorded in the stage's manifest (``teacher_endpoint``).

What it does not change: the stage's parameter hash. That is computed from the frozen recipe, as the
controller computes it, so a stage committed against one release's teacher is not stale for another
(the served model, ``teacher.model``, is part of the hash; where it is served is not what the data
depends on). The override applies only to a recipe teacher that is a server speaking a raw-prompt
protocol (``tgi`` or ``openai-completions``); an in-process or API teacher (``local``,
``openai-chat``, ``anthropic``) keeps its own endpoint, and the log says the cluster's was ignored.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .errors import BadInput

if TYPE_CHECKING:
    from .recipe import Recipe

log = logging.getLogger("bezoar")

URL_ENV = "BEZOAR_TEACHER_URL"
BACKEND_ENV = "BEZOAR_TEACHER_BACKEND"
SERVER_BACKENDS = ("tgi", "openai-completions")


def cluster_teacher(recipe: Recipe, stage: str,
                    environ: dict[str, str] | None = None) -> tuple[Recipe, dict[str, Any] | None]:
    """``(recipe to run the stage with, what to record in its manifest or None)``."""
    env = os.environ if environ is None else environ
    url = env.get(URL_ENV, "").strip()
    backend = env.get(BACKEND_ENV, "").strip()
    if not url and not backend:
        return recipe, None
    teacher = recipe.teacher
    if teacher.backend not in SERVER_BACKENDS:
        log.info("%s: the cluster's teacher (%s) is not used: the recipe's teacher is the %s backend",
                 stage, url or backend, teacher.backend)
        return recipe, None
    if backend and backend not in SERVER_BACKENDS:
        raise BadInput(f"{BACKEND_ENV}={backend!r}: the cluster's teacher backend must be one of "
                       f"{', '.join(SERVER_BACKENDS)}")
    from .recipe_base import Endpoint

    data = teacher.model_dump()
    if url:
        data["base_url"] = url
    if backend:
        data["backend"] = backend
    try:
        new = Endpoint.model_validate(data)
    except ValueError as e:
        raise BadInput(f"teacher: the cluster's endpoint ({URL_ENV}={url!r}, {BACKEND_ENV}={backend!r}) does not "
                       f"fit the recipe's teacher: {e}") from None
    record = {
        "base_url": new.base_url,
        "backend": new.backend,
        "source": f"cluster ({URL_ENV}{', ' + BACKEND_ENV if backend else ''})",
        "recipe_base_url": teacher.base_url,
        "recipe_backend": teacher.backend,
    }
    if (new.base_url, new.backend) != (teacher.base_url, teacher.backend):
        log.info("%s: teacher endpoint from the cluster: %s %s (the recipe says %s %s)", stage, new.backend,
                 new.base_url, teacher.backend, teacher.base_url)
    return recipe.model_copy(update={"teacher": new}), record


def teacher_url(recipe: Recipe, applied: bool, environ: dict[str, str] | None = None) -> str | None:
    """Where the teacher is served, for routing only (a judge pointed at the teacher's server uses its fleet
    of replicas, llm/fleet.py): the recipe's, with the cluster's override ``applied`` already for a stage that
    calls the teacher; for another stage the cluster's ``BEZOAR_TEACHER_URL`` when the pod has it."""
    env = os.environ if environ is None else environ
    return (None if applied else env.get(URL_ENV, "").strip()) or recipe.teacher.base_url


def teacher_backend(recipe: Recipe, applied: bool, environ: dict[str, str] | None = None) -> str:
    """The teacher's backend, as :func:`teacher_url` its URL: the cluster's ``BEZOAR_TEACHER_BACKEND`` for a stage
    that does not call the teacher itself (a judge on the teacher's server gets a share of its capacity,
    llm/budget.py ``plan``, and only a TGI server says that capacity at ``/info``)."""
    env = os.environ if environ is None else environ
    return (None if applied else env.get(BACKEND_ENV, "").strip()) or recipe.teacher.backend
