"""The `maof` command line: sign in, manage agents, submit and watch runs, read results and
audit trails, cancel and retry; every command on maof_client, `--json` for scripts."""

from __future__ import annotations

import functools
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.live import Live

from maof_client import __version__, render
from maof_client.client import MaofClient, new_idempotency_key
from maof_client.config import DEFAULT_API_URL, CredentialsFile, checked_api_url
from maof_client.errors import ConnectionFailed, MaofError, NotFound, NotSignedIn, TryLater
from maof_client.models import Run, hidden, shown
from maof_client.workflows import WorkflowFileError, read_execute_body, read_input

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# Exit codes: 0 done (a watched run completed), 1 an API error or a run that failed or was
# cancelled, 2 a usage error (click's), 130 interrupted while watching.
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass
class State:
    """What every command shares: the API URL and, made on first use, its client."""

    api_url: str
    _client: MaofClient | None = field(default=None, repr=False)

    @property
    def credentials(self) -> CredentialsFile:
        return CredentialsFile(self.api_url)

    @property
    def client(self) -> MaofClient:
        if self._client is None:
            self._client = MaofClient(self.api_url, tokens=self.credentials)
        return self._client


pass_state = click.make_pass_decorator(State)


def fail(message: str) -> NoReturn:
    click.echo(f"Error: {shown(message)}", err=True)  # the API's words: no escape codes
    raise click.exceptions.Exit(EXIT_FAILED)


def explain(error: MaofError, api_url: str) -> str:
    """An API error as the lines a person needs: what, which field, what to do."""
    if isinstance(error, NotSignedIn):
        return f"{error.message}: sign in with `maof login --email <you@example.com>`"
    if isinstance(error, ConnectionFailed):
        return (
            f"{error.message}. Is the API running? `make dev` serves {DEFAULT_API_URL}; "
            "MAOF_API_URL (or --api-url) selects another."
        )
    lines = [f"{error.message} [{error.code}]"]
    if isinstance(error.details, list):
        for detail in error.details:
            if isinstance(detail, dict) and "field" in detail:
                lines.append(f"  {detail['field']}: {detail.get('message', '')}")
    if isinstance(error, TryLater) and error.retry_after is not None:
        lines.append(f"  retry after {error.retry_after:g} s")
    if error.request_id:
        lines.append(f"  request id: {error.request_id}")
    return "\n".join(lines)


