"""Kubernetes-shaped value types of the cluster settings (quantities, names, labels), each refusing
what the API server would refuse, with a message saying what was expected."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
_RESOURCE_NAME = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


def _quantity(v: Any) -> Any:
    # YAML reads `cpu: 2` as an int and `cpu: 0.5` as a float: Kubernetes accepts both as quantities.
    if isinstance(v, bool):
        raise ValueError("a resource quantity, not a boolean")
    if isinstance(v, int | float):
        v = format(v, "g")
    if not isinstance(v, str) or not _QUANTITY.match(v):
        raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi, 20G)")
    return v


def _matching(pattern: str, what: str, max_len: int, allow_empty: bool = False) -> AfterValidator:
    rx = re.compile(pattern)

    def check(v: str) -> str:
        if allow_empty and v == "":
            return v
        if len(v) > max_len or not rx.match(v):
            raise ValueError(f"{v!r} is not {what} (at most {max_len} characters)")
        return v

    return AfterValidator(check)


Quantity = Annotated[str, BeforeValidator(_quantity)]


def _auto_quantity(v: Any) -> Any:
    return v if v == "auto" else _quantity(v)


AutoQuantity = Annotated[str, BeforeValidator(_auto_quantity)]
DnsLabel = Annotated[str, _matching(_DNS_LABEL, "a DNS-1123 label (lower case letters, digits, '-')", 63)]
DnsSubdomain = Annotated[str, _matching(_DNS_SUBDOMAIN, "a Kubernetes object name (DNS-1123 subdomain)", 253)]
OptionalName = Annotated[
    str, _matching(_DNS_SUBDOMAIN, 'a Kubernetes object name (DNS-1123 subdomain) or ""', 253, allow_empty=True)
]
EnvName = Annotated[str, _matching(_ENV_NAME, "a valid environment variable name", 253)]
SecretKey = Annotated[str, _matching(_SECRET_KEY, "a valid Secret key (letters, digits, '-', '_', '.')", 253)]
ResourceName = Annotated[str, _matching(_RESOURCE_NAME, "a resource name (e.g. cpu, memory, nvidia.com/gpu)", 253)]
LabelValue = Annotated[str, _matching(_LABEL_VALUE, "a valid label value", 63)]


