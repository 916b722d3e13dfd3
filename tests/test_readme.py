"""The shell blocks of the README and docs/ marked `<!-- readme-test -->` run as written, in a
fresh shell.

Each block runs in a bare environment (PATH, a new HOME, nothing else) from the project root,
inside its own process and network namespaces: `ray start --head` gets the usual ports and
`ray stop` stops only what the block started, whatever else runs on this machine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- readme-test -->\n```bash\n(.*?)```", re.S)


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def marked_blocks() -> list[str]:
    return [block for page in DOCS for block in MARKED.findall(page.read_text())]


def test_the_docs_mark_blocks_to_run():
    assert marked_blocks(), "no <!-- readme-test --> blocks in README.md or docs/"


def test_every_local_link_of_the_docs_leads_to_a_file_and_heading():
    """A page moved or a heading renamed leaves no link pointing at nothing."""
    link = re.compile(r"\]\(([^)#:\s]*)(#[^)\s]*)?\)")
    for page in DOCS:
        for target, anchor in link.findall(page.read_text()):
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), f"{page.name}: {target} does not exist"
            if anchor and path.suffix == ".md":
                headings = {
                    "#" + re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                    for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)
                }
                assert anchor in headings, f"{page.name}: {target}{anchor} names no heading"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
@pytest.mark.timeout(420)
@pytest.mark.parametrize("block", marked_blocks(), ids=lambda b: b.split("\n")[1][:40])
def test_readme_block_runs_as_written(block, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    script = tmp_path / "block.sh"
    script.write_text("set -euo pipefail\n" + block)
    inside = (
        "ip link set lo up && mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray && "
        f"cd {ROOT} && exec env -i HOME={home} PATH=/usr/local/bin:/usr/bin:/bin bash {script}"
    )
    namespaces = ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--mount"]
    done = subprocess.run(
        [*namespaces, "bash", "-c", inside], capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, (
        f"{block}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