class MaofGroup(click.Group):
    """Turns the client's errors into one message on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MaofError as error:
            state = ctx.find_object(State)
            fail(explain(error, state.api_url if state else DEFAULT_API_URL))


def json_option(command: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print exactly the API's data as JSON, and nothing else on stdout.",
    )(command)


def emit_json(data: Any) -> None:
    """The data as JSON, non-ASCII text as it is, but every character a terminal would act
    on escaped: json escapes C0 itself, and leaves DEL, C1 (such as the CSI U+009B), bidi
    overrides, zero-width characters and line separators as they are. (Its own newlines,
    the indentation's, are the only raw ones left: json escapes those in strings.)"""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    click.echo("".join(_escaped(char) if hidden(char) else char for char in text))


def _escaped(char: str) -> str:
    """`char` as a JSON escape (outside the BMP, as its UTF-16 surrogate pair; a lone
    surrogate, which no encoding writes, as itself)."""
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    high, low = divmod(code - 0x10000, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"


def show(renderable: Any) -> None:
    render.console().print(renderable)


def read_password(from_stdin: bool, prompt: str, *, confirm: bool = False) -> str:
    if from_stdin:
        password = sys.stdin.read().rstrip("\r\n")
        if not password:
            raise click.UsageError("--password-stdin: standard input held no password")
        return password
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


def file_errors_are_usage_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except WorkflowFileError as exc:
            raise click.UsageError(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def api_url_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--api-url (or MAOF_API_URL) checked before anything is sent: `localhost:3000` would
    otherwise be read as a URL scheme."""
    try:
        return checked_api_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


# ---------------------------------------------------------------------------- the group


@click.group(
    cls=MaofGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--api-url",
    envvar="MAOF_API_URL",
    default=DEFAULT_API_URL,
    show_default=True,
    show_envvar=True,
    callback=api_url_option,
    help="The MAOF API to talk to (http:// or https://).",
)
@click.version_option(__version__, prog_name="maof")
@click.pass_context
def cli(ctx: click.Context, api_url: str) -> None:
    """MAOF from the command line: agents, workflow runs, results and audit trails.

    Sign in once with `maof login`; the tokens are kept in ~/.config/maof/credentials.json
    (0600; $XDG_CONFIG_HOME or $MAOF_CONFIG_DIR move it) and refreshed when they expire.
    Every command takes --json for scripts. Exit codes: 0 ok, 1 an API error or a run that
    failed or was cancelled, 2 a usage error.
    """
    ctx.obj = State(api_url)


def main() -> None:
    """The `maof` console script."""
    cli(prog_name="maof")


# ---------------------------------------------------------------------------- account


@cli.command()
@click.option("--email", required=True, help="Your account's email.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from standard input (scripts)."
)
@json_option
@pass_state
def login(state: State, email: str, password_stdin: bool, as_json: bool) -> None:
    """Sign in and store the session's tokens (the password is asked for, never an option)."""
    state.credentials.check_writable()
    password = read_password(password_stdin, "Password")
    signed = state.client.login(email, password)
    if as_json:
        emit_json(signed.raw)  # the user; tokens are never printed
        return
    click.echo(f"Signed in to {state.api_url} as {signed.user.email}.")
    click.echo(f"Tokens stored in {state.credentials.path}.", err=True)


@cli.command()
@click.option("--email", required=True, help="The new account's email.")
@click.option("--name", required=True, help="Your name.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from standard input (scripts)."
)
@click.option("--login", "then_login", is_flag=True, help="Sign in right after.")
@json_option
@pass_state
def register(
    state: State, email: str, name: str, password_stdin: bool, then_login: bool, as_json: bool
) -> None:
    """Create an account (POST /auth/register)."""
    if then_login:
        state.credentials.check_writable()
    password = read_password(password_stdin, "Password", confirm=True)
    user = state.client.register(email, password, name)
    if then_login:
        state.client.login(email, password)
    if as_json:
        emit_json(user.raw)
        return
    click.echo(f"Created the account {user.email} at {state.api_url}.")
    if then_login:
        click.echo(f"Signed in; tokens stored in {state.credentials.path}.", err=True)


@cli.command()
@click.option("--all", "everywhere", is_flag=True, help="End every session of this user.")
@json_option
@pass_state
def logout(state: State, everywhere: bool, as_json: bool) -> None:
    """End this session (or, with --all, every one) and forget its tokens."""
    if everywhere:
        ended = state.client.logout_all()
    else:
        ended = state.client.logout()
    if as_json:
        emit_json({"sessionsEnded": ended})
        return
    click.echo(f"Signed out of {state.api_url} ({ended} session(s) ended).")


@cli.command()
@json_option
@pass_state
def whoami(state: State, as_json: bool) -> None:
    """The signed-in user."""
    user = state.client.me()
    if as_json:
        emit_json(user.raw)
        return
    click.echo(f"{user.email} ({user.name}, {user.role}, user {user.user_uuid}) at {state.api_url}")


@cli.command()
@json_option
@pass_state
def health(state: State, as_json: bool) -> None:
    """The API's health (exit 1 when degraded)."""
    report = state.client.health()
    if as_json:
        emit_json(report.raw)
    else:
        services = ", ".join(f"{k} {v}" for k, v in report.services.items())
        click.echo(f"{state.api_url}: {report.status} (version {report.version}; {services})")
    if not report.ok:
        raise click.exceptions.Exit(EXIT_FAILED)


@cli.command()
@json_option
@pass_state
def stats(state: State, as_json: bool) -> None:
    """Your runs, stages and agents over the last hour."""
    report = state.client.stats()
    if as_json:
        emit_json(report.raw)
        return
    click.echo(
        f"Last {report.window}: runs {_counts(report.runs)}; stages {_counts(report.stages)}"
    )
    for agent in report.agents:
        click.echo(
            f"  {agent.agent_id}: {agent.completed} completed, {agent.failed} failed, "
            f"p50 {agent.stage_p50_ms} ms, p95 {agent.stage_p95_ms} ms"
        )


def _counts(by_status: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) or "none"


# ---------------------------------------------------------------------------- agents


@cli.group()
def agents() -> None:
    """Register, list, check and delete agents."""


def on_agent(client: MaofClient, agent: str, action: Callable[[str], T]) -> T:
    """`action` on the agent `agent` names by its UUID or its agentId. An agentId may look
    like a UUID too: when no agent has that UUID (a 404), the agent with that agentId."""
    try:
        agent_uuid = str(uuid.UUID(agent))
    except ValueError:
        return action(agent_uuid_by_id(client, agent))
    try:
        return action(agent_uuid)
    except NotFound:
        found = client.find_agent(agent)
        if found is None:
            raise
    return action(found.agent_uuid)


def agent_uuid_by_id(client: MaofClient, agent_id: str) -> str:
    found = client.find_agent(agent_id)
    if found is None:
        fail(f"You have no agent with agentId '{agent_id}' (see `maof agents list`)")
    return found.agent_uuid


@agents.command("list")
@click.option("--capability", help="Only agents with this capability.")
@click.option("--status", type=click.Choice(["online", "degraded", "offline"]))
@click.option("--page", type=click.IntRange(min=1), default=None)
@click.option("--limit", type=click.IntRange(1, 100), default=None)
@json_option
@pass_state
def agents_list(
    state: State,
    capability: str | None,
    status: str | None,
    page: int | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Your agents and shared ones."""
    listed = state.client.list_agents(capability=capability, status=status, page=page, limit=limit)
    if as_json:
        emit_json(listed.raw)
        return
    show(render.agents_table(listed))


@agents.command("register")
@click.option("--agent-id", required=True, help="Your name for it, unique among your agents.")
@click.option("--name", required=True, help="A display name.")
@click.option("--endpoint", required=True, help="Its URL (http(s)://…, or mock://name locally).")
@click.option(
    "--auth-token",
    envvar="MAOF_AGENT_AUTH_TOKEN",
    show_envvar=True,
    help="The bearer token MAOF sends it (asked for when not given).",
)
@click.option(
    "--capability",
    "capabilities",
    multiple=True,
    required=True,
    help="A capability it serves (repeat for several).",
)
@click.option("--max-concurrent", type=click.IntRange(1, 100), help="Tasks at once (default 5).")
@click.option("--description")
@click.option("--shared", is_flag=True, help="Serve every user's runs (admins only).")
@json_option
@pass_state
def agents_register(
    state: State,
    agent_id: str,
    name: str,
    endpoint: str,
    auth_token: str | None,
    capabilities: tuple[str, ...],
    max_concurrent: int | None,
    description: str | None,
    shared: bool,
    as_json: bool,
) -> None:
    """Register an agent; its health is checked at once."""
    token = auth_token or str(click.prompt("Agent auth token", hide_input=True))
    agent = state.client.register_agent(
        agent_id,
        name,
        endpoint,
        token,
        list(capabilities),
        description=description,
        max_concurrent_tasks=max_concurrent,
        visibility="shared" if shared else None,
    )
    if as_json:
        emit_json(agent.raw)
        return
    click.echo(
        f"Registered {agent.agent_id} ({agent.agent_uuid}): {agent.status}, "
        f"capabilities {', '.join(agent.capabilities)}"
    )


@agents.command("show")
@click.argument("agent")
@json_option
@pass_state
def agents_show(state: State, agent: str, as_json: bool) -> None:
    """One agent, by agentId or UUID."""
    found = on_agent(state.client, agent, state.client.get_agent)
    if as_json:
        emit_json(found.raw)
        return
    show(render.agent_fields(found.raw))


@agents.command("check")
@click.argument("agent")
@json_option
@pass_state
def agents_check(state: State, agent: str, as_json: bool) -> None:
    """Probe an agent's health now (by agentId or UUID)."""
    checked = on_agent(state.client, agent, state.client.check_agent_health)
    if as_json:
        emit_json(checked.raw)
        return
    click.echo(f"{checked.agent_id}: {checked.status}")


@agents.command("delete")
@click.argument("agent")
@json_option
@pass_state
def agents_delete(state: State, agent: str, as_json: bool) -> None:
    """Delete your agent (by agentId or UUID): it gets no new stage once this returns."""
    deleted = on_agent(state.client, agent, state.client.delete_agent)
    if as_json:
        emit_json(deleted)
        return
    click.echo(f"Deleted {agent}.")


# ---------------------------------------------------------------------------- runs


def watch(state: State, run_id: str, as_json: bool) -> NoReturn:
    """Show the run's stages live (on stderr) until it ends, then its result or the stage it
    failed at; exit 0 when it completed, 1 otherwise."""
    err = render.console(stderr=True)
    view = render.LiveRun(run_id)
    # Off a terminal the live view would only print its last frame: with --json that would
    # be noise on stderr, without it that frame is the summary.
    live = err.is_terminal or not as_json

    def update(run: Run) -> None:
        view.run = run

    def reconnecting(error: MaofError, delay: float) -> None:
        # Printed above the live view, which goes on showing the last stages seen.
        err.print(
            f"Reconnecting in {delay:g} s… ({shown(error.message)})",
            markup=False,
            highlight=False,
        )

    try:
        if live:
            with Live(
                view,
                console=err,
                refresh_per_second=8,
                redirect_stdout=False,
                redirect_stderr=False,
            ):
                run = state.client.wait_for_run(
                    run_id, on_update=update, on_retry=reconnecting, max_interval=1.0
                )
            if not err.is_terminal:
                err.line()  # Live ends its last frame with a newline only on a terminal
        else:
            run = state.client.wait_for_run(run_id, on_retry=reconnecting, max_interval=1.0)
    except KeyboardInterrupt:
        click.echo(
            f"\nStopped watching {run_id}; it goes on: `maof status {run_id} --watch`", err=True
        )
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        emit_json(run.raw)
    elif run.status == "completed":
        click.echo(f"Run {run_id} completed. Result:", err=True)
        emit_json(state.client.get_result(run_id).output)
    if run.status != "completed":
        click.echo(render.failure_summary(run), err=True)
        raise click.exceptions.Exit(EXIT_FAILED)
    raise click.exceptions.Exit(0)


@cli.command("run")
@click.argument(
    "workflow_file", metavar="WORKFLOW.yaml|json", type=click.Path(dir_okay=False, path_type=Path)
)
@click.option(
    "--input",
    "input_value",
    metavar="FILE|JSON",
    help="The workflow input: a JSON or YAML file, inline JSON, or - (JSON on stdin). "
    "Replaces an input given in the file.",
)
@click.option("--watch", "watching", is_flag=True, help="Show the stages live until it ends.")
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Sent as Idempotency-Key (default: a new UUID): the same key and body never make "
    "a second run.",
)
@json_option
@pass_state
@file_errors_are_usage_errors
def run_workflow(
    state: State,
    workflow_file: Path,
    input_value: str | None,
    watching: bool,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Submit a workflow from a YAML or JSON file.

    The file holds either a workflow, {name, stages, timeoutMs?}, or a whole request
    body as POST /workflows/execute takes it, {workflow, input?, callback?}. Without
    --watch it prints the run's id (with --json, the API's answer). With --watch it shows
    each stage's status, agent and time until the run ends, then prints the result (exit
    0), or names the stage that failed (exit 1; a cancelled run exits 1 too).
    """
    body = read_execute_body(workflow_file)
    if input_value is not None:
        body["input"] = read_input(input_value, _stdin_if(input_value == "-"))
    submitted = state.client.execute(
        body["workflow"],
        body.get("input"),
        callback=body.get("callback"),
        idempotency_key=idempotency_key or new_idempotency_key(),
    )
    if watching:
        watch(state, submitted.workflow_run_id, as_json)
    if as_json:
        emit_json(submitted.raw)
        return
    click.echo(submitted.workflow_run_id)
    click.echo(f"Watch it: maof status {submitted.workflow_run_id} --watch", err=True)


def _stdin_if(wanted: bool) -> str | None:
    try:
        return sys.stdin.read() if wanted else None
    except UnicodeDecodeError:
        raise WorkflowFileError("--input -: standard input is not UTF-8 text") from None


@cli.command("runs")
@click.option(
    "--status",
    type=click.Choice(["queued", "in_progress", "completed", "failed", "cancelled"]),
    help="Only runs with this status.",
)
@click.option("--page", type=click.IntRange(min=1), default=None)
@click.option("--limit", type=click.IntRange(1, 100), default=None)
@json_option
@pass_state
def list_runs(
    state: State, status: str | None, page: int | None, limit: int | None, as_json: bool
) -> None:
    """Your runs, newest first."""
    listed = state.client.list_runs(status=status, page=page, limit=limit)
    if as_json:
        emit_json(listed.raw)
        return
    show(render.runs_table(listed))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--watch", "watching", is_flag=True, help="Follow it until it ends (exit as run).")
@json_option
@pass_state
def status(state: State, run_id: str, watching: bool, as_json: bool) -> None:
    """A run's status and its stages."""
    if watching:
        watch(state, run_id, as_json)
    run = state.client.get_run(run_id)
    if as_json:
        emit_json(run.raw)
        return
    show(render.run_view(run))


@cli.command()
@click.argument("run_id", metavar="RUN")
@json_option
@pass_state
def result(state: State, run_id: str, as_json: bool) -> None:
    """A completed run's output (an error while it has none)."""
    answer = state.client.get_result(run_id)
    emit_json(answer.raw if as_json else answer.output)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option(
    "--verify",
    is_flag=True,
    help="Exit 1 unless the hash chain holds (as the API verifies it).",
)
@click.option(
    "--allow-legacy",
    is_flag=True,
    help="With --verify: accept unsigned entries from before signing began (as "
    "maof-verify --allow-legacy does; refused by default: no key signed them).",
)
@json_option
@pass_state
def audit(state: State, run_id: str, verify: bool, allow_legacy: bool, as_json: bool) -> None:
    """A run's audit trail and its hash chain."""
    trail = state.client.get_audit(run_id)
    if as_json:
        emit_json(trail.raw)
    else:
        show(render.audit_table(trail))
        show(render.chain_line(trail))
    if verify:
        # Checked here, as maof-verify does offline: every hash, signature and stored
        # output of the exported bundle, and the checkpoint's inclusion proof if any;
        # entries from before signing (version 1) only if asked, as maof-verify takes them.
        from chalicelib.audit.verify import verify_bundle

        report = verify_bundle(state.client.export_audit(run_id), allow_legacy=allow_legacy)
        if not as_json:
            if report.valid:
                click.echo(
                    f"Verified here: {report.length} entries, {report.signed} signed, "
                    f"{report.outputs_checked} outputs, {len(report.checkpoints)} checkpoint(s).",
                    err=True,
                )
            for problem in report.problems:
                where = f"entry {problem.seq}: " if problem.seq is not None else ""
                click.echo(f"NOT VERIFIED: {where}{problem.reason}", err=True)
        if not report.valid or not trail.chain.valid:
            raise click.exceptions.Exit(EXIT_FAILED)


@cli.command()
@click.argument("run_id", metavar="RUN")
@json_option
@pass_state
def cancel(state: State, run_id: str, as_json: bool) -> None:
    """Cancel a queued or running run."""
    answer = state.client.cancel_run(run_id)
    if as_json:
        emit_json(answer.raw)
        return
    click.echo(f"Cancelled {run_id} ({len(answer.stages_cancelled or [])} stage(s) not started).")


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--watch", "watching", is_flag=True, help="Follow it until it ends (exit as run).")
@json_option
@pass_state
def retry(state: State, run_id: str, watching: bool, as_json: bool) -> None:
    """Run a failed or cancelled run again from where it stopped (same run id)."""
    answer = state.client.retry_run(run_id)
    if watching:
        watch(state, run_id, as_json)
    if as_json:
        emit_json(answer.raw)
        return
    requeued = ", ".join(answer.stages_requeued or []) or "none yet"
    click.echo(f"Retrying {run_id}: {answer.status} (queued again: {requeued}).")


if __name__ == "__main__":
    main()
