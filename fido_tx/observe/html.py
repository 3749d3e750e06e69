"""HTML pieces of the status page: escaping, times, the chart, the style.

Everything that comes from an account, a server or Redis goes through
:func:`esc`.  No JavaScript, no asset from elsewhere: the style is inline and
the chart is an inline SVG.
"""

import html
import time

from fido_tx.timefmt import ago, parse_iso

CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d232b;--mute:#5d6875;--line:#e2e6eb;
--bad:#b42318;--badbg:#fdecea;--ok:#1f7a3f;--okbg:#e8f5ec;--new:#5d6875;--newbg:#eef0f3;
--accent:#2754c5}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
background:var(--bg);color:var(--ink)}
header{background:#1d232b;color:#fff;padding:12px 24px;display:flex;gap:16px;
align-items:baseline;flex-wrap:wrap}
header h1{font-size:20px;margin:0}
header a{color:#fff;text-decoration:none}
header .meta{color:#c3cad3;font-size:13px}
main{padding:16px 24px;max-width:1400px;margin:0 auto}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:16px;
margin-bottom:16px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px}
.card h2{font-size:14px;text-transform:uppercase;letter-spacing:.04em;color:var(--mute);
margin:0 0 8px}
.card h2.acct{text-transform:none;letter-spacing:0;font-size:20px;color:var(--ink);
overflow-wrap:anywhere}
.big{font-size:28px;font-weight:600}
.filters{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin:8px 0 12px}
.chip{display:inline-block;padding:3px 10px;border-radius:999px;border:1px solid var(--line);
background:var(--card);color:var(--ink);text-decoration:none;font-size:14px}
.chip.on{border-color:var(--accent);box-shadow:inset 0 0 0 1px var(--accent)}
.chip.bad{color:var(--bad)}
form.search input{padding:4px 8px;border:1px solid var(--line);border-radius:6px;font:inherit}
form.search button{padding:4px 10px;border:1px solid var(--line);border-radius:6px;
background:var(--card);font:inherit}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line);
border-radius:8px;overflow:hidden}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--mute);
background:#fafbfc}
tr.failing td:first-child{box-shadow:inset 3px 0 0 var(--bad)}
td.err{color:var(--bad);max-width:420px;overflow-wrap:anywhere}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.state{display:inline-block;padding:1px 8px;border-radius:4px;font-size:13px;font-weight:600}
.s-ok{background:var(--okbg);color:var(--ok)}
.s-bad{background:var(--badbg);color:var(--bad)}
.s-new{background:var(--newbg);color:var(--new)}
.mute{color:var(--mute);font-size:13px}
a{color:var(--accent)}
.pager{margin:12px 0;display:flex;gap:12px;align-items:center}
.problem{background:var(--badbg);color:var(--bad);border:1px solid #f5c2bd;border-radius:8px;
padding:8px 12px;margin-bottom:12px}
svg.chart{width:100%;height:auto;display:block}
svg.chart rect.bar{fill:var(--accent)}
svg.chart text{font-size:12px;fill:var(--mute)}
.t{white-space:nowrap}
td.id{white-space:nowrap;font-weight:500}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dl.facts dt{color:var(--mute)}
dl.facts dd{margin:0;overflow-wrap:anywhere}
@media (max-width:700px){
 main{padding:12px}
 header{padding:10px 12px}
 table,thead,tbody,tr,td{display:block;border:0}
 thead{display:none}
 table{background:none;border:0}
 tr{background:var(--card);border:1px solid var(--line);border-radius:8px;margin-bottom:10px;
 padding:6px 10px}
 tr.failing{border-left:4px solid var(--bad)}
 tr.failing td:first-child{box-shadow:none}
 td{padding:3px 0;border:0}
 td[data-label]:empty{display:none}
 td.id{font-size:17px}
 td[data-label]::before{content:attr(data-label) ": ";color:var(--mute);font-size:13px}
 td.num{text-align:left}
 td.err{max-width:none}
 dl.facts{grid-template-columns:1fr;gap:0}
 dl.facts dd{margin-bottom:8px}
}
"""


def esc(value):
    """HTML-escaped text of anything (``None`` is "")."""
    return html.escape("" if value is None else str(value), quote=True)


def when(value, now):
    """An ISO text or POSIX seconds as ``3m ago`` over ``2026-11-29 14:01 UTC`` (escaped)."""
    if value in (None, ""):
        return '<span class="mute">never</span>'
    seconds = value if isinstance(value, (int, float)) else parse_iso(value)
    if seconds is None:
        return esc(value)
    stamp = esc(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds)))
    rel = ago(now - seconds)
    if not rel:
        return f'<span class="t">{stamp}</span>'
    return f'<span class="t">{esc(rel)}</span><br><span class="mute t">{stamp}</span>'


def chart(series, width=400, height=110):
    """Messages per minute as an inline SVG bar chart (``series``: ``[(t, n)]``)."""
    counts = [n for _t, n in series] or [0]
    top = max(counts) or 1
    n = len(counts)
    left, bottom = 30, 18
    inner_w, inner_h = width - left - 4, height - bottom - 6
    step = inner_w / n
    bars = []
    for i, count in enumerate(counts):
        h = inner_h * count / top
        x = left + i * step
        bars.append(
            f'<rect class="bar" x="{x + 0.5:.1f}" y="{6 + inner_h - h:.1f}" '
            f'width="{max(step - 1, 1):.1f}" height="{h:.1f}"><title>{count} at -{n - 1 - i} min'
            f"</title></rect>"
        )
    axis = (
        f'<line x1="{left}" y1="{6 + inner_h}" x2="{width - 4}" y2="{6 + inner_h}" '
        f'stroke="#c3cad3"/>'
        f'<text x="{left - 4}" y="16" text-anchor="end">{top if max(counts) else 0}</text>'
        f'<text x="{left - 4}" y="{6 + inner_h}" text-anchor="end">0</text>'
        f'<text x="{left}" y="{height - 2}">-{n} min</text>'
        f'<text x="{width - 4}" y="{height - 2}" text-anchor="end">now</text>'
    )
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="messages per minute over the last {n} minutes" '
        f'xmlns="http://www.w3.org/2000/svg">{axis}{"".join(bars)}</svg>'
    )


def document(title, body, subtitle=""):
    """The whole HTML document (bytes)."""
    text = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1><a href="/">Fido</a></h1><span class="meta">{subtitle}</span></header>'
        f"<main>{body}</main></body></html>\n"
    )
    return text.encode("utf-8")
