"""The physical-memory ownership map: every RAM page a cell coloured by owner and state.

`ownership_map(m)` reads the machine's page states in bulk (`m.inspect.page_states()`) and
classifies each page; `render_png` / `render_html` draw it with a legend. The hyp carve-out is
outlined, and each block mapping of the host stage-2 is framed. Big machines are aggregated: one
cell per `agg` pages, coloured by the majority, which the legend says. MMIO is not drawn.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pkvm.hyp.memory import PageState

PAGE_SHIFT = 12
COLS = 256  # cells per row
MAX_CELLS = COLS * 512

OWNED, SHARED_OWNED, SHARED_BORROWED, NOPAGE, POISON = (
    PageState.OWNED, PageState.SHARED_OWNED, PageState.SHARED_BORROWED, PageState.NOPAGE,
    PageState.POISON)

# Fixed categories; guests get two each (owned, shared with the host) after these.
HOST_OWNED, HOST_SHARED_HYP, HOST_SHARED_GUEST, HYP_OWNED, HYP_SHARED_HOST, NO_OWNER, \
    POISONED = range(7)
FIXED: list[tuple[str, str]] = [
    ("host: owned", "#cfd8e3"),
    ("host: shared with the hyp", "#f2b134"),
    ("host: shared with a guest", "#7cc26b"),
    ("hyp: owned", "#c0392b"),
    ("hyp: shared with the host", "#e8835a"),
    ("no owner (in transition)", "#3a3a3a"),
    ("poisoned", "#8e44ad"),
]
GUEST_COLOURS = ["#2e86de", "#16a085", "#6c5ce7", "#00b5c8", "#1e3799", "#38ada9", "#8854d0",
                 "#0a3d62"]
# host pages shared with guest N (the first is the fixed "shared with a guest" green)
SHARED_WITH_GUEST_COLOURS = ["#7cc26b", "#b5d334", "#4caf50", "#9ccc65", "#cddc39", "#66bb6a"]
CARVEOUT_OUTLINE = "#000000"
BLOCK_FRAME = "#4a4a4a"


@dataclass
class OwnershipMap:
    """Cells of `agg` pages each, from `base_pfn`, `cols` per row; `cells[i]` a category."""

    abi: str
    base_pfn: int
    nr_pages: int
    agg: int
    cols: int
    cells: bytes
    categories: list[tuple[str, str]]  # (label, colour)
    counts: dict[int, int]  # category -> pages (exact, before aggregation)
    carveout: tuple[int, int]  # first cell, end cell (exclusive)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # block leaves, cell ranges
    host: bytes = b""  # per-page states, kept only when agg == 1 (for the HTML hover)
    hyp: bytes = b""
    guests: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return (len(self.cells) + self.cols - 1) // self.cols

    def cell_of(self, pfn: int) -> int:
        return (pfn - self.base_pfn) // self.agg

    def category_of(self, pfn: int) -> str:
        return self.categories[self.cells[self.cell_of(pfn)]][0]


def _classify(host: int, hyp: int) -> int:
    if host == OWNED:
        return HOST_OWNED
    if host == SHARED_OWNED:
        return HOST_SHARED_HYP if hyp == SHARED_BORROWED else HOST_SHARED_GUEST
    if hyp == OWNED:
        return HYP_OWNED
    if hyp == SHARED_OWNED or host == SHARED_BORROWED:
        return HYP_SHARED_HOST
    if POISON in (host, hyp):
        return POISONED
    return NO_OWNER


def ownership_map(m: Any, cols: int = COLS, max_cells: int = MAX_CELLS) -> OwnershipMap:
    host, hyp, guests = m.inspect.page_states()
    n = len(host)
    base_pfn = m.mem.base >> PAGE_SHIFT
    table = bytes(_classify(h, y) for h in range(8) for y in range(8))
    pages = bytearray(table[(h << 3) | y] for h, y in zip(host, hyp))
    cats = list(FIXED)
    guest_cat: dict[tuple[int, int], int] = {}
    guest_idx: dict[int, int] = {}
    for pfn, (handle, state) in sorted(guests.items()):
        i = pfn - base_pfn
        if not 0 <= i < n:
            continue
        if state == SHARED_BORROWED:
            # the host's page, shared with this guest: named after the guest it is shared with
            if pages[i] != HOST_SHARED_GUEST:
                continue
            key = (handle, 2)
        else:
            key = (handle, 0 if state == OWNED else 1)
        if key not in guest_cat:
            idx = guest_idx.setdefault(handle, len(guest_idx))
            colour = GUEST_COLOURS[idx % len(GUEST_COLOURS)]
            guest_cat[key] = len(cats)
            if key[1] == 2:
                cats.append((f"host: shared with guest {handle:#x}",
                             SHARED_WITH_GUEST_COLOURS[idx % len(SHARED_WITH_GUEST_COLOURS)]))
            else:
                label = f"guest {handle:#x}: " + ("owned" if key[1] == 0
                                                   else "shared with the host")
                cats.append((label, colour if key[1] == 0 else _lighten(colour)))
        pages[i] = guest_cat[key]
    counts = dict(Counter(pages))
    agg = 1
    while n // agg > max_cells:
        agg *= 2
    cells = bytes(pages) if agg == 1 else _aggregate(pages, agg)
    cb, cs = m.carveout
    carve = ((cb >> PAGE_SHIFT) - base_pfn) // agg, -(-((cb + cs >> PAGE_SHIFT) - base_pfn) // agg)
    blocks = []
    for leaf in m.inspect.walk("host"):
        if leaf["valid"] and leaf["level"] < 3:
            first = (leaf["addr"] >> PAGE_SHIFT) - base_pfn
            npages = leaf["size"] >> PAGE_SHIFT
            if 0 <= first < n:
                blocks.append((first // agg, -(-(first + npages) // agg)))
    return OwnershipMap(m.abi, base_pfn, n, agg, cols, cells, cats, counts, carve, blocks,
                        host if agg == 1 else b"", hyp if agg == 1 else b"",
                        guests if agg == 1 else {})


def _aggregate(pages: bytearray, agg: int) -> bytes:
    out = bytearray()
    for i in range(0, len(pages), agg):
        group = pages[i : i + agg]
        first = group[0]
        if group.count(first) == len(group):
            out.append(first)
        else:
            out.append(Counter(group).most_common(1)[0][0])
    return bytes(out)


def _lighten(colour: str, f: float = 0.55) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(c + (255 - c) * f):02x}" for c in (r, g, b))


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def legend_lines(om: OwnershipMap) -> list[tuple[str | None, str]]:
    """(colour or None, text) lines of the legend."""
    lines: list[tuple[str | None, str]] = []
    for i, (label, colour) in enumerate(om.categories):
        if om.counts.get(i) or i in (HOST_OWNED, HYP_OWNED):
            n = om.counts.get(i, 0)
            lines.append((colour, f"{label} ({n} page{'' if n == 1 else 's'})"))
    lines.append((None, ""))
    lines.append((None, "thick black outline: hyp carve-out"))
    lines.append((None, "thin grey frame: host stage-2 block mapping"))
    lines.append((None, "MMIO (below 0x40000000) not drawn"))
    if om.agg > 1:
        lines.append((None, f"aggregated: 1 cell = {om.agg} pages,"))
        lines.append((None, "coloured by the majority owner/state"))
    else:
        lines.append((None, "1 cell = 1 page (4 KiB)"))
    return lines


# -- PNG ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PngLayout:
    cell: int
    left: int
    top: int

    def xy(self, om: OwnershipMap, cell_index: int) -> tuple[int, int]:
        """Top-left pixel of a cell."""
        r, c = divmod(cell_index, om.cols)
        return self.left + c * self.cell, self.top + r * self.cell


def png_layout(om: OwnershipMap) -> PngLayout:
    cell = 4 if om.rows <= 128 else 3 if om.rows <= 256 else 2
    return PngLayout(cell, 80, 34)


def pixel_of_pfn(om: OwnershipMap, pfn: int) -> tuple[int, int]:
    """A pixel inside the cell of `pfn` in the PNG (away from outlines)."""
    lay = png_layout(om)
    x, y = lay.xy(om, om.cell_of(pfn))
    return x + lay.cell // 2, y + lay.cell // 2


def render_png(om: OwnershipMap, path: str, title: str = "") -> None:
    # Pillow is imported when a PNG is drawn: `pkvm` imports this module for every command.
    from PIL import Image, ImageDraw, ImageFont

    lay = png_layout(om)
    font: Any
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    legend = legend_lines(om)
    grid_w, grid_h = om.cols * lay.cell, om.rows * lay.cell
    width = lay.left + grid_w + 20 + 320
    height = max(lay.top + grid_h + 20, lay.top + 18 * len(legend) + 20)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((lay.left, 8), title or f"pkvm ({om.abi}): physical memory ownership, "
           f"pfn {om.base_pfn:#x}..{om.base_pfn + om.nr_pages - 1:#x}", fill="black", font=font)
    cs = lay.cell
    grid = Image.new("P", (om.cols, om.rows), 0)
    grid.putpalette([v for _, c in om.categories for v in _rgb(c)] + [255, 255, 255])
    blank = len(om.categories)  # the tail of the last row is white
    grid.putdata(list(om.cells) + [blank] * (om.cols * om.rows - len(om.cells)))
    img.paste(grid.resize((grid_w, grid_h), Image.Resampling.NEAREST).convert("RGB"), (lay.left, lay.top))
    label_every = max(1, 24 // cs)
    for r in range(0, om.rows, label_every):
        pfn = om.base_pfn + r * om.cols * om.agg
        d.text((4, lay.top + r * cs - 2), f"{pfn:#x}", fill="#555555", font=font)
    for a, b in om.blocks:
        _outline(d, om, lay, a, b, BLOCK_FRAME, 1)
    _outline(d, om, lay, *om.carveout, CARVEOUT_OUTLINE, 2)
    lx, ly = lay.left + grid_w + 20, lay.top
    for colour, text in legend:
        if colour is not None:
            d.rectangle([lx, ly + 2, lx + 11, ly + 13], fill=colour, outline="black")
        d.text((lx + 18, ly), text, fill="black", font=font)
        ly += 18
    img.save(path)


def _outline(d: Any, om: OwnershipMap, lay: PngLayout, a: int, b: int, colour: str,
             width: int) -> None:
    """Frame the cells [a, b) from outside: at most three rectangles (partial, full rows,
    partial), so that the cells themselves keep their colour."""
    if b <= a:
        return
    cols, cs = om.cols, lay.cell
    parts = []
    ra, ca = divmod(a, cols)
    rb, cb = divmod(b, cols)
    if ra == rb:
        parts.append((ra, ca, ra + 1, cb))
    else:
        if ca:
            parts.append((ra, ca, ra + 1, cols))
            ra += 1
        if rb > ra:
            parts.append((ra, 0, rb, cols))
        if cb:
            parts.append((rb, 0, rb + 1, cb))
    for r0, c0, r1, c1 in parts:
        d.rectangle([lay.left + c0 * cs - width, lay.top + r0 * cs - width,  # just outside
                     lay.left + c1 * cs + width - 1, lay.top + r1 * cs + width - 1],
                    outline=colour, width=width)


# -- HTML --------------------------------------------------------------------------------------
def _html_data(om: OwnershipMap, title: str) -> dict[str, Any]:
    return {
        "abi": om.abi, "base_pfn": om.base_pfn, "nr_pages": om.nr_pages, "agg": om.agg,
        "cols": om.cols, "cells": base64.b64encode(om.cells).decode(),
        "host": base64.b64encode(om.host).decode(), "hyp": base64.b64encode(om.hyp).decode(),
        "guests": {str(k): list(v) for k, v in om.guests.items()},
        "states": [s.name for s in PageState],
        "categories": [{"label": lab, "colour": c} for lab, c in om.categories],
        "carveout": list(om.carveout), "blocks": [list(b) for b in om.blocks],
        "legend": [[c, t] for c, t in legend_lines(om)],
        "title": title or f"pkvm ({om.abi}): physical memory ownership",
    }


def render_html(om: OwnershipMap, path: str, title: str = "") -> None:
    render_html_frames([(title, om)], path)


def render_html_frames(frames: list[tuple[str, OwnershipMap]], path: str) -> None:
    """One page; with several (title, map) frames (the machine after each step of a scenario)
    a slider steps through them."""
    data = [_html_data(om, title) for title, om in frames]
    html = HTML_TEMPLATE.replace("/*DATA*/null", json.dumps(data[0]))
    html = html.replace("/*FRAMES*/null", json.dumps(data) if len(data) > 1 else "null")
    with open(path, "w") as f:
        f.write(html)


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pkvm ownership map</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; }
#wrap { display: flex; gap: 24px; align-items: flex-start; }
#scroll { overflow: auto; max-width: 75vw; max-height: 85vh; border: 1px solid #ccc; }
canvas { image-rendering: pixelated; display: block; }
#tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #888;
       padding: 4px 6px; font: 12px monospace; display: none; white-space: pre; }
.sw { display: inline-block; width: 12px; height: 12px; border: 1px solid #000;
      margin-right: 6px; vertical-align: -2px; }
</style></head><body>
<h3 id="title"></h3>
<div>rows are labelled with their first pfn; zoom: <button id="zout">−</button>
 <span id="zl"></span> <button id="zin">+</button>
 <span style="color:#666">(mouse wheel with Ctrl zooms too; hover a cell for its page)</span></div>
<div id="stepper" style="display:none; margin: 6px 0">step: <input type="range" id="step" min="0"
 value="0"> <span id="stepname"></span> (arrow keys step too)</div>
<div id="wrap"><div id="scroll"><canvas id="c"></canvas></div><div id="legend"></div></div>
<div id="tip"></div>
<script>
let D = /*DATA*/null;
const FRAMES = /*FRAMES*/null;
const b64 = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
let cells = b64(D.cells), host = b64(D.host), hyp = b64(D.hyp);
const rows = Math.ceil(cells.length / D.cols);
let z = rows > 256 ? 2 : 4;
const L = 72;  // left margin (px) for the pfn axis
const cv = document.getElementById("c"), ctx = cv.getContext("2d");
function title() {
  document.getElementById("title").textContent = D.title + " — pfn 0x"
    + D.base_pfn.toString(16) + "..0x" + (D.base_pfn + D.nr_pages - 1).toString(16);
}
title();
function outline(a, b, colour, w) {
  ctx.strokeStyle = colour; ctx.lineWidth = w;
  const parts = []; let ra = Math.floor(a / D.cols), ca = a % D.cols;
  const rb = Math.floor(b / D.cols), cb = b % D.cols;
  if (ra === rb) parts.push([ra, ca, ra + 1, cb]);
  else { if (ca) { parts.push([ra, ca, ra + 1, D.cols]); ra++; }
         if (rb > ra) parts.push([ra, 0, rb, D.cols]); if (cb) parts.push([rb, 0, rb + 1, cb]); }
  for (const [r0, c0, r1, c1] of parts)
    ctx.strokeRect(L + c0 * z + w / 2, r0 * z + w / 2, (c1 - c0) * z - w, (r1 - r0) * z - w);
}
function draw() {
  cv.width = L + D.cols * z; cv.height = rows * z + 8;
  document.getElementById("zl").textContent = z + " px/cell";
  for (let i = 0; i < cells.length; i++) {
    ctx.fillStyle = D.categories[cells[i]].colour;
    ctx.fillRect(L + (i % D.cols) * z, Math.floor(i / D.cols) * z, z, z);
  }
  // the pfn axis: the first pfn of every few rows, in the left margin
  ctx.fillStyle = "#555"; ctx.font = "11px monospace"; ctx.textBaseline = "top";
  const every = Math.max(1, Math.ceil(16 / z));
  for (let r = 0; r < rows; r += every)
    ctx.fillText("0x" + (D.base_pfn + r * D.cols * D.agg).toString(16), 2, r * z);
  for (const [a, b] of D.blocks) outline(a, b, "#4a4a4a", 1);
  outline(D.carveout[0], D.carveout[1], "#000", 2);
}
const lg = document.getElementById("legend");
function legend() {
  lg.textContent = "";
  for (const [colour, text] of D.legend) {
    const div = document.createElement("div");
    if (colour) { const s = document.createElement("span"); s.className = "sw";
      s.style.background = colour; div.appendChild(s); }
    div.appendChild(document.createTextNode(text || "\\u00a0")); lg.appendChild(div);
  }
}
legend();
function show(i) {  // the machine after step i (frame 0: before the first step)
  D = FRAMES[i]; cells = b64(D.cells); host = b64(D.host); hyp = b64(D.hyp);
  document.getElementById("stepname").textContent = D.title;
  title(); legend(); draw();
}
if (FRAMES) {
  const st = document.getElementById("step");
  document.getElementById("stepper").style.display = "block";
  st.max = FRAMES.length - 1; st.oninput = () => show(+st.value);
  document.addEventListener("keydown", e => {
    const k = {ArrowLeft: -1, ArrowRight: 1}[e.key]; if (!k) return;
    st.value = Math.min(Math.max(+st.value + k, 0), FRAMES.length - 1); show(+st.value);
  });
  document.getElementById("stepname").textContent = D.title;
}
const tip = document.getElementById("tip");
cv.addEventListener("mousemove", e => {
  const r = cv.getBoundingClientRect();
  const c = Math.floor((e.clientX - r.left - L) / z), rw = Math.floor((e.clientY - r.top) / z);
  const i = rw * D.cols + c;
  if (c < 0 || c >= D.cols || i >= cells.length) { tip.style.display = "none"; return; }
  const pfn = D.base_pfn + i * D.agg;
  let t = D.agg > 1 ? "pfn 0x" + pfn.toString(16) + "..0x" + (pfn + D.agg - 1).toString(16)
                     + " (" + D.agg + " pages, majority)" : "pfn 0x" + pfn.toString(16)
                     + "  PA 0x" + (pfn * 4096).toString(16);
  t += "\\n" + D.categories[cells[i]].label;
  if (D.agg === 1 && host.length) {
    t += "\\nhost " + D.states[host[i]] + ", hyp " + D.states[hyp[i]];
    const g = D.guests[String(pfn)];
    if (g) t += ", guest 0x" + g[0].toString(16) + " " + D.states[g[1]];
  }
  if (i >= D.carveout[0] && i < D.carveout[1]) t += "\\n(in the hyp carve-out)";
  tip.textContent = t; tip.style.display = "block";
  tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px";
});
cv.addEventListener("mouseleave", () => tip.style.display = "none");
document.getElementById("zin").onclick = () => { z = Math.min(z * 2, 32); draw(); };
document.getElementById("zout").onclick = () => { z = Math.max(z / 2, 1); draw(); };
cv.addEventListener("wheel", e => { if (!e.ctrlKey) return; e.preventDefault();
  z = e.deltaY < 0 ? Math.min(z * 2, 32) : Math.max(z / 2, 1); draw(); });
draw();
</script></body></html>
"""
