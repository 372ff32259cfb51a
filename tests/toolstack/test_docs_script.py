"""scripts/make_docs.py makes the images of docs/getting-started.md from a real run
(issue 15 item 5): the dashboard's SVG and the plots, so the committed ones can be
made again."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from run_helpers import subprocess_env
from test_plots import png_size

from gntdma.toolstack.plots import PLOT_DPI, PLOT_FILES, PLOT_SIZE

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_docs.py"


def test_docs_script_writes_a_valid_svg_and_the_plots(tmp_path: Path) -> None:
    out = tmp_path / "img"
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--duration", "2"],
                       cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    svg = out / "dashboard.svg"
    assert str(svg) in p.stdout.splitlines()
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = "".join(root.itertext()).replace("\xa0", " ")
    for panel in ("guests: grant table", "devices: rings, throughput, latency", "reports"):
        assert panel in text
    assert "guest1/xvda" in text and "/1528" in text
    want = (int(PLOT_SIZE[0] * PLOT_DPI), int(PLOT_SIZE[1] * PLOT_DPI))
    for name in PLOT_FILES:
        assert png_size(out / name) == want


def test_the_committed_docs_images_are_the_scripts_files() -> None:
    """docs/getting-started.md shows what the script makes, and every file is there."""
    page = (ROOT / "docs" / "getting-started.md").read_text()
    for name in ("dashboard.svg", *PLOT_FILES):
        assert f"img/{name}" in page
        assert (ROOT / "docs" / "img" / name).is_file()
    assert "scripts/make_docs.py" in page
