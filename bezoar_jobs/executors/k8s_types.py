"""Kubernetes-shaped value types of the cluster settings (quantities, names, labels), each refusing
what the API server would refuse, with a message saying what was expected."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
_RESOURCE_NAME = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                             r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# what a container may ask for without a domain (core validation.go validateContainerResourceName)
STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")
_SUFFIXES = {"m": Fraction(1, 1000), "": Fraction(1), "k": Fraction(10**3), "M": Fraction(10**6),
             "G": Fraction(10**9), "T": Fraction(10**12), "P": Fraction(10**15), "E": Fraction(10**18),
             "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40),
             "Pi": Fraction(2**50), "Ei": Fraction(2**60)}


def _quantity(v: Any) -> Any:
    # YAML reads `cpu: 2` as an int and `cpu: 0.5` as a float: Kubernetes accepts both as quantities.
    if isinstance(v, bool):
        raise ValueError("a resource quantity, not a boolean")
    if isinstance(v, int | float):
        v = format(v, "g")
    if not isinstance(v, str) or not _QUANTITY.match(v):
        raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi, 20G)")
    return v


def _checker(pattern: str, what: str, max_len: int, allow_empty: bool = False) -> Callable[[str], str]:
    rx = re.compile(pattern)

    def check(v: str) -> str:
        if allow_empty and v == "":
            return v
        if len(v) > max_len or not rx.match(v):
            raise ValueError(f"{v!r} is not {what} (at most {max_len} characters)")
        return v

    return check


def _matching(pattern: str, what: str, max_len: int, allow_empty: bool = False) -> AfterValidator:
    return AfterValidator(_checker(pattern, what, max_len, allow_empty))


_label_value = _checker(_LABEL_VALUE, "a valid label value", 63)


Quantity = Annotated[str, BeforeValidator(_quantity)]


def quantity_value(q: str) -> Fraction:
    """A quantity's value (one :data:`Quantity` took: digits, an optional fraction, a suffix)."""
    m = _QUANTITY.match(q)
    assert m is not None, q
    return Fraction(q[: len(q) - len(m.group(2) or "")]) * _SUFFIXES[m.group(2) or ""]


def _native(name: str) -> bool:
    """A resource the node may overcommit (no domain, or kubernetes.io's), not hugepages."""
    return ("/" not in name or name.split("/")[0].endswith("kubernetes.io")) and not name.startswith("hugepages-")


def resources_problem(requests: Mapping[str, str], limits: Mapping[str, str]) -> str | None:
    """What the API server refuses in one container's requests and limits (core validation.go
    ValidateResourceRequirements), None if nothing: a request above its limit; an extended resource (a GPU,
    ``nvidia.com/gpu``) or hugepages requested without a limit or other than it (they are never overcommitted),
    an extended resource that is not a whole number."""
    for name in sorted({*requests, *limits}):
        req, lim = requests.get(name), limits.get(name)
        if "/" in name and not _native(name) and any(q is not None and quantity_value(q).denominator != 1
                                                     for q in (req, lim)):
            return f"{name}: an extended resource must be a whole number (got {req if req is not None else lim})"
        if req is None or (lim is None and _native(name)):
            continue
        if lim is None:
            return f"requests.{name} {req} needs limits.{name} equal to it (it is never overcommitted)"
        if not _native(name) and quantity_value(req) != quantity_value(lim):
            return f"requests.{name} {req} must equal limits.{name} {lim} (it is never overcommitted)"
        if quantity_value(req) > quantity_value(lim):
            return f"requests.{name} {req} is more than limits.{name} {lim}: the API server refuses a request " \
                   "above its limit (a family's default requests are merged in: raise or drop the limit)"
    return None


def _resource_name(v: str) -> str:
    if len(v) > 253 or not re.match(_RESOURCE_NAME, v):
        raise ValueError(f"{v!r} is not a resource name (e.g. cpu, memory, nvidia.com/gpu)")
    if "/" not in v and v not in STANDARD_RESOURCES and not v.startswith("hugepages-"):
        raise ValueError(f"{v!r}: a resource without a domain must be one of {', '.join(STANDARD_RESOURCES)} or "
                         "hugepages-<size> (the API server refuses others; an extended resource is "
                         "<domain>/<name>, e.g. nvidia.com/gpu)")
    return v


def _qualified_name(v: str) -> str:
    name = v.rsplit("/", 1)[-1]
    if len(name) > 63 or (v.count("/") and len(v.split("/")[0]) > 253) or not _QUALIFIED_NAME.match(v):
        raise ValueError(f"{v!r} is not a label key ([prefix/]name: a DNS subdomain prefix, a name of at most 63 "
                         "letters, digits, '-', '_', '.' starting and ending with a letter or digit)")
    return v


def toleration_problem(key: str | None, operator: str | None, value: str | None) -> str | None:
    """What the API server refuses in a toleration's key, operator and value (core validation.go
    ValidateTolerations), None if nothing."""
    if key:
        try:
            _qualified_name(key)
        except ValueError as e:
            return f"key: {e}"
    elif operator != "Exists":
        return "an empty key matches every taint: operator must be Exists"
    if operator != "Exists" and value:
        try:
            _label_value(value)
        except ValueError as e:
            return f"value {e}"
    return None


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
ResourceName = Annotated[str, AfterValidator(_resource_name)]
LabelValue = Annotated[str, AfterValidator(_label_value)]
LabelKey = Annotated[str, AfterValidator(_qualified_name)]


