"""Read a recipe: safe YAML → duplicate-key check → `--set` overrides → validation → located issues.

Everything here is torch-free so that `validate` and `--help` stay fast. Every problem is collected and raised
at once as a `RecipeError`; the CLI renders it as one table.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from uniperceiver_cli.recipe.errors import Issue, RecipeError, shorten
from uniperceiver_cli.recipe.schema import ROOTS

Loc = tuple[str | int, ...]
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LEADING_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*) \(")


@dataclass
class LoadedRecipe:
    """A validated recipe and where it came from.

    Attributes:
        recipe: the validated root model (`PretrainRecipe`, ...).
        path: the recipe file.
        raw: the mapping after overrides, as validated.
        overrides: the `--set` strings applied.
    """

    recipe: Any
    path: Path
    raw: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        """The command the recipe drives."""
        return str(self.raw["command"])


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    expected_command: str | None = None,
) -> LoadedRecipe:
    """Read, override and validate one recipe file.

    Args:
        path: the YAML file.
        overrides: `key.path=value` strings; values are parsed as YAML scalars/flow collections.
        expected_command: the command being run (`pretrain`, `prompt_tune`, ...); a recipe for another
            command is an error, and a recipe without `command` is taken to be for this one.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: with every problem found (file, line, field, message, value, hint).
    """
    path = Path(path)
    shown = str(path)
    overrides = list(overrides or [])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(
            shown, [Issue(shown, None, "", "recipe file not found", hint="check the path")]
        ) from None
    except IsADirectoryError:
        raise RecipeError(
            shown, [Issue(shown, None, "", "is a folder, not a recipe file")]
        ) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(
            shown, [Issue(shown, None, "", f"not UTF-8 text ({exc.reason})")]
        ) from None
    except OSError as exc:
        raise RecipeError(shown, [Issue(shown, None, "", f"cannot read: {exc.strerror}")]) from None
    return load_recipe_text(
        text, shown, overrides, expected_command=expected_command, base_dir=path.parent
    )


def load_recipe_text(
    text: str,
    shown: str,
    overrides: list[str] | None = None,
    *,
    expected_command: str | None = None,
    base_dir: Path | None = None,
) -> LoadedRecipe:
    """Like `load_recipe`, for recipe text already read (`shown` names it in messages)."""
    overrides = list(overrides or [])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        message = f"YAML syntax error: {exc.problem or exc.context}"
        raise RecipeError(shown, [Issue(shown, line, "", message)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(shown, [Issue(shown, None, "", f"YAML error: {exc}")]) from None

    issues: list[Issue] = []
    if data is None:
        data, node = {}, None
    if not isinstance(data, dict):
        raise RecipeError(
            shown,
            [
                Issue(
                    shown,
                    1,
                    "",
                    "a recipe must be a mapping of sections (run:, model:, tasks:, ...)",
                )
            ],
        )
    issues.extend(_duplicate_keys(node, shown))

    override_sources: dict[Loc, str] = {}
    for item in overrides:
        problem = _apply_override(data, item, override_sources)
        if problem is not None:
            issues.append(Issue(shown, None, problem[0], problem[1], source=f"--set {item}"))

    command = data.get("command")
    if command is None:
        if expected_command is None:
            issues.append(
                Issue(
                    shown,
                    1,
                    "command",
                    "missing key `command`",
                    hint=f"add `command: <one of {', '.join(ROOTS)}>` at the top",
                )
            )
            raise RecipeError(shown, issues)
        data = {"command": expected_command, **data}
    elif command not in ROOTS:
        issues.append(
            Issue(
                shown,
                _line_of(node, ("command",)),
                "command",
                f"unknown command; expected one of: {', '.join(ROOTS)}",
                got=shorten(command),
            )
        )
        raise RecipeError(shown, issues)
    elif expected_command is not None and command != expected_command:
        issues.append(
            Issue(
                shown,
                _line_of(node, ("command",)),
                "command",
                f"this recipe is for `{command.replace('_', '-')}`, not `{expected_command.replace('_', '-')}`",
                got=shorten(command),
                hint=f"run `uniperceiver {command.replace('_', '-')} {shown}`",
            )
        )
        raise RecipeError(shown, issues)

    root = ROOTS[data["command"]]
    try:
        recipe = root.model_validate(data)
    except ValidationError as exc:
        issues.extend(_issues_from_validation(exc, root, data, node, shown, override_sources))
    if issues:
        issues.sort(key=lambda i: (i.source is not None, i.line or 0))
        raise RecipeError(shown, issues)
    del base_dir
    return LoadedRecipe(recipe=recipe, path=Path(shown), raw=data, overrides=overrides)


def _duplicate_keys(node: yaml.Node | None, shown: str) -> list[Issue]:
    """Find keys given twice in one mapping (PyYAML silently keeps the last)."""
    issues: list[Issue] = []

    def walk(n: yaml.Node, path: str) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in n.value:
                key = key_node.value
                child = f"{path}.{key}" if path else str(key)
                if key in seen:
                    issues.append(
                        Issue(
                            shown,
                            key_node.start_mark.line + 1,
                            child,
                            f"duplicate key (first given on line {seen[key]})",
                            hint="remove one of them; YAML would silently keep the last",
                        )
                    )
                else:
                    seen[key] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, f"{path}[{i}]")

    if node is not None:
        walk(node, "")
    return issues


def _apply_override(
    data: dict[str, Any], item: str, sources: dict[Loc, str]
) -> tuple[str, str] | None:
    """Apply one `key.path=value` override in place; return (field, problem) when it cannot be applied."""
    key, sep, raw_value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        return "", "expected `key.path=value` (for example `--set schedule.max_steps=100`)"
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        shown = _display(tuple(parts[: i + 1]))
        if isinstance(target, dict):
            if part not in target or target[part] is None:
                target[part] = {}
            target = target[part]
        elif isinstance(target, list) and isinstance(part, int):
            if part >= len(target):
                return shown, f"index {part} is out of range (the list has {len(target)} item(s))"
            target = target[part]
        else:
            return shown, "cannot descend into a plain value"
    last = parts[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last >= len(target):
            return _display(tuple(parts)), "cannot set this path"
        target[last] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        return _display(tuple(parts)), "cannot set this path"
    sources[tuple(parts)] = f"--set {item}"
    return None


def _display(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _node_at(node: yaml.Node | None, loc: Loc, *, key: bool = False) -> yaml.Node | None:
    """Return the deepest node along `loc` (the key node of the last part when `key` is set)."""
    current = node
    found = node
    for i, part in enumerate(loc):
        if isinstance(current, yaml.MappingNode):
            nxt = None
            for key_node, value_node in current.value:
                if key_node.value == part:
                    nxt = key_node if key and i == len(loc) - 1 else value_node
            if nxt is None:
                return found
            current = found = nxt
        elif (
            isinstance(current, yaml.SequenceNode)
            and isinstance(part, int)
            and part < len(current.value)
        ):
            current = found = current.value[part]
        else:
            return found
    return found


def _line_of(node: yaml.Node | None, loc: Loc, *, key: bool = False) -> int | None:
    found = _node_at(node, loc, key=key)
    return None if found is None else found.start_mark.line + 1


def _strip_tags(loc: Loc, data: Any, *, keep_missing_last: bool = True) -> tuple[Loc, bool]:
    """Drop the union-member tags pydantic inserts into `loc`; also say whether the path exists in data."""
    out: list[str | int] = []
    current = data
    exists = True
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int):
            if isinstance(current, list) and part < len(current):
                current = current[part]
                out.append(part)
                continue
            out.append(part)
            exists = False
            current = None
            continue
        if isinstance(current, dict) and part in current:
            current = current[part]
            out.append(part)
            continue
        if not last or not keep_missing_last or not _IDENT.match(part):
            continue  # a tag such as 'image_classification' or "literal['all']" or 'list[int]'
        out.append(part)
        exists = False
    return tuple(out), exists


def _unwrap(annotation: Any) -> list[Any]:
    """Return the candidate classes/types inside Optional/Union/Annotated/list annotations."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_unwrap(arg))
        return out
    return [annotation]


