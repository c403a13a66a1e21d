"""The report's content as plain values: sections of paragraphs, a table, a plot or code, rendered twice
(Markdown and HTML) by render.py. A leaf module, so that every section builder can use it without importing
the renderer.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    """Column headers and rows of already formatted strings: the renderer only lays them out."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Section:
    """One titled part of the report; what it holds decides how each renderer draws it."""

    title: str
    paragraphs: tuple[str, ...] = ()
    table: Table | None = None
    plot: bool = False
    code: str | None = None


@dataclass(frozen=True)
class Report:
    """The whole report: a title, the one-line answer, and its sections in order."""

    title: str
    answer: str
    sections: tuple[Section, ...] = field(default_factory=tuple)
