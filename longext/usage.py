"""How the command line reads: help with plain metavars (`RECIPE`, `[SUITE]`, `--out DIR`, never typer's
`{RECIPE}`, `<path>`, `<int range>`) and a rejected flag or argument as one `where: what (got X)` line."""

from __future__ import annotations

import typer
from typer._click import exceptions as click_errors  # typer >= 0.29 vendors click; the `click` package is not used


class Command(typer.core.TyperCommand):
    """Help with plain metavars: `RECIPE`, `[SUITE]`, `FILES...`, `--out DIR` (typer writes `{RECIPE}` and the types,
    `<path>`, `<int range>`, `<list[Path]>`). Options name their metavar; one that does not gets one from its type.
    Every command of the app uses it (plain_help)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        arguments = [_argument_name(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [self.options_metavar, *arguments] if self.options_metavar else arguments

    def format_options(self, ctx, formatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            if param.param_type_name == "option" and param.metavar is None and not param.is_flag:
                param.metavar = _type_metavar(param)
            record = param.get_help_record(ctx)
            if record is not None and param.param_type_name == "argument":
                args.append((_argument_name(param).strip("[]"), record[1]))
            elif record is not None:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_name(param) -> str:
    name = (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")
    return name if param.required else f"[{name}]"


def _type_metavar(param) -> str:
    desc = param.type_descriptor
    if desc.is_choice and desc.choices:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices)
    if desc.is_path:
        return "PATH"
    kind = desc.ranged_type_name if desc.is_ranged else param.bare_type()
    return {"int": "N", "float": "X"}.get(kind, "TEXT")


def plain_help(typer_app: typer.Typer) -> None:
    """Every command of `typer_app` and of its sub-apps prints its help through Command."""
    for info in typer_app.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):  # typer's default; a command's own class is kept
            info.cls = Command
    for group in typer_app.registered_groups:
        plain_help(group.typer_instance)


def usage_line(exc: click_errors.UsageError) -> str:
    """`<where>: <what is wrong> (got X)` / `(allowed: ...)` for a flag or argument Click rejected."""
    ctx = exc.ctx
    where = ctx.command_path if ctx else "longext"
    param = getattr(exc, "param", None)
    if isinstance(exc, click_errors.BadParameter) and not isinstance(exc, click_errors.MissingParameter) and param:
        errors = getattr(exc.__cause__, "errors", None)  # typer converts values with pydantic
        got = errors()[0].get("input") if callable(errors) else None
        message = exc.message.removeprefix("Value error, ").split("\n")[0].rstrip(".")
        shown = got is not None and repr(got) not in message
        name = param.opts[0] if param.param_type_name == "option" else (param.metavar or param.name.upper())
        return f"{name}: {message}" + (f" (got {got!r})" if shown else "")
    if isinstance(exc, click_errors.NoSuchOption) and ctx is not None:
        params = ctx.command.params
        options = [p.opts[0] for p in params if p.param_type_name == "option" and not getattr(p, "hidden", False)]
        close = f", did you mean {' or '.join(sorted(exc.possibilities))}?" if exc.possibilities else ""
        return f"{where}: no such option {exc.option_name}{close} (allowed: {', '.join([*options, '--help'])})"
    if ctx is not None and isinstance(ctx.command, typer.core.TyperGroup) and exc.message.startswith("No such command"):
        return f"{where}: {exc.message.rstrip('.')} (commands: {', '.join(ctx.command.list_commands(ctx))})"
    return f"{where}: {exc.format_message()} (see `{where} --help`)"