def _pick_member(models: list[type[BaseModel]], item: Any) -> type[BaseModel] | None:
    if len(models) == 1:
        return models[0]
    if isinstance(item, dict):
        for model in models:
            for tag_field in ("type", "format", "command"):
                if tag_field in model.model_fields and tag_field in item:
                    args = typing.get_args(model.model_fields[tag_field].annotation)
                    if item[tag_field] in args:
                        return model
    return None


def _allowed_keys(root: type[BaseModel], loc: Loc, data: Any) -> list[str]:
    """Field names allowed where the unknown key `loc[-1]` was found."""
    # Walk data and classes together so list items pick their own discriminated member.
    cls: Any = root
    current: Any = data
    for part in loc[:-1]:
        if isinstance(part, int):
            current = current[part] if isinstance(current, list) and part < len(current) else None
            if isinstance(cls, list):
                cls = _pick_member(cls, current)
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        if part not in cls.model_fields:
            continue  # a union tag
        current = current.get(part) if isinstance(current, dict) else None
        expanded: list[Any] = []
        for cand in _unwrap(cls.model_fields[part].annotation):
            if typing.get_origin(cand) is list:
                expanded.extend(_unwrap(typing.get_args(cand)[0]))
            else:
                expanded.append(cand)
        models = [c for c in expanded if isinstance(c, type) and issubclass(c, BaseModel)]
        if isinstance(current, list):
            cls = models
        else:
            cls = _pick_member(models, current) if models else None
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _issues_from_validation(
    exc: ValidationError,
    root: type[BaseModel],
    data: dict[str, Any],
    node: yaml.Node | None,
    shown: str,
    sources: dict[Loc, str],
) -> list[Issue]:
    merged: dict[tuple[Loc, str], list[ErrorDetails]] = {}
    for err in exc.errors():
        loc, _ = _strip_tags(tuple(err["loc"]), data, keep_missing_last=err["type"] == "missing")
        group = (
            "union"
            if err["type"] in ("literal_error", "list_type", "int_type", "string_type")
            else err["type"]
        )
        if group == "value_error":
            group = str(err["msg"])
        merged.setdefault((loc, group), []).append(err)

    issues: list[Issue] = []
    for (loc, _group), errs in merged.items():
        err = errs[0]
        kind = err["type"]
        got = shorten(err.get("input")) if kind not in ("missing",) else None
        hint: str | None = None
        field_loc = loc
        line: int | None
        if kind == "extra_forbidden":
            allowed = _allowed_keys(root, loc, data)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            message = "unknown key"
            if close:
                message += f"; did you mean '{close[0]}'?"
            elif allowed:
                hint = "allowed here: " + ", ".join(allowed)
            line = _line_of(node, loc, key=True)
            got = None
        elif kind == "missing":
            message = "required key is missing"
            line = _line_of(node, loc[:-1])
            hint = f"add `{loc[-1]}:`"
        elif kind == "union_tag_invalid":
            ctx = err.get("ctx") or {}
            tag = ctx.get("discriminator", "type").strip("'")
            message = (
                f"unknown {tag} {ctx.get('tag')!r}; expected one of: {ctx.get('expected_tags')}"
            )
            field_loc = (*loc, tag)
            line = _line_of(node, field_loc)
            got = shorten(ctx.get("tag"))
        elif kind == "union_tag_not_found":
            ctx = err.get("ctx") or {}
            tag = str(ctx.get("discriminator", "type")).strip("'")
            message = f"missing key `{tag}` that selects the kind of entry"
            line = _line_of(node, loc)
            got = None
        elif kind == "value_error":
            message = str(err["msg"]).removeprefix("Value error, ")
            got = None
            named = _LEADING_FIELD.match(message)
            line = _line_of(node, loc, key=True)
            if named is not None:
                candidate = (*loc, *named.group(1).split("."))
                if loc == () and named.group(1).count("."):
                    candidate = tuple(named.group(1).split("."))
                found = _node_at(node, candidate, key=True)
                if found is not None and found is not _node_at(node, loc, key=True):
                    line = found.start_mark.line + 1
                    field_loc = candidate
        else:
            messages = []
            for e in errs:
                msg = str(e["msg"])
                if msg not in messages:
                    messages.append(msg)
            message = " or ".join(messages)
            line = _line_of(node, loc)
        source = None
        for n in range(len(loc), 0, -1):
            if loc[:n] in sources:
                source = sources[loc[:n]]
                break
        issues.append(
            Issue(
                shown,
                None if source else line,
                _display(field_loc),
                message,
                got=got,
                hint=hint,
                source=source,
            )
        )
    return issues


def dump_resolved(loaded: LoadedRecipe) -> str:
    """Return the fully expanded recipe (all defaults filled in) as YAML text."""
    payload = loaded.recipe.model_dump(mode="json")
    return yaml.safe_dump(payload, sort_keys=False, allow_unicode=True)
