"""Turn pydantic validation errors into one clear user message."""

from __future__ import annotations

from typing import get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..errors import UserError, allowed_list, did_you_mean


def fields_of(model: type[BaseModel], path: tuple = ()) -> list[str]:
    """The allowed field names at ``path`` inside ``model`` (nested models, and the values
    of dict / list fields, are followed)."""
    ann: object = model
    for part in path:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(str(part))
            ann = getattr(field, "annotation", None)
        elif get_origin(ann) in (dict, list):  # ``part`` is a key or an index
            ann = get_args(ann)[-1]
        else:
            return []
    if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
        return []
    return [f.alias or name for name, f in ann.model_fields.items()]  # as written in files


def build_config(model: type[BaseModel], values: dict, where: str) -> BaseModel:
    try:
        return model(**values)
    except ValidationError as e:
        raise UserError(format_errors(e, model, where)) from None
    except TypeError as e:  # e.g. non-string keys
        raise UserError(f"{where}: {e}") from None


_UNION_TAGS = ("constrained-", "literal[", "function-", "list[", "dict[", "tuple[")


def _union_tag(part) -> bool:
    """A location part pydantic adds for one member of a union (``int | 'auto'``)."""
    return isinstance(part, str) and (part in ("int", "float", "str", "bool", "none")
                                      or part.startswith(_UNION_TAGS))


def format_errors(err: ValidationError, model: type[BaseModel], where: str) -> str:
    lines, unions = [], {}  # a union field (``int | 'auto'``): one line, "... or ..."
    for e in err.errors():
        loc = tuple(e["loc"])
        field_loc = loc
        while field_loc and _union_tag(field_loc[-1]):
            field_loc = field_loc[:-1]
        field = ".".join(str(p) for p in field_loc) or "(config)"
        value = e.get("input")
        if field_loc != loc:  # one member of a union rejected the value
            if field not in unions:
                unions[field] = (len(lines), value, [])
                lines.append("")
            unions[field][2].append(e["msg"])
        elif e["type"] == "extra_forbidden":
            allowed = fields_of(model, loc[:-1])
            lines.append(f"unknown field '{field}'{did_you_mean(str(loc[-1]), allowed)}; "
                         f"allowed fields: {allowed_list(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"field '{field}' is required")
        else:
            lines.append(f"field '{field}': value {value!r} is not valid: {e['msg']}")
    for field, (i, value, msgs) in unions.items():
        lines[i] = (f"field '{field}': value {value!r} is not valid: "
                    + " or ".join([msgs[0]] + [m[0].lower() + m[1:] for m in msgs[1:]]))
    if len(lines) == 1:
        return f"{where}: {lines[0]}"
    return f"{where}:\n" + "\n".join(f"  - {line}" for line in lines)
