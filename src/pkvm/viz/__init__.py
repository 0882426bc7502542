"""Pictures of a machine: the physical-memory ownership map (PNG and self-contained HTML)."""

from pkvm.viz.ownership import (
           OwnershipMap,
           ownership_map,
           pixel_of_pfn,
           render_html,
           render_html_frames,
           render_png,
)

__all__ = ["OwnershipMap", "ownership_map", "pixel_of_pfn", "render_html", "render_html_frames",
           "render_png"]
