"""Pictures of the verdicts and the HTML report: the plots a run writes beside its Markdown summary, and one
self-contained page, rendered in a real headless Chromium (Debian's package) that fetches nothing."""

import json
import shutil
import subprocess

import pytest
from test_plugin_e2e import WORSE, make_project, run

from quantgate.report import RunReport
from quantgate.thresholds import load_table

pytest.importorskip("matplotlib")
pytest.importorskip("markdown")
import matplotlib  # noqa: E402  imported out here: pytester's in-process runs drop the modules imported inside them,
import matplotlib.pyplot  # noqa: E402,F401  and a second matplotlib next to the first mixes their classes

matplotlib.use("Agg")


@pytest.fixture
def html_run(pytester, tiny_zoo_template):
    """A run of the tiny zoo with a failing variant, written with --quality-html."""
    make_project(pytester, tiny_zoo_template, variants=WORSE)
    result = run(pytester, "--quality-html", "reports/quality.html", "--quality-json", "reports/q.json")
    assert result.ret == 1  # the worse variant fails
    return pytester.path


def test_a_run_writes_plots_beside_the_summary_and_a_self_contained_page(html_run):
    reports = html_run / "reports"
    for name in ("quality-distribution-tiny.png", "quality-distribution-tiny.svg", "quality.html"):
        assert (reports / name).stat().st_size > 1000, name
    page = (reports / "quality.html").read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert page.count("<svg") >= 1 and "<table>" in page
    assert "tiny/worse" in page and '<td class="FAIL">FAIL</td>' in page
    assert "RelativePerplexityFailed" in page or "relative perplexity" in page.lower()  # the failure's own message
    records = json.loads((reports / "q.json").read_text())["records"]
    for fingerprint in {r["protocol_fingerprint"] for r in records if r["protocol_fingerprint"]}:
        assert fingerprint in page  # the protocol section names every fingerprint
    assert '"stride": 32' in page  # the profile's protocol settings
    assert "torch" in page  # the environment
    assert "src=" not in page.replace('src="data:', "")  # nothing referenced from elsewhere


def test_the_plots_order_variants_by_bits_and_keep_size_apart(html_run):
    from quantgate.plots import distribution_figure

    report = RunReport.from_json((html_run / "reports" / "q.json").read_text())
    for r in report.records:  # a lower-bit variant, to see the order
        if r.variant == "worse":
            r.bits = 4
    fig = distribution_figure(report.records, load_table(), "tiny")
    ppl, kl, size = fig.axes[:3]
    assert ppl.get_ylabel() == "perplexity / FP16's" and size.get_ylabel() == "size on disk (MB)"
    labels = [t.get_text() for t in size.get_xticklabels()]
    assert labels[0].startswith("close") and labels[-1].startswith("worse\nfp16 4-bit")
    assert kl.get_yscale() == "log"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QUIET = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]


def _chromium(tmp_path, page, *args) -> tuple[str, list[dict]]:
    """(standard output, the network requests the page itself made) of one headless Chromium run."""
    netlog = tmp_path / f"net-{page.stem}.json"
    out = subprocess.run([CHROMIUM, *QUIET, f"--user-data-dir={tmp_path / ('profile-' + page.stem)}",
                          f"--log-net-log={netlog}", *args, page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    log = json.loads(netlog.read_text())
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    # The browser's own traffic (updates, time) starts with initiator "not an origin"; the page's has its origin.
    requests = [e["params"] for e in log["events"] if names.get(e["type"]) == "URL_REQUEST_START_JOB"
                and "url" in e.get("params", {}) and e["params"].get("initiator") != "not an origin"]
    return out.stdout, requests


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; "
                                             "./run.sh test installs it as root; tox -e browser)")
def test_the_page_renders_in_headless_chromium_and_fetches_nothing(html_run, tmp_path):
    page = html_run / "reports" / "quality.html"
    dom, requests = _chromium(tmp_path, page, "--dump-dom")
    assert "<h1>quantgate report</h1>" in dom and dom.count("<table>") >= 3 and "<svg" in dom
    assert requests == []
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1400,2000")
    from PIL import Image  # matplotlib's own dependency

    pixels = Image.open(shot).convert("L").getextrema()
    assert shot.stat().st_size > 20_000 and pixels[0] < 100 < pixels[1]  # drawn, not a blank page

    leak = tmp_path / "leak.html"  # the same check sees a page that fetches: it is not blind
    leak.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>')
    _, leaked = _chromium(tmp_path, leak, "--dump-dom")
    assert [r["url"] for r in leaked] == ["http://example.invalid/x.png"]
