"""`pkvm map [SCENARIO]`: the physical-memory ownership map, as PNG and/or HTML.

What only this command needs is imported inside it (start-up speed: see `pkvm.cli.common`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from pkvm.cli.common import (
    ABI_HELP,
    check_count,
    check_output,
    console,
    fail,
    load_scenario,
    new_machine,
    note,
)


def _suffixed(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def _draw(m: Any, png: Path | None, html: Path | None, title: str) -> None:
    from pkvm.viz import ownership_map, render_html, render_png

    om = ownership_map(m)
    if png:
        render_png(om, str(png), title)
        console.print(escape(f"{png}: PNG, {om.rows} rows of {om.cols} cells"
                             + (f", 1 cell = {om.agg} pages" if om.agg > 1 else "")), soft_wrap=True)
    if html:
        render_html(om, str(html), title)
        console.print(escape(f"{html}: HTML (zoom and hover in a browser)"), soft_wrap=True)


def map_(
    scenario: Annotated[Path | None, typer.Argument(
        help="Scenario to run first; without one, a freshly booted machine is drawn.")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Write the map as a PNG.")] = None,
    html: Annotated[Path | None, typer.Option(
        "--html", help="Write the map as a self-contained HTML page.")] = None,
    before: Annotated[bool, typer.Option(
        "--before", help="Also draw the machine before the scenario, as NAME.before.png / "
        "NAME.before.html.")] = False,
    abi: Annotated[str | None, typer.Option("--abi", help=ABI_HELP)] = None,
    memory: Annotated[str | None, typer.Option(
        help="RAM size when no scenario is given (default 256M).")] = None,
    cpus: Annotated[int | None, typer.Option(
        help="CPUs when no scenario is given (default 2).")] = None,
    at: Annotated[int | None, typer.Option(
        "--at", help="Draw the machine after step N of the scenario (1 = after the first "
        "step) instead of after the last.")] = None,
    step_through: Annotated[bool, typer.Option(
        "--step-through", help="HTML: one frame per step (the machine before the first step "
        "and after each), with a slider.")] = False,
) -> None:
    """Draw who owns each RAM page (host, hyp, each guest; shared or not) after a scenario.

    The hyp carve-out is outlined and host stage-2 block mappings are framed. Exit code 0 when
    the pictures were written, 1 when the hyp panicked before the map could be drawn, 2 for a
    usage or scenario error.
    """
    from pkvm.scenario import Scenario, ScenarioError

    if not png and not html:
        fail("say where to draw: --png FILE and/or --html FILE")
    check_output("--png", png)
    check_output("--html", html)
    if at is not None and scenario is None:
        fail(f"--at {at}: needs a SCENARIO to step through")
    check_count("--at", at)
    if step_through and (scenario is None or not html):
        fail("--step-through: needs a SCENARIO and --html FILE")
    scn = load_scenario(scenario) if scenario else None
    if scn is not None and at is not None:
        if at > len(scn.steps):
            fail(f"--at {at}: {scenario} has {len(scn.steps)} steps")
        scn = Scenario(scn.machine, scn.steps[:at], scn.path)
    m = new_machine(scn, memory, cpus, abi)
    name = scenario.name if scenario else "fresh machine"
    when = f"after step {at}" if at is not None else "after"
    if scn is not None and before:
        _draw(m, _suffixed(png, "before") if png else None,
              _suffixed(html, "before") if html else None, f"{name}: before ({m.abi})")
    frames: list[tuple[str, Any]] = []
    if scn is not None and step_through:
        from pkvm.viz import ownership_map

        frames.append((f"{name}: before step 1 ({m.abi})", ownership_map(m)))

        def frame(res: Any) -> None:
            if not m.dead:
                frames.append((f"{name}: after step {res.index + 1}, {res.step.describe()} "
                               f"→ {res.outcome}", ownership_map(m)))
    if scn is not None:
        try:
            result = scn.run(m, on_step=frame if frames else None)
        except ScenarioError as e:
            fail(str(e))
        if result.failures:
            note(f"note: {len(result.failures)} expectation(s) failed; "
                 f"`pkvm run {scenario}` shows them")
    if m.dead:
        fail(f"the hyp panicked ({m.dead}): nothing to draw", 1)
    if frames:
        from pkvm.viz import render_html_frames

        render_html_frames(frames, str(html))
        console.print(escape(f"{html}: HTML, {len(frames)} frames (a slider steps through "
                             "the scenario)"), soft_wrap=True)
        html = None
    _draw(m, png, html, f"{name}: {when if scn else 'after boot'} ({m.abi})")


def register(app: typer.Typer) -> None:
    app.command("map", short_help="Draw who owns each RAM page (PNG, HTML).")(map_)
