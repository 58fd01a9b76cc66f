"""How the CLI shows runs, stages, agents and audit trails to a person (rich tables)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from maof_client.models import AgentPage, AuditTrail, Run, RunPage, RunSummary, Stage, shown

STATUS_STYLES = {
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
    "skipped": "dim",
    "in_progress": "yellow",
    "queued": "cyan",
    "pending": "dim",
    "online": "green",
    "degraded": "yellow",
    "offline": "red",
}


def console(*, stderr: bool = False) -> Console:
    """A console on the current stdout/stderr; wide enough off a terminal not to cut ids."""
    probe = Console(stderr=stderr)
    return Console(stderr=stderr, width=None if probe.is_terminal else 160)


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def seconds(milliseconds: float | None) -> str:
    if milliseconds is None:
        return ""
    value = milliseconds / 1000
    if value < 60:
        return f"{value:.2f} s"
    minutes, rest = divmod(int(value), 60)
    return f"{minutes} min {rest:02d} s"


def local_time(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _elapsed_ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None:
        return None
    finish = end or datetime.now(UTC)
    return max(0.0, (finish - start).total_seconds() * 1000)


def stage_time(stage: Stage) -> str:
    if stage.duration_ms is not None:
        return seconds(stage.duration_ms)
    if stage.status == "in_progress":
        return seconds(_elapsed_ms(stage.started_at, None))
    return ""


def run_heading(run: RunSummary) -> Text:
    heading = Text()
    heading.append(run.workflow_run_id, style="bold")
    heading.append(f"  {run.workflow_name}  ")
    heading.append_text(status_text(run.status))
    progress = run.progress
    heading.append(f"  {progress.completed}/{progress.total} stages")
    elapsed = _elapsed_ms(run.started_at or run.created_at, run.completed_at)
    if elapsed is not None:
        heading.append(f"  {seconds(elapsed)}")
    return heading


STARTED = ("in_progress", "completed", "failed")


def stages_table(run: Run, *, live: bool = False) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("STAGE", "CAPABILITY", "STATUS", "AGENT", "TRY", "TIME"):
        table.add_column(name, no_wrap=name != "CAPABILITY")
    for stage in run.stages:
        status: RenderableType = status_text(stage.status)
        if live and stage.status == "in_progress":
            status = Spinner("dots", text=status_text(stage.status))
        table.add_row(
            stage.stage_id,
            stage.agent_capability,
            status,
            stage.agent_id or "",
            str(stage.attempt) if stage.attempt and stage.status in STARTED else "",
            stage_time(stage),
        )
    return table


def run_view(run: Run, *, live: bool = False, errors: bool = True) -> RenderableType:
    parts: list[RenderableType] = [run_heading(run), stages_table(run, live=live)]
    if errors and run.error_message:
        parts.append(Text(run.error_message, style="red"))
    return Group(*parts)


class LiveRun:
    """The renderable a rich Live shows while a run is watched: rebuilt at every refresh,
    so the time of a stage in progress ticks between polls."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.run: Run | None = None

    def __rich__(self) -> RenderableType:
        if self.run is None:
            return Spinner("dots", text=f"{self.run_id}: waiting for the first status")
        # The failure is said once, after the view (failure_summary).
        return run_view(self.run, live=not self.run.ended, errors=False)


def failure_summary(run: Run) -> str:
    """One line naming the stage a run failed at, and why."""
    what = f"Run {run.workflow_run_id}"
    if run.status == "cancelled":
        return f"{what} was cancelled" + (f": {run.error_message}" if run.error_message else "")
    failed = run.failed_stages
    if failed:
        stage = failed[0]
        reason = stage.error_message or run.error_message or "failed"
        return f"{what} failed at stage '{stage.stage_id}' ({stage.name}): {reason}"
    return f"{what} {run.status}" + (f": {run.error_message}" if run.error_message else "")


def runs_table(page: RunPage) -> RenderableType:
    """One line per run; `maof status RUN` shows a failed run's error."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    # Ids, statuses and times stay whole; a narrow terminal cuts the workflow names (last).
    table.add_column("RUN", no_wrap=True, min_width=40)
    table.add_column("STATUS", no_wrap=True, min_width=11)
    table.add_column("STAGES", no_wrap=True, min_width=6)
    table.add_column("CREATED", no_wrap=True, min_width=19)
    table.add_column("WORKFLOW", no_wrap=True, overflow="ellipsis")
    for run in page.runs:
        table.add_row(
            run.workflow_run_id,
            status_text(run.status),
            f"{run.progress.completed}/{run.progress.total}",
            local_time(run.created_at),
            run.workflow_name,
        )
    return Group(table, _page_line(page.meta.page, page.meta.pages, page.meta.total, "runs"))


def agents_table(page: AgentPage) -> RenderableType:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("AGENT ID", "STATUS", "CAPABILITIES", "MAX", "VISIBILITY", "AGENT UUID"):
        table.add_column(name, no_wrap=name not in ("CAPABILITIES",))
    for agent in page.agents:
        table.add_row(
            agent.agent_id,
            status_text(agent.status),
            ", ".join(agent.capabilities),
            str(agent.max_concurrent_tasks),
            agent.visibility,
            agent.agent_uuid,
        )
    return Group(table, _page_line(page.meta.page, page.meta.pages, page.meta.total, "agents"))


def _page_line(page: int, pages: int, total: int, what: str) -> Text:
    return Text(f"page {page} of {max(pages, 1)}, {total} {what}", style="dim")


def agent_fields(raw: dict[str, Any]) -> Table:
    """Every field the API answered for an agent, keys and values as `shown()` makes them
    fit for a terminal (the API's data is the agent owner's words, or a server's)."""
    table = Table.grid(padding=(0, 2))
    for key, value in raw.items():
        if isinstance(value, list):
            value = ", ".join(str(item) for item in value)
        table.add_row(Text(shown(key), style="bold"), Text("" if value is None else shown(value)))
    return table


def audit_table(trail: AuditTrail) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("SEQ", "ACTION", "STAGE", "AGENT", "STATUS", "LOGGED AT", "ENTRY HASH"):
        table.add_column(name, no_wrap=True)
    for entry in trail.logs:
        table.add_row(
            str(entry.seq),
            entry.action,
            entry.stage_id or "",
            entry.agent_id or "",
            entry.status or "",
            local_time(entry.logged_at),
            entry.entry_hash[:16],
        )
    return table


def chain_line(trail: AuditTrail) -> Text:
    chain = trail.chain
    if chain.valid:
        return Text(f"chain valid: {chain.length} entries, head {chain.head}", style="green")
    return Text(
        f"chain BROKEN at seq {chain.broken_at_seq} of {chain.length} entries", style="bold red"
    )
