"""The ``${{ ... }}`` input template language.

A template is literal text interleaved with placeholders. A placeholder names either an
output field of an ancestor node (``${{ node.outputs.field }}``) or a run-store key
(``${{ store.key }}``). There is no escape for a literal ``${{``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

OPEN = "${{"
CLOSE = "}}"


class TemplateError(ValueError):
    """A template that cannot be parsed or rendered."""


@dataclass(frozen=True)
class OutputRef:
    """``${{ identifier.outputs.field }}``."""

    identifier: str
    field: str

    def __str__(self) -> str:
        return f"{self.identifier}.outputs.{self.field}"


@dataclass(frozen=True)
class StoreRef:
    """``${{ store.key }}``."""

    key: str

    def __str__(self) -> str:
        return f"store.{self.key}"


Placeholder = OutputRef | StoreRef


@dataclass(frozen=True)
class ParsedTemplate:
    """A parsed template: the literal head, then (placeholder, literal tail) pairs."""

    head: str
    parts: tuple[tuple[Placeholder, str], ...]

    def references(self) -> list[Placeholder]:
        """Every placeholder, in order of appearance (duplicates kept)."""
        return [placeholder for placeholder, _ in self.parts]


def _parse_body(body: str) -> Placeholder:
    pieces = [piece.strip() for piece in body.split(".")]
    if len(pieces) == 3 and pieces[1] == "outputs":
        identifier, field = pieces[0], pieces[2]
        if not identifier or not field:
            raise TemplateError(
                f"Invalid placeholder '{OPEN}{body}{CLOSE}': "
                "node identifier and output field must be non-empty"
            )
        if identifier == "store":
            # Accepted for compatibility: 'store.outputs.k' means 'store.k'.
            return StoreRef(field)
        return OutputRef(identifier, field)
    if len(pieces) == 2 and pieces[0] == "store":
        if not pieces[1]:
            raise TemplateError(
                f"Invalid placeholder '{OPEN}{body}{CLOSE}': store key must be non-empty"
            )
        return StoreRef(pieces[1])
    raise TemplateError(
        f"Invalid placeholder '{OPEN}{body}{CLOSE}': "
        "expected 'identifier.outputs.field' or 'store.key'"
    )


def parse(text: str) -> ParsedTemplate:
    """Parse ``text``; raise :class:`TemplateError` quoting the offending placeholder."""
    head, *pieces = text.split(OPEN)
    parts: list[tuple[Placeholder, str]] = []
    for piece in pieces:
        body, found, tail = piece.partition(CLOSE)
        if not found:
            raise TemplateError(f"Placeholder not closed: '{OPEN}{piece}' in '{text}'")
        parts.append((_parse_body(body), tail))
    return ParsedTemplate(head, tuple(parts))


def render(template: ParsedTemplate, resolve: Callable[[Placeholder], object]) -> str:
    """Substitute every placeholder with ``resolve(placeholder)``, which must be a ``str``.

    Exceptions raised by ``resolve`` propagate unchanged.
    """
    out = [template.head]
    for placeholder, tail in template.parts:
        value = resolve(placeholder)
        if not isinstance(value, str):
            raise TemplateError(
                f"Value of '{placeholder}' must be a string, got {type(value).__name__}"
            )
        out.append(value)
        out.append(tail)
    return "".join(out)


def render_text(text: str, resolve: Callable[[Placeholder], object]) -> str:
    """Parse and render ``text`` in one step."""
    return render(parse(text), resolve)
