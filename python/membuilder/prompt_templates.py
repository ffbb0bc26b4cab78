"""Prompts the user brings: every prompt of the package, loadable from a template file.

membuilder ships its own prompts (written for this project). A model trained by someone else was
trained on *their* prompts, and evaluating it fairly means prompting it the same way; so every
prompt can be replaced from a user-supplied template file. The file is TOML, one table per prompt
to replace (prompts not named keep the built-in text)::

    # braces = 2          # optional: placeholders written {{name}} instead of {name}

    [answer]
    system = "You answer questions from memory."          # optional
    user = '''
    {core_memory}
    {memories}
    Today is {current_date}. Question: {question}
    '''

A table has ``user`` (required) and ``system`` (optional: without it the prompt is one user
message). ``{name}`` is replaced by the value named and, as in Python's ``str.format``, ``{{`` and
``}}`` are literal braces; every other brace is left as written, so JSON examples need no
escaping either way. With ``braces = 2`` placeholders are ``{{name}}`` and every other brace is
plain text (the style of prompts filled in with ``str.replace``). Which names each prompt offers,
and which it requires, is :data:`PLACEHOLDERS` (documented in ``training/README.md``, "Prompt
templates").

The file is validated when it is loaded, i.e. when a command starts: an unknown prompt name, a
table without ``user``, an unknown placeholder (usually a typo) or a missing required placeholder
is a :class:`PromptTemplateError` whose one-line message names the file. The templates in force are
recorded by hash in every output (:meth:`PromptTemplates.record`): the sha256 of the file and of
each replaced prompt, so two runs with different prompts are never mistaken for each other.

The templates in force are a context variable (:func:`active_templates`, set with
:func:`use_templates`): each command sets it once at start, and every place that renders a prompt
asks it (:func:`render_template`) before falling back to the built-in text. Prompts built in a
context without templates (a library user, the reward scorer) are the built-in ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from membuilder.errors import PromptTemplateError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "PLACEHOLDERS",
    "PROMPTS",
    "PromptTemplateError",
    "PromptTemplates",
    "active_templates",
    "add_prompt_templates_argument",
    "load_prompt_templates",
    "render_template",
    "templates_record",
    "use_templates",
]


@dataclass(frozen=True)
class _Spec:
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.required + self.optional


_AGENT_SESSION = ("session", "session_date", "session_day")

#: Every prompt that can be replaced, with its placeholders: (required, optional). A required
#: placeholder carries the data without which the prompt cannot do its job (the session to
#: remember, the question to answer...).
PLACEHOLDERS: dict[str, _Spec] = {
    # The four memory agents. {session}: the session's turns, one "[turn id] Speaker: text" line
    # each; {session_date}: the date as the dataset gives it; {session_day}: "2023-05-08, Monday".
    "core": _Spec(("session", "core_memory"), (*_AGENT_SESSION[1:], "core_chars", "core_limit")),
    "episodic": _Spec(("session", "existing_memories"), (*_AGENT_SESSION[1:], "memory_count")),
    "semantic": _Spec(("session", "existing_memories"), (*_AGENT_SESSION[1:], "memory_count")),
    "procedural": _Spec(("session", "existing_memories"), (*_AGENT_SESSION[1:], "memory_count")),
    # Core compression: the block, its size, its hard limit and the size asked for.
    "compress": _Spec(("core_memory",), ("core_chars", "core_limit", "target_chars")),
    # Answering: {memories} numbered "1. text" lines, best first; {current_date} as given.
    "answer": _Spec(("question", "memories"), ("core_memory", "current_date")),
    "judge": _Spec(("question", "gold_answer", "generated_answer")),
    # Synthetic QA: {memories} every memory shown as "- [kind] text"; the per-kind lists hold the
    # texts of one kind, one per line; {type_mix} the target mix as a sentence ("" when none).
    "qa": _Spec(
        ("session", "num_questions"),
        (
            "session_date",
            "session_day",
            "core_memory",
            "memories",
            "episodic_memories",
            "semantic_memories",
            "procedural_memories",
            "type_mix",
        ),
    ),
}
PROMPTS: tuple[str, ...] = tuple(PLACEHOLDERS)

# braces = 1 reads like Python's str.format: "{{" and "}}" are literal braces, "{name}" a
# placeholder; any other brace is kept as written. Scanning left to right with the escapes first
# makes "{{name}}" the literal text "{name}", as str.format does.
_TOKENS1 = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
# braces = 2: "{{name}}" is a placeholder and every other brace is literal.
_TOKENS2 = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")


def _placeholders(text: str, braces: int) -> set[str]:
    pattern = _TOKENS2 if braces == 2 else _TOKENS1
    return {m.group(1) for m in pattern.finditer(text) if m.group(1)}


def _fill(text: str, braces: int, values: Mapping[str, Any]) -> str:
    if braces == 2:
        return _TOKENS2.sub(lambda m: str(values[m.group(1)]), text)

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return str(values[m.group(1)])
        return m.group(0)[0]  # "{{" -> "{", "}}" -> "}"

    return _TOKENS1.sub(one, text)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _Template:
    system: str | None
    user: str
    sha256: str


@dataclass(frozen=True)
class PromptTemplates:
    """The prompts of one template file. ``prompts`` maps a prompt name to its template."""

    path: str
    sha256: str
    braces: int
    prompts: Mapping[str, _Template] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.prompts

    def render(self, name: str, values: Mapping[str, Any]) -> list[dict[str, str]]:
        """The chat messages of prompt ``name`` with ``values`` filled in."""
        t = self.prompts[name]
        out = []
        if t.system is not None:
            out.append({"role": "system", "content": _fill(t.system, self.braces, values)})
        out.append({"role": "user", "content": _fill(t.user, self.braces, values)})
        return out

    def record(self) -> dict[str, Any]:
        """What outputs write under ``"prompt_templates"``: the file's name and hash, and the hash
        of each prompt it replaces (the others are built in)."""
        return {
            "source": "file",
            "file": Path(self.path).name,
            "sha256": self.sha256,
            "prompts": {name: t.sha256 for name, t in sorted(self.prompts.items())},
        }


def load_prompt_templates(path: str | Path) -> PromptTemplates:
    """Read and validate a template file. Raises :class:`PromptTemplateError` (one line, naming
    the file) for anything that would make a prompt unusable."""
    p = Path(path)

    def fail(problem: str) -> PromptTemplateError:
        return PromptTemplateError(f"{p}: {problem}")

    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read the template file ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"not valid TOML ({exc})") from None
    braces = data.pop("braces", 1)
    if braces not in (1, 2) or isinstance(braces, bool):
        raise fail(f"'braces' must be 1 or 2, got {braces!r}")
    mark = "{{%s}}" if braces == 2 else "{%s}"
    prompts: dict[str, _Template] = {}
    for name, table in data.items():
        if name not in PLACEHOLDERS:
            raise fail(f"unknown prompt [{name}]; the prompts are {', '.join(PROMPTS)}")
        if not isinstance(table, dict):
            raise fail(f"[{name}] must be a table with 'user' (and optionally 'system')")
        extra = sorted(set(table) - {"system", "user"})
        if extra:
            raise fail(f"[{name}] has unknown key(s) {', '.join(extra)}; only 'system' and 'user'")
        user, system = table.get("user"), table.get("system")
        if not isinstance(user, str) or not user.strip():
            raise fail(f"[{name}] needs a non-empty 'user' string")
        if system is not None and not isinstance(system, str):
            raise fail(f"[{name}] 'system' must be a string")
        spec = PLACEHOLDERS[name]
        text = (system or "") + "\n" + user
        used = _placeholders(text, braces)
        unknown = sorted(used - set(spec.names))
        if unknown:
            raise fail(
                f"[{name}] uses unknown placeholder {mark % unknown[0]}; it offers "
                + ", ".join(mark % n for n in spec.names)
            )
        missing = [n for n in spec.required if n not in used]
        if missing:
            raise fail(f"[{name}] lacks required placeholder {mark % missing[0]}")
        digest = _sha256(f"{braces}\0{system if system is not None else ''}\0{user}".encode())
        prompts[name] = _Template(system=system, user=user, sha256=digest)
    if not prompts:
        raise fail(f"no prompt in the file; name at least one of {', '.join(PROMPTS)}")
    return PromptTemplates(path=str(p), sha256=_sha256(raw), braces=braces, prompts=prompts)


_ACTIVE: contextvars.ContextVar[PromptTemplates | None] = contextvars.ContextVar(
    "membuilder_prompt_templates", default=None
)


def active_templates() -> PromptTemplates | None:
    """The templates in force in this context (``None``: built-in prompts)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_templates(templates: PromptTemplates | None) -> Iterator[None]:
    """Put ``templates`` in force for the ``with`` block (``None``: built-in prompts)."""
    token = _ACTIVE.set(templates)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def render_template(name: str, values: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """Prompt ``name`` from the templates in force, or ``None`` when it is the built-in one."""
    templates = _ACTIVE.get()
    if templates is None or not templates.has(name):
        return None
    return templates.render(name, values)


BUILTIN_RECORD: dict[str, Any] = {"source": "builtin"}


def templates_record(templates: PromptTemplates | None = None) -> dict[str, Any]:
    """The ``"prompt_templates"`` record of ``templates`` (default: those in force)."""
    templates = templates if templates is not None else _ACTIVE.get()
    return dict(BUILTIN_RECORD) if templates is None else templates.record()


def add_prompt_templates_argument(parser: Any) -> None:
    """The ``--prompt-templates FILE`` flag shared by the commands that prompt a model."""
    parser.add_argument(
        "--prompt-templates",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML file replacing some or all prompts (see training/README.md, 'Prompt templates'); "
        "checked at start and recorded by hash in the outputs",
    )
