"""The tunepipe command line: a thin typer app. Every command delegates to spec/, compiler/, runner.

Any catalog flag can be given on a command that takes a spec, in either spelling
(`--lora-rank 16`, `--lora_rank=16`, `--no-use-cache`), or as `--set section.key=value`
(`--set train.1.lora_rank=16` targets the second train entry). They are parsed here by hand,
not declared as ~150 typer options, to keep start-up fast; the catalog validates them.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .errors import StepFailed, UserError

app = typer.Typer(
    name="tunepipe",
    help="Declarative, cached pipelines for LLM fine-tuning: data → template → train → merge → quantize → export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect and clean the artifact store.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"tunepipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Declarative, cached pipelines for LLM fine-tuning: data → template → train → merge → quantize → export."""


OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
WIDE = 110  # narrower terminals get one block per row instead of a table (names never split mid-word)
SET_HELP = "Override a flag: section.key=value (section.N.key for one entry of a list section)."
FLAG_EPILOG = (
    "Any catalog flag may follow the spec, in either spelling: --lora-rank 16, --lora_rank=16, "
    "--no-use-cache, --fp16. `tunepipe flags` lists them."
)
# Every command that reads a spec takes it, --set and catalog-flag overrides the same way:
SPEC_ARG = typer.Argument(..., help="The pipeline spec (YAML).")
SETS_OPT = typer.Option([], "--set", help=SET_HELP)


