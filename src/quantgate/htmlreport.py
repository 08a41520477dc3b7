"""The HTML report (`--quality-html PATH`, `quantgate report --html`): one self-contained file.

It holds the run's summary (the Markdown summary rendered by Python-Markdown), the plots inline as SVG, each
failure's full message, the environment, and the protocol (the manifest's protocol settings for the run's
profile, and every fingerprint the records carry). Nothing is fetched: no scripts, fonts, styles or images
from elsewhere, and a Content-Security-Policy that lets the page load nothing but itself.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #1f2328; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 12px; }
th, td { border: 1px solid #d0d7de; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 12px; white-space: pre-wrap; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
.FAIL { color: #cf222e; font-weight: 600; }
"""


def _svg(path: Path) -> str:
    """An SVG file's <svg> element, without its XML prologue (inline in the page)."""
    text = path.read_text(encoding="utf-8")
    return text[text.index("<svg"):]


def _protocol_section(manifest_path: Path | None, profile: str, records) -> str:
    parts = []
    if manifest_path is not None and Path(manifest_path).is_file():
        import tomllib

        protocol = tomllib.loads(Path(manifest_path).read_text()).get("protocol", {})
        settings = {k: v for k, v in protocol.items() if k != "profiles"}
        settings.update(protocol.get("profiles", {}).get(profile, {}))
        parts.append(f"<p>Settings of profile <code>{html.escape(profile)}</code> in "
                     f"<code>{html.escape(str(manifest_path))}</code>:</p>")
        parts.append(f"<pre>{html.escape(json.dumps(settings, indent=2, default=str), quote=False)}</pre>")
    fingerprints = sorted({(r.model, r.corpus, r.backend or "", r.protocol_fingerprint) for r in records
                           if r.protocol_fingerprint})
    rows = "".join(f"<tr><td>{html.escape(m)}</td><td>{html.escape(c)}</td><td>{html.escape(b)}</td>"
                   f"<td><code>{html.escape(f)}</code></td></tr>" for m, c, b, f in fingerprints)
    parts.append("<table><tr><th>model</th><th>corpus / task</th><th>backend</th><th>protocol fingerprint</th></tr>"
                 f"{rows}</table>")
    return "\n".join(parts)


def render(report, *, plots: list[Path] = (), failures: dict[str, str] | None = None,
           manifest_path: Path | None = None) -> str:
    """The page for a run's report; `failures` maps a failing check's node id to its full message."""
    import markdown

    from . import __version__

    summary = markdown.markdown(report.markdown(), extensions=["tables"])
    summary = re.sub(r"<td>(FAIL|REVERSAL)</td>", r'<td class="FAIL">\1</td>', summary)
    figures = "\n".join(f"<figure>{_svg(p)}<figcaption>{html.escape(p.stem)}</figcaption></figure>"
                        for p in plots if p.suffix == ".svg")
    if failures:
        failing = "\n".join(f"<h3>{html.escape(nodeid)}</h3><pre>{html.escape(text)}</pre>"
                            for nodeid, text in failures.items())
    else:
        failed = [r for r in report.records if r.verdict in ("FAIL", "REVERSAL", "error", "cannot test")]
        failing = "\n".join(f"<h3>{html.escape(f'{r.model}/{r.variant} {r.corpus} {r.metric}: {r.verdict}')}</h3>"
                            f"<pre>{html.escape(r.detail or r.note or '(no message recorded)')}</pre>"
                            for r in failed) or "<p>None.</p>"
    env = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                  for k, v in report.environment.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>quantgate report ({html.escape(report.profile)}, {html.escape(report.device)})</title>
<style>{STYLE}</style></head>
<body>
<h1>quantgate report</h1>
<p>quantgate {html.escape(__version__)}, profile <code>{html.escape(report.profile)}</code>, device
<code>{html.escape(report.device)}</code>, {len(report.records)} records.</p>
<h2 id="plots">Plots</h2>
{figures or "<p>No plots (matplotlib is not installed, or the run has no records to draw).</p>"}
<h2 id="failures">Failures</h2>
{failing}
<h2 id="summary">Summary</h2>
{summary}
<h2 id="environment">Environment</h2>
<table>{env}</table>
<h2 id="protocol">Protocol</h2>
{_protocol_section(manifest_path, report.profile, report.records)}
</body></html>
"""


def write(path: Path, report, *, plots_dir: Path, rows, failures: dict[str, str] | None = None,
          manifest_path: Path | None = None) -> list[Path]:
    """Plots into plots_dir, then the page into path (replaced atomically); returns the files written."""
    from .plots import write_plots

    try:
        plots = write_plots(report.records, rows, plots_dir)
    except ImportError:  # no matplotlib: the page says so
        plots = []
    page = render(report, plots=plots, failures=failures, manifest_path=manifest_path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return [*plots, path]
