"""The ownership map: classification, PNG pixels, HTML content, aggregation, Perfetto export."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

import pkvm
from pkvm.trace_export import PageCountSampler, trace_events
from pkvm.viz import ownership_map, pixel_of_pfn, render_html, render_png
from pkvm.viz.ownership import FIXED, HOST_OWNED, HOST_SHARED_GUEST, HOST_SHARED_HYP, HYP_OWNED


def om_cell(om):
    from pkvm.viz.ownership import png_layout

    return png_layout(om).cell


def _rgb(colour):
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


@pytest.fixture
def busy():
    m = pkvm.Machine(memory="256M", cpus=2)
    shared = m.host.alloc_pages(1) >> 12
    assert m.hvc(0, "__pkvm_host_share_hyp", shared).ok
    pvm = m.host.create_vm(vcpus=1, protected=True, memory="16M")
    pvm.map(0x40000, 4)
    nvm = m.host.create_vm(vcpus=1, protected=False, memory="16M")
    nvm.map(0x40000, 4)
    return m, shared, pvm, nvm


def test_page_states_agree_with_page(busy):
    m, shared, pvm, nvm = busy
    host, hyp, guests = m.inspect.page_states()
    base = m.mem.base >> 12
    for pfn in (shared, base, m.carveout[0] >> 12, pvm.memslot[0x40000] >> 12,
                nvm.memslot[0x40001] >> 12):
        info = m.inspect.page(pfn)
        assert (pkvm.inspect.PageState(host[pfn - base]).name,
                pkvm.inspect.PageState(hyp[pfn - base]).name) == (info.host, info.hyp)
        assert {h: pkvm.inspect.PageState(s).name for h, s in [guests[pfn]]} == info.guests \
            if pfn in guests else not info.guests


def test_png_pixels(busy, tmp_path):
    m, shared, pvm, nvm = busy
    om = ownership_map(m)
    assert om.agg == 1
    path = tmp_path / "map.png"
    render_png(om, str(path))
    img = Image.open(path).convert("RGB")
    carve = (m.carveout[0] >> 12) + 100
    assert img.getpixel(pixel_of_pfn(om, carve)) == _rgb(FIXED[HYP_OWNED][1])
    assert img.getpixel(pixel_of_pfn(om, shared)) == _rgb(FIXED[HOST_SHARED_HYP][1])
    shared_g = nvm.memslot[0x40000] >> 12  # a host page shared with the normal VM: named so
    assert om.category_of(shared_g) == f"host: shared with guest {nvm.handle:#x}"
    assert img.getpixel(pixel_of_pfn(om, shared_g)) == \
        _rgb(dict(om.categories)[om.category_of(shared_g)])
    assert "host: shared with" in FIXED[HOST_SHARED_GUEST][0]
    free = (m.carveout[0] >> 12) - 5000
    assert img.getpixel(pixel_of_pfn(om, free)) == _rgb(FIXED[HOST_OWNED][1])
    gpix = img.getpixel(pixel_of_pfn(om, pvm.memslot[0x40002] >> 12))
    label = om.category_of(pvm.memslot[0x40002] >> 12)
    assert label == f"guest {pvm.handle:#x}: owned"
    assert gpix == _rgb(dict(om.categories)[label])
    # the carve-out is outlined in black just above its first row
    x, y = pixel_of_pfn(om, m.carveout[0] >> 12)
    assert img.getpixel((x, y - om_cell(om) // 2 - 1)) == (0, 0, 0)


def test_html_is_self_contained(busy, tmp_path):
    m, *_ = busy
    path = tmp_path / "map.html"
    render_html(ownership_map(m), str(path))
    text = path.read_text()
    assert "<canvas" in text and "mousemove" in text and "hyp carve-out" in text
    assert not re.search(r"<script[^>]+src=", text)
    data = json.loads(re.search(r"let D = (\{.*?\});\n", text).group(1))
    assert data["agg"] == 1 and len(data["cells"]) > 1000
    assert any(c["label"].startswith("guest 0x1000") for c in data["categories"])


def test_big_machine_aggregates():
    m = pkvm.Machine(memory="2G", cpus=2)
    om = ownership_map(m, max_cells=256 * 128)
    assert om.agg == 16 and len(om.cells) == (2 << 30 >> 12) // 16
    assert om.category_of((m.carveout[0] >> 12) + 16) == FIXED[HYP_OWNED][0]
    assert om.category_of(m.mem.base >> 12) == FIXED[HOST_OWNED][0]


def test_block_mappings_are_listed():
    m = pkvm.Machine(memory="256M", cpus=2)
    m.host.read(0x4800_0000, 8)  # a host-only 2 MiB region: mapped as one block
    om = ownership_map(m)
    assert om.cell_of(0x48000) in [a for a, _ in om.blocks]


def test_perfetto_events(busy):
    m, *_ = busy
    sampler = PageCountSampler(m)
    vm = m.host.create_vm(vcpus=2, protected=True, memory="16M")
    vm.map(0x40000, 2)
    vm.destroy()
    doc = json.loads(json.dumps(trace_events(m, sampler)))
    ev = doc["traceEvents"]
    xs = [e for e in ev if e["ph"] == "X"]
    assert len(xs) == len(m.trace)
    assert {e["tid"] for e in xs} <= set(range(m.nr_cpus))
    assert any(e["name"] == "__pkvm_host_donate_guest" and e["args"]["result"] == "0"
               for e in xs)
    cs = [e for e in ev if e["ph"] == "C"]
    assert len(cs) >= 3 and all("host" in e["args"] and "hyp" in e["args"] for e in cs)
    assert any(any(k.startswith("guest") for k in e["args"]) for e in cs)
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"cpu0", "cpu1"}


# -- the Perfetto page counters -----------------------------------------------------------------
def test_perfetto_counters_are_disjoint_and_fall_to_zero(busy):
    m, shared, pvm, nvm = busy
    sampler = PageCountSampler(m)
    assert m.hvc(0, "__pkvm_host_unshare_hyp", shared).ok
    pvm.destroy()
    nvm.destroy()
    ev = trace_events(m, sampler)["traceEvents"]
    cs = [e["args"] for e in ev if e["ph"] == "C"]
    series = set(cs[0])
    assert all(set(c) == series for c in cs)  # every sample carries every series
    assert {f"guest {pvm.handle:#x}", "host shared"} <= series  # nvm: host pages, shared
    assert cs[-1][f"guest {pvm.handle:#x}"] == 0  # emitted at 0, not dropped
    assert cs[0]["host shared"] > 0 and cs[-1]["host shared"] == 0
    ram = m.mem.size >> 12
    for c in cs:  # disjoint: the stacked series never count a page twice
        assert sum(c.values()) <= ram


def test_perfetto_has_host_data_aborts_on_the_cpu_track(busy):
    m, shared, pvm, nvm = busy
    with pytest.raises(pkvm.HostDataAbort):
        m.host.read(pvm.memslot[0x40000], 8, cpu=1)
    m.host.read(0x4C00_0000, 8)  # a fresh host page: the hyp maps it (a handled abort)
    ev = trace_events(m)["traceEvents"]
    aborts = [e for e in ev if e["ph"] == "i" and e["cat"] == "host abort"]
    refused = [e for e in aborts if e["args"]["verdict"] == "refused"]
    assert refused and refused[-1]["tid"] == 1
    assert refused[-1]["args"]["addr"] == hex(pvm.memslot[0x40000])
    assert refused[-1]["args"]["access"] == "read"
    assert any(e["args"]["verdict"] == "mapped" and e["args"]["addr"] == "0x4c000000"
               for e in aborts)


def test_map_names_the_guest_a_host_page_is_shared_with(busy):
    m, shared, pvm, nvm = busy
    om = ownership_map(m)
    assert om.category_of(nvm.memslot[0x40001] >> 12) == f"host: shared with guest {nvm.handle:#x}"
    from pkvm.viz.ownership import legend_lines

    texts = [t for _, t in legend_lines(om)]
    assert any(t.endswith("(4 pages)") for t in texts)
    assert not any("(1 pages)" in t for t in texts)


def test_legend_says_one_page_not_one_pages():
    from pkvm.viz.ownership import legend_lines

    m = pkvm.Machine(memory="256M", cpus=2)
    assert m.hvc(0, "__pkvm_host_share_hyp", m.host.alloc_pages(1) >> 12).ok
    texts = [t for _, t in legend_lines(ownership_map(m))]
    assert "host: shared with the hyp (1 page)" in texts


def test_html_labels_rows_with_pfns(busy, tmp_path):
    m, *_ = busy
    path = tmp_path / "map.html"
    render_html(ownership_map(m), str(path))
    text = path.read_text()
    assert "the pfn axis" in text and "fillText(\"0x\" + (D.base_pfn" in text


def test_map_at_a_step_draws_the_machine_then(tmp_path):
    from typer.testing import CliRunner

    from pkvm.cli.main import app

    scn = tmp_path / "s.toml"
    scn.write_text('[[step]]\ncreate_vm = "v"\nprotected = true\n\n[[step]]\nmap = "v"\nn = 3\n\n'
                   '[[step]]\ndestroy = "v"\n')
    html_at, html_end = tmp_path / "at.html", tmp_path / "end.html"
    r = CliRunner().invoke(app, ["map", str(scn), "--html", str(html_at), "--at", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["map", str(scn), "--html", str(html_end)])
    assert r.exit_code == 0, r.output

    def labels(p):
        data = json.loads(re.search(r"let D = (\{.*?\});\n", p.read_text()).group(1))
        return [c["label"] for c in data["categories"]], data["title"]

    at, title = labels(html_at)
    assert "guest 0x1000: owned" in at and "after step 2" in title
    assert "guest 0x1000: owned" not in labels(html_end)[0]


def test_map_html_steps_through_the_scenario(tmp_path):
    from typer.testing import CliRunner

    from pkvm.cli.main import app

    scn = tmp_path / "s.toml"
    scn.write_text('[[step]]\ncreate_vm = "v"\nprotected = true\n\n[[step]]\nmap = "v"\nn = 3\n\n'
                   '[[step]]\ndestroy = "v"\n')
    html = tmp_path / "steps.html"
    r = CliRunner().invoke(app, ["map", str(scn), "--html", str(html), "--step-through"])
    assert r.exit_code == 0, r.output
    frames = json.loads(re.search(r"const FRAMES = (\[.*?\]);\n", html.read_text()).group(1))
    assert len(frames) == 4  # before step 1, then after each of the 3 steps
    labels = [[c["label"] for c in f["categories"]] for f in frames]
    assert "guest 0x1000: owned" in labels[2] and "guest 0x1000: owned" not in labels[3]
    assert "after step 2, map v" in frames[2]["title"]
    bad = CliRunner().invoke(app, ["map", "--png", str(tmp_path / "x.png"), "--step-through"])
    assert bad.exit_code == 2
