"""``report.html``: one self-contained page (inline CSS, JS and SVG; images as ``data:`` URIs).

The page's script records any JavaScript error (``window.onerror``, ``console.error``, images
that fail to decode) into ``<html data-js-errors>`` and ``#js-errors``, and sets
``data-report-ready="1"`` with ``data-images-loaded``/``data-images-total`` once loaded, so a
headless browser's dumped DOM shows whether the page worked.
"""

from __future__ import annotations

from html import escape
from typing import Any

from catbatch.report.aggregate import Report
from catbatch.report.fmt import details, table2
from catbatch.report.plots import clip_macs_plot, latency_plot, speedup_plot

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.partial{background:#fff3cd;border:1px solid #e0c36c;padding:8px 12px}
.plots{display:flex;flex-wrap:wrap;gap:16px}
figure.plotbox{margin:0;border:1px solid #ddd;padding:8px}
svg.plot text{font-size:12px;fill:#222}svg.plot text.muted{fill:#888}
svg.plot .axis{stroke:#444}svg.plot .grid{stroke:#eee}
svg.plot .ref{stroke:#555;stroke-dasharray:4 3}
table.grid th{text-align:center}
table.grid td{vertical-align:top;text-align:center;white-space:normal}
table.grid td.prompt{max-width:220px;text-align:left;font-size:12px}
table.grid img{width:256px;height:auto;display:block;cursor:zoom-in}
table.grid img.small{image-rendering:pixelated}
table.grid img.zoom{width:512px;cursor:zoom-out}
.cap{font-size:12px;color:#555}.missing{color:#a00;font-size:12px}
#js-errors{color:#a00}
"""

HEAD_JS = """
(function(){
  var errs=[];window.__reportErrors=errs;
  function note(m){errs.push(String(m));
    document.documentElement.setAttribute('data-js-errors',String(errs.length));
    var p=document.getElementById('js-errors');if(p){p.textContent=errs.join('\\n');}}
  window.__reportNote=note;
  window.onerror=function(msg,src,line,col){note(msg+' at '+line+':'+col);};
  window.addEventListener('unhandledrejection',function(e){note('rejection: '+e.reason);});
  window.addEventListener('error',function(e){
    var t=e.target;if(t&&t.tagName==='IMG'){note('image failed: '+(t.alt||''));}},true);
  var ce=console.error;console.error=function(){
    note(Array.prototype.join.call(arguments,' '));ce.apply(console,arguments);};
})();
"""

END_JS = """
(function(){
  var imgs=document.querySelectorAll('img');
  imgs.forEach(function(img){img.addEventListener('click',function(){
    img.classList.toggle('zoom');});});
  function sharpen(){imgs.forEach(function(i){if(i.naturalWidth&&i.naturalWidth<256){
    i.classList.add('small');}});}
  function done(){
    sharpen();var ok=0;imgs.forEach(function(i){if(i.complete&&i.naturalWidth>0){ok++;}});
    var root=document.documentElement;
    root.setAttribute('data-images-total',String(imgs.length));
    root.setAttribute('data-images-loaded',String(ok));
    root.setAttribute('data-report-ready','1');
    if(ok<imgs.length){window.__reportNote((imgs.length-ok)+' image(s) did not load');}
  }
  if(document.readyState==='complete'){done();}else{window.addEventListener('load',done);}
})();
"""


def _table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _details(data: dict[str, Any]) -> str:
    return _table(*details(data), "details")


def _grid(report: Report) -> str:
    data = report.data
    names = [data["baseline"]] if data["baseline"] else []
    names += [n for n in data["variants_order"] if n not in names]
    if not report.grid:
        return '<p class="muted">No images to show.</p>'
    head = "<th>Prompt</th>" + "".join(
        f"<th>{escape(n)}{' (baseline)' if n == data['baseline'] else ''}</th>" for n in names
    )
    rows = []
    for g in report.grid:
        cells = [
            f'<td class="prompt"><b>{escape(g.sample_id)}#{g.image_index}</b><br>'
            f"{escape(g.prompt)}</td>"
        ]
        for n in names:
            uri = g.images.get(n)
            if uri is None:
                cells.append('<td><span class="missing">missing or failed</span></td>')
                continue
            s = g.scores.get(n)
            cap = ""
            if s:
                psnr = "∞" if s["psnr"] is None else f"{s['psnr']:.2f}"
                cap = f'<div class="cap">PSNR {psnr} dB · SSIM {s["ssim"]:.4f}</div>'
            alt = escape(f"{n} {g.sample_id}#{g.image_index}", quote=True)
            cells.append(f'<td><img src="{uri}" alt="{alt}" data-variant="{escape(n)}">{cap}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="grid" id="image-grid"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def render_html(report: Report) -> str:
    data = report.data
    name = data["run"].get("name") or "run"
    header, rows = table2(data)
    status = escape(data["run"].get("status") or "unknown")
    partial = ""
    if data["partial"]:
        items = "".join(f"<li>{escape(n)}</li>" for n in data["notes"])
        partial = f'<div class="partial" id="partial"><b>Partial results.</b><ul>{items}</ul></div>'
    plots = "".join(
        f'<figure class="plotbox">{svg}</figure>'
        for svg in (latency_plot(report.latencies), clip_macs_plot(data), speedup_plot(data))
    )
    return f"""<!DOCTYPE html>
<html lang="en" data-report-ready="0" data-js-errors="0">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>catbatch report: {escape(name)}</title>
<style>{CSS}</style>
<script>{HEAD_JS}</script>
</head>
<body>
<h1>catbatch report: {escape(name)}</h1>
<p>Output <code>{escape(data["output"])}</code> · run status <b>{status}</b> · baseline
<b>{escape(str(data["baseline"]))}</b> · generated {escape(data["generated_at"])}</p>
{partial}
<h2>Comparison (shaped like the paper's Table 2)</h2>
{_table(header, rows, "table2")}
<p class="cap">MACs: mean per image (linear layers and patch embedding). Throughput: 1 / mean
latency, warm-up excluded. Speed-up: baseline mean latency / variant mean latency. PSNR/SSIM:
against the baseline image of the same sample and seed.</p>
<h2>Details</h2>
{_details(data)}
<h2>Plots</h2>
<div class="plots">{plots}</div>
<h2>Paired images</h2>
<p class="cap">The baseline image beside each variant's image of the same prompt and seed
(click an image to enlarge).</p>
{_grid(report)}
<pre id="js-errors"></pre>
<script>{END_JS}</script>
</body>
</html>
"""
