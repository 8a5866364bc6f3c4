"""Progress in a log: a line when work starts, about every 10 s and when it ends; stage lines of a build."""

from __future__ import annotations

import io
import subprocess
import sys

from atlas_builder.progress import LogBar, clock
from conftest import REPO


def test_log_bar_lines_every_interval_with_rate_and_eta():
    t = [0.0]
    out = io.StringIO()
    bar = LogBar(100, "featurevis m", "unit", stream=out, every=10.0, now=lambda: t[0])
    bar.set_layer("layer3.2")
    for _ in range(4):
        t[0] += 5.0
        bar.update(10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "atlas: featurevis m: 100 units to do"
    assert lines[1:3] == ["atlas: featurevis m · layer3.2: 20/100 units, 2 units/s, 0:10 so far, about 0:40 left",
                          "atlas: featurevis m · layer3.2: 40/100 units, 2 units/s, 0:20 so far, about 0:30 left"]
    assert lines[3] == "atlas: featurevis m: 40/100 units in 0:20" and len(lines) == 4
    assert clock(3725) == "1:02:05"


def test_a_build_into_a_log_says_what_it_is_doing(tmp_path):
    """stderr to a file (not a terminal): stage lines, progress lines, and the summary against 1 GB."""
    config = tmp_path / "a.toml"
    config.write_text(f'[atlas]\ndata_dir = "{tmp_path}/data"\nsite_dir = "{tmp_path}/site"\n'
                      '[featurevis]\nsteps = 2\n[embed]\nenabled = false\n'
                      '[[models]]\nname = "m"\nsource = "builtin:digits-mlp"\n')
    done = subprocess.run([sys.executable, "-m", "atlas_builder", "build", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    for line in ("atlas: scan:m: started", "atlas: scan:m: done in ", "atlas: featurevis:m: started",
                 "atlas: scan m (2 layers): 5 batches to do", "atlas: featurevis m: 60 units to do",
                 "atlas: render: 30 pages to do", "atlas: site: done in "):
        assert line in err, (line, err)
    assert "\r" not in err  # no bar redrawn in place
    assert "% of GitHub Pages' 1 GB" in done.stdout