def spec_command(*args, **kwargs):
    """A command that reads a spec: extra `--flag value` arguments are catalog-flag overrides."""
    return app.command(*args, context_settings=OVERRIDES, epilog=FLAG_EPILOG, **kwargs)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def parse_overrides(extra: list[str], sets: list[str]):
    """`--flag value`, `--flag=value`, bare `--switch`, and `--set section[.N].key=value` → Overrides."""
    from .spec import Override

    overrides: list[Override] = []
    index = 0
    while index < len(extra):
        token = extra[index]
        index += 1
        if not token.startswith("--") or token == "--":
            raise UserError(f"unexpected argument {token!r}: flags are written --name value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            nxt = extra[index] if index < len(extra) else None
            if nxt is not None and not nxt.startswith("--"):
                value, index = nxt, index + 1
            else:
                value = None
        overrides.append(Override(key=key, value=value, label=token if value is None else f"--{key} {value}"))
    for item in sets:
        target, eq, value = item.partition("=")
        parts = target.split(".")
        if not eq or not all(parts):
            raise UserError(f"--set {item!r}: expected section.key=value (e.g. --set train.lora_rank=16)")
        section = parts[0] if len(parts) > 1 else None
        entry = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if len(parts) > 3 or (len(parts) == 3 and entry is None):
            raise UserError(f"--set {item!r}: expected section.key=value or section.N.key=value")
        overrides.append(Override(key=parts[-1], value=value, label=f"--set {item}", section=section, index=entry))
    return overrides


def load(spec: Path, ctx: typer.Context, sets: list[str]):
    from .spec import load_spec

    resolved = load_spec(spec, parse_overrides(list(ctx.args), sets))
    if resolved.warnings:
        err = _console(stderr=True)
        for warning in resolved.warnings:
            err.print(str(warning), style="yellow", markup=False)
    return resolved


@spec_command()
def validate(
    ctx: typer.Context,
    spec: Path = SPEC_ARG,
    sets: list[str] = SETS_OPT,
    print_spec: bool = typer.Option(False, "--print", help="Print the resolved spec (defaults filled in) as YAML."),
) -> None:
    """Check a spec: every error at once, as FILE:LINE:COL: section.key: message. Exit 2 on errors."""
    resolved = load(spec, ctx, sets)
    if print_spec:
        import yaml

        typer.echo(yaml.safe_dump(resolved.data, sort_keys=False, allow_unicode=True), nl=False)
    else:
        from .spec.catalog import STAGE_SECTIONS

        stages = [s for s in STAGE_SECTIONS if resolved.data.get(s)]
        swept = ""
        if resolved.sweep is not None:  # every point is validated like the file
            from .spec import load_spec, sweep

            overrides = parse_overrides(list(ctx.args), sets)
            chosen = sweep.points(resolved.sweep)
            file_facts: dict = {}  # the points' input files, read once
            for point in chosen:
                load_spec(spec, [*overrides, *sweep.overrides(point, resolved.data)], file_facts=file_facts)
            swept = f"; a sweep of {len(chosen)} points"
        typer.echo(f"{spec}: ok ({', '.join(stages) or 'no stages'}{swept})")


@app.command()
def schema(
    write: bool = typer.Option(False, "--write", help="Write the schema to schemas/tunepipe.schema.json."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if the committed schema is stale."),
    path: Path = typer.Option(Path("schemas/tunepipe.schema.json"), "--path", help="Where the schema file lives."),
) -> None:
    """Print the JSON Schema of a spec, generated from the flag catalog."""
    from .spec.schema import render_schema

    text = render_schema()
    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            typer.echo(f"{path} is stale: run `tunepipe schema --write`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{path} is up to date")
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {path}")
    else:
        typer.echo(text, nl=False)


class PlanFormat(str, Enum):
    text = "text"
    json = "json"
    mermaid = "mermaid"
    dot = "dot"


def compile_spec(
    spec: Path, ctx: typer.Context, sets: list[str], executor: str | None = None, point: int | None = None
):
    """The spec, validated with its overrides (warnings printed), compiled to a plan (a sweep's
    merged plan, or its point `point`)."""
    from .compiler.sweep import compile_resolved

    overrides = parse_overrides(list(ctx.args), sets)
    resolved = load(spec, ctx, sets)
    return compile_resolved(resolved, overrides, point=point, executor_override=executor)


@spec_command()
def plan(
    ctx: typer.Context,
    spec: Path = SPEC_ARG,
    sets: list[str] = SETS_OPT,
    fmt: PlanFormat = typer.Option(PlanFormat.text, "--format", "-f", help="text tree, json, mermaid or dot."),
    executor: Optional[str] = typer.Option(None, "--executor", help="Plan as if every step ran with this executor."),
    point: Optional[int] = typer.Option(None, "--point", min=1, help="One point of the spec's sweep (1-based)."),
    remote: Optional[str] = typer.Option(
        None, "--remote", help="Also ask this remote cache (default: the spec's, $TUNEPIPE_REMOTE)."
    ),
) -> None:
    """Show the DAG of steps, each cached, on the remote cache, or stale — and why, compared with tunepipe.lock."""
    from .compiler.render import render
    from .compiler.status import annotate
    from .runner import open_remote_cache, remote_url

    compiled = compile_spec(spec, ctx, sets, executor, point)
    url = remote_url(compiled, remote)
    cache = open_remote_cache(url, _console(stderr=True)) if url else None
    typer.echo(render(compiled, annotate(compiled, remote=cache), fmt.value), nl=False)
    if compiled.points and fmt == PlanFormat.text:
        for sweep_point, _ in compiled.points:
            typer.echo(f"  @{sweep_point.name}: {sweep_point.label}")


@spec_command()
def run(
    ctx: typer.Context,
    spec: Path = SPEC_ARG,
    sets: list[str] = SETS_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan and the exact commands; run nothing."),
    frozen: bool = typer.Option(False, "--frozen", help="CI: exit 3 if any step differs from tunepipe.lock."),
    force: list[str] = typer.Option([], "--force", help="Rebuild this step (id or kind), or 'all'."),
    until: Optional[str] = typer.Option(None, "--until", help="Build this step and what it needs, nothing after."),
    only: Optional[str] = typer.Option(None, "--only", help="Build only this step (its inputs must be cached)."),
    keep_going: bool = typer.Option(False, "--keep-going", help="After a failure, finish the independent steps."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Independent steps to run at once."),
    executor: Optional[str] = typer.Option(None, "--executor", help="Run every step with this executor kind."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the steps' INFO log lines."),
    detach: bool = typer.Option(
        False, "--detach", help="Queue every stale step on its batch system (slurm) and return."
    ),
    point: Optional[int] = typer.Option(None, "--point", min=1, help="Only this point of the spec's sweep (1-based)."),
    remote: Optional[str] = typer.Option(
        None, "--remote", help="A remote cache to pull from and push to (dir, s3://, fsspec URL)."
    ),
    no_push: bool = typer.Option(False, "--no-push", help="Pull from the remote cache, push nothing."),
) -> None:
    """Build what is stale, reuse what is cached, write tunepipe.lock."""
    from .runner import print_summary, remote_url, run_plan

    compiled = compile_spec(spec, ctx, sets, executor, point)  # the executor decides the world size, so the keys
    console = _console(stderr=True)
    result = run_plan(
        compiled,
        dry_run=dry_run,
        frozen=frozen,
        force=force or None,
        until=until,
        only=only,
        keep_going=keep_going,
        jobs=jobs,
        console=console,
        verbose=verbose,
        detach=detach,
        remote=remote_url(compiled, remote),
        push="never" if no_push else compiled.push,
    )
    print_summary(result, console)
    if result.with_status("failed"):
        raise typer.Exit(1)


@spec_command()
def status(
    ctx: typer.Context,
    spec: Path = SPEC_ARG,
    sets: list[str] = SETS_OPT,
    executor: Optional[str] = typer.Option(None, "--executor", help="As run with this executor kind."),
) -> None:
    """Each step: cached, stale (and why), or its job's state (pending, running, failed …)."""
    from rich.table import Table

    from .jobs import status_rows
    from .store import open_store

    compiled = compile_spec(spec, ctx, sets, executor)
    table = Table(title=f"{compiled.name}: {len(compiled.steps)} steps")
    for column in ("step", "key", "state", "detail"):
        table.add_column(column, overflow="fold")
    for row in status_rows(compiled, open_store(compiled.cache_dir)):
        table.add_row(row["id"], row["key"], row["state"], row["detail"])
    _console().print(table)


@spec_command()
def logs(
    ctx: typer.Context,
    spec: Path = SPEC_ARG,
    step: str = typer.Argument(..., help="A step id (or kind)."),
    sets: list[str] = SETS_OPT,
    follow: bool = typer.Option(False, "--follow", "-f", help="Follow a running job."),
    executor: Optional[str] = typer.Option(None, "--executor", help="As run with this executor kind."),
) -> None:
    """Print a step's log (its artifact's when cached, else its last run's); -f follows a running job."""
    from .jobs import follow_log
    from .store import open_store

    compiled = compile_spec(spec, ctx, sets, executor)
    follow_log(compiled, open_store(compiled.cache_dir), step, follow, lambda text: typer.echo(text, nl=False))


@spec_command()
def cancel(
    ctx: typer.Context,
    spec: Path = SPEC_ARG,
    steps: list[str] = typer.Argument(None, help="Step ids or kinds (default: every step)."),
    sets: list[str] = SETS_OPT,
    executor: Optional[str] = typer.Option(None, "--executor", help="As run with this executor kind."),
) -> None:
    """Cancel the running or queued jobs of a spec's steps (local processes and SLURM jobs alike)."""
    from .jobs import cancel_steps
    from .store import open_store

    compiled = compile_spec(spec, ctx, sets, executor)
    cancelled = cancel_steps(compiled, open_store(compiled.cache_dir), steps or None)
    typer.echo(f"cancelled {len(cancelled)} job(s)" + (f": {', '.join(cancelled)}" if cancelled else ""))


class ChatBackend(str, Enum):
    hf = "hf"
    llama_cpp = "llama-cpp"


@spec_command()
def chat(
    ctx: typer.Context,
    target: Path = typer.Argument(..., help="A spec (its final model, from the cache) or an artifact directory."),
    sets: list[str] = SETS_OPT,
    backend: ChatBackend = typer.Option(
        ChatBackend.hf, "--backend", "-b", help="hf (transformers) or llama-cpp (the GGUF export)."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one prompt and exit."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
) -> None:
    """Chat with the trained, merged or exported model through the pipeline's template."""
    from .chat import chat as talk

    overrides = parse_overrides(list(ctx.args), sets)
    talk(target, overrides, backend.value, prompt, max_new_tokens, _console(stderr=True))


@app.command("import")
def import_(
    config: Path = typer.Argument(..., help="A LLaMA-Factory or axolotl training config (YAML)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the spec here (default: print it)."),
    export: Optional[Path] = typer.Option(
        None, "--export", help="A LLaMA-Factory export config: adds merge (and quantize)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite the spec and the files written beside it."),
) -> None:
    """Convert a LLaMA-Factory or axolotl config into a tunepipe spec; keys without an equivalent are listed in comments."""
    from .spec.importer import import_command

    raise typer.Exit(import_command(config, output, force=force, export=export))


class FlagsFormat(str, Enum):
    table = "table"
    json = "json"


@app.command()
def flags(
    query: Optional[str] = typer.Argument(None, help="Search names and descriptions (English or Chinese)."),
    section: Optional[str] = typer.Option(None, "--section", "-s", help="Only this section's flags."),
    fmt: FlagsFormat = typer.Option(FlagsFormat.table, "--format", "-f"),
) -> None:
    """Browse the flag catalog."""
    from dataclasses import asdict

    from .spec import load_catalog
    from .spec.models import describe_type

    catalog = load_catalog()
    if section is not None and section not in catalog.sections:
        raise UserError(f"unknown section {section!r}; sections: {', '.join(catalog.sections)}")
    needle = (query or "").lower().replace("-", "_")
    rows = [
        f
        for f in catalog.flags.values()
        if (section is None or f.section == section)
        and (
            not needle
            or needle in f.name
            or any(needle in a for a in f.aliases)
            or needle in f.en.lower()
            or needle in f.zh.lower()
        )
    ]
    if fmt == FlagsFormat.json:
        out = []
        for flag in rows:
            out.append({**asdict(flag), "accepts": describe_type(flag), "kebab": flag.kebab})
            if flag.negatable:
                out.append(
                    {
                        "name": flag.negation,
                        "section": flag.section,
                        "type": "bool",
                        "negates": flag.name,
                        "affects": flag.affects,
                        "origin": flag.origin,
                        "en": f"Same as {flag.name}: false.",
                        "zh": f"等效于 --{flag.name} false",
                    }
                )
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    from rich.table import Table

    console = _console()
    if console.width < WIDE:  # a narrow terminal: one block per flag, names whole
        from rich.text import Text

        console.print(Text(f"{len(rows)} flags", style="bold"))
        for flag in rows:
            default = repr(flag.default) if flag.default is not None else "—"
            facts = " · ".join(
                [flag.section, describe_type(flag), f"default {default}"]
                + (["key"] if flag.affects == "artifact" else [])
            )
            console.print(
                Text.assemble(
                    (flag.name, "bold"), f"  ({facts})" + (f"  also no_{flag.name}" if flag.negatable else "")
                )
            )
            console.print(Text(f"    {flag.en}\n    {flag.zh}"))
        return
    table = Table(show_lines=False, title=f"{len(rows)} flags")
    for column in ("flag", "section", "accepts", "default", "key?", "description"):
        table.add_column(column, overflow="fold", no_wrap=column == "flag")
    for flag in rows:
        name = flag.name + (f"\n(no_{flag.name})" if flag.negatable else "")
        table.add_row(
            name,
            flag.section,
            describe_type(flag),
            repr(flag.default) if flag.default is not None else "—",
            "key" if flag.affects == "artifact" else "",
            f"{flag.en}\n[dim]{flag.zh}[/]",
        )
    console.print(table)


@app.command()
def templates() -> None:
    """List the built-in chat templates."""
    from rich.table import Table
    from rich.text import Text

    from .runtime.template_registry import list_templates

    rows = list_templates()
    console = _console()
    if console.width < WIDE:  # a narrow terminal: one block per template, names whole
        console.print(Text(f"{len(rows)} templates (template: NAME; template_file: PATH for your own)", style="bold"))
        for row in rows:
            mirrors = f"  (mirrors {row['mirrors']})" if row["mirrors"] else ""
            console.print(Text.assemble((row["name"], "bold"), mirrors))
            console.print(Text(f"    {row['description']}\n    stop words: {', '.join(row['stop_words']) or '—'}"))
        return
    table = Table(title=f"{len(rows)} templates (template: NAME; template_file: PATH for your own)")
    for column in ("name", "mirrors", "stop words", "default system", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = (
            row["name"],
            row["mirrors"] or "",
            ", ".join(row["stop_words"]),
            (row["default_system"] or "")[:60],
            row["description"],
        )
        table.add_row(*map(Text, cells))  # Text: template strings like [/INST] are not rich markup
    console.print(table)


@spec_command()
def preview(
    ctx: typer.Context,
    spec: Path = SPEC_ARG,
    sets: list[str] = SETS_OPT,
    n: int = typer.Option(3, "-n", min=1, help="Samples to show per dataset."),
) -> None:
    """Show the first training samples as the model sees them: trained tokens vs masked ones."""
    from .preview import preview as show

    resolved = load(spec, ctx, sets)
    show(resolved.data, resolved.spec_dir, n, _console())


def _store_and_plan(spec: Optional[Path], cache: Optional[Path], overrides: list[str] = ()):
    """The store a cache command works on — the spec's, found as `run` finds it (its overrides
    included); else --cache; else $TUNEPIPE_CACHE or ./.tunepipe/cache — and the spec's plan."""
    from .store import default_cache_dir, open_store

    if spec is not None:
        from .compiler.sweep import compile_resolved
        from .spec import load_spec

        parsed = parse_overrides(list(overrides), [])
        plan_ = compile_resolved(load_spec(spec, parsed), parsed, cache_dir=cache)
        return open_store(plan_.cache_dir), plan_
    root = cache.resolve() if cache else default_cache_dir(Path.cwd())
    if not root.is_dir():
        _console(stderr=True).print(
            f"no cache at {root}: give the spec (tunepipe cache ls SPEC) or --cache DIR", style="yellow", markup=False
        )
    return open_store(root), None


SPEC_OPT = typer.Argument(None, help="Work on this spec's cache (and its step ids); default ./.tunepipe/cache.")
CACHE_OPT = typer.Option(
    None, "--cache", help="The cache directory (default: the spec's, $TUNEPIPE_CACHE or ./.tunepipe/cache)."
)


@cache_app.command("ls")
def cache_ls(
    spec: Optional[Path] = SPEC_OPT,
    cache: Optional[Path] = CACHE_OPT,
    fmt: FlagsFormat = typer.Option(FlagsFormat.table, "--format", "-f"),
    on_remote: bool = typer.Option(False, "--remote", help="List the remote cache instead."),
    remote: Optional[str] = typer.Option(None, "--remote-url", help="The remote cache's URL."),
) -> None:
    """List the artifacts in the store (or, with --remote, in the remote cache)."""
    from . import runner

    store, plan_ = _store_and_plan(spec, cache)
    if on_remote or remote:
        store = _remote(plan_, remote)
    rows = runner.cache_ls(store)
    if fmt == FlagsFormat.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{store.location}: {len(rows)} artifacts")
    for column in ("key", "step", "kind", "files", "MB", "built", "wall s"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["key"][:12],
            str(row["id"]),
            str(row["kind"]),
            str(row["files"]),
            f"{row['bytes'] / 1e6:.2f}",
            str(row["created"] or ""),
            f"{row['wall_s']:.1f}" if row["wall_s"] is not None else "",
        )
    _console().print(table)


REMOTE_OPT = typer.Option(
    None, "--remote", help="The remote cache (default: the spec's cache.remote, $TUNEPIPE_REMOTE)."
)


def _remote(plan_, url: Optional[str]):
    from .runner import remote_url
    from .store.remote import open_remote

    url = remote_url(plan_, url) if plan_ is not None else (url or os.environ.get("TUNEPIPE_REMOTE"))
    if not url:
        raise UserError("no remote cache: give --remote URL, set TUNEPIPE_REMOTE, or cache: {remote: URL} in the spec")
    return open_remote(url)


@cache_app.command("push")
def cache_push(
    spec: Path = typer.Argument(..., help="Push this spec's built steps."), remote: Optional[str] = REMOTE_OPT
) -> None:
    """Upload every built step of the spec's plan to the remote cache (files first, the manifest last)."""
    from .store.remote import RemoteReadOnly

    store, plan_ = _store_and_plan(spec, None)
    target = _remote(plan_, remote)
    moved = pushed = 0
    for step in plan_.steps:
        if store.has(step.key):
            try:
                sent = target.push(step.key, store.fetch(step.key), store.manifest(step.key))
            except RemoteReadOnly as exc:
                raise UserError(str(exc)) from None
            moved, pushed = moved + sent, pushed + bool(sent)
    typer.echo(f"pushed {pushed} artifact(s), {moved / 1e6:.2f} MB, to {target.location}")


@cache_app.command("pull")
def cache_pull(
    spec: Path = typer.Argument(..., help="Pull this spec's steps."), remote: Optional[str] = REMOTE_OPT
) -> None:
    """Download every step of the spec's plan that the remote cache has (each file verified as it streams)."""
    store, plan_ = _store_and_plan(spec, None)
    source = _remote(plan_, remote)
    moved = pulled = 0
    for step in plan_.steps:
        if not store.has(step.key) and source.has(step.key):
            got = source.pull(step.key, store)
            moved, pulled = moved + got, pulled + 1
    typer.echo(f"pulled {pulled} artifact(s), {moved / 1e6:.2f} MB, from {source.location}")


@cache_app.command("verify")
def cache_verify(spec: Optional[Path] = SPEC_OPT, cache: Optional[Path] = CACHE_OPT) -> None:
    """Re-hash every artifact; damaged ones are removed (the next run rebuilds them). Exit 1 if any was damaged."""
    from . import runner

    store, _ = _store_and_plan(spec, cache)
    damaged = runner.cache_verify(store)
    for key, problems in damaged.items():
        typer.echo(f"{key[:12]}: damaged, removed: {'; '.join(problems)}", err=True)
    count = len(runner.cache_ls(store))
    typer.echo(f"{count} artifacts verified, {len(damaged)} damaged")
    if damaged:
        raise typer.Exit(1)


@cache_app.command("gc", context_settings=OVERRIDES, epilog=FLAG_EPILOG)
def cache_gc(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="Keep this spec's artifacts, remove the rest."),
    keep_lock: bool = typer.Option(False, "--keep-lock", help="Also keep what tunepipe.lock names."),
    cache: Optional[Path] = CACHE_OPT,
    on_remote: bool = typer.Option(False, "--remote", help="Collect the remote cache instead."),
    older_than: Optional[float] = typer.Option(None, "--older-than", help="--remote: only artifacts older than DAYS."),
) -> None:
    """Remove every artifact the spec's current plan (with any flag overrides) does not use."""
    from . import runner

    store, plan_ = _store_and_plan(spec, cache, ctx.args)
    if on_remote:
        from .compiler.lockfile import keys_in_lock

        target = _remote(plan_, None)
        keep = {step.key for step in plan_.steps} | (keys_in_lock(plan_.lock_path) if keep_lock else set())
        removed = target.gc(keep, older_than_days=older_than)
        typer.echo(f"removed {len(removed)} artifacts from {target.location}")
        return
    removed = runner.cache_gc(store, plan_, keep_lock=keep_lock)
    typer.echo(f"removed {len(removed)} artifacts from {store.root}")


@cache_app.command("rm")
def cache_rm(
    names: list[str] = typer.Argument(..., help="Step ids (with --spec), keys or key prefixes."),
    spec: Optional[Path] = typer.Option(None, "--spec", "-s", help="Use this spec's cache (and step ids)."),
    cache: Optional[Path] = CACHE_OPT,
) -> None:
    """Remove artifacts from the store."""
    from . import runner

    store, plan_ = _store_and_plan(spec, cache)
    for key in runner.cache_rm(store, names, plan_):
        typer.echo(f"removed {key[:12]}")


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a command-line usage error (typer ≥ 0.16 vendors click as typer._click)."""
    types: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return tuple(types)


def _print_error(*parts: str | tuple[str, str]) -> None:
    """One line on stderr, parts styled as `rich.text.Text.assemble` takes them: as text, never as
    markup (messages may hold [brackets]). rich is imported here: a command that succeeds needs none."""
    from rich.text import Text

    _console(stderr=True).print(Text.assemble(*parts))


def main() -> None:
    """Entry point: user errors print a clear message and exit 2 (frozen plan: 3), never a traceback."""
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code in this mode
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        _print_error(("error: ", "bold red"), exc.message)
        for line in exc.details:
            _console(stderr=True).print(line, markup=False)
        sys.exit(exc.exit_code)
    except StepFailed as exc:
        _print_error(
            (f"step {exc.step_id} failed", "bold red"), f" (exit status {exc.returncode}); last lines of its log:"
        )
        _console(stderr=True).print(exc.log_tail, markup=False)
        sys.exit(2 if exc.returncode == 2 else exc.exit_code)  # a stage's user error (bad input) stays exit 2
    except OSError as exc:  # the runner's own resource errors (a full disk writing STEP.json, …)
        from .resources import describe_os_error

        line = describe_os_error(exc)
        if line is None:
            raise
        _print_error(("error: ", "bold red"), line)
        sys.exit(1)
    except KeyboardInterrupt:
        _print_error(
            (
                "interrupted: the running steps were stopped and nothing half-built was kept; "
                "run the same command again to continue (finished steps stay cached)",
                "yellow",
            )
        )
        sys.exit(130)
    except _usage_errors() as exc:  # a missing argument, a bad option value, an unknown command: exit 2
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
