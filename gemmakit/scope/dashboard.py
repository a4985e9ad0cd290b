"""A self-contained HTML feature explorer: one file, no server, no external resources.

The data (feature summaries, plots as inline SVG strings made here in Python) sits in a JSON script tag; a
small script draws the feature list and one page per feature (`#f123`), plus per-text and steering views.
Opening the file from disk works offline; nothing is fetched.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemmakit.scope.explore import (
    activation_histogram,
    feature_examples,
    index_features,
    logit_effects,
    steer_generate,
    text_features,
)
from gemmakit.scope.sae import SAE
from gemmakit.scope.sites import parse_site


def bar_svg(values: Sequence[float], labels: Sequence[str] | None = None, width: int = 360, height: int = 120,
            color: str = "#4a7bd0", title: str = "") -> str:
    """A bar chart as an inline SVG string (histograms and logit bars)."""
    n = max(len(values), 1)
    top = max([abs(v) for v in values] + [1e-12])
    bw = width / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 16}" role="img">'
             f'<title>{html.escape(title)}</title>']
    for i, v in enumerate(values):
        h = abs(v) / top * height
        tip = html.escape(f"{labels[i] if labels else i}: {v:g}")
        parts.append(f'<rect x="{i * bw:.2f}" y="{height - h:.2f}" width="{max(bw - 1, 0.5):.2f}" height="{h:.2f}" '
                     f'fill="{color}"><title>{tip}</title></rect>')
    if labels:
        parts.append(f'<text x="0" y="{height + 12}" font-size="10">{html.escape(labels[0])}</text>')
        parts.append(f'<text x="{width}" y="{height + 12}" font-size="10" text-anchor="end">'
                     f'{html.escape(labels[-1])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def pick_features(density: torch.Tensor, n: int) -> list[int]:
    """n live latents spread evenly over the density ranking (frequent, typical and rare ones)."""
    live = torch.nonzero(density > 0).flatten()
    if live.numel() <= n:
        return live.tolist()
    order = live[torch.argsort(density[live], descending=True)]
    picks = torch.linspace(0, order.numel() - 1, n).round().long()
    return order[picks].tolist()


def neighbours(sae: SAE, features: Sequence[int], n: int = 8) -> list[list[tuple[int, float]]]:
    """For each feature, the `n` other latents whose decoder directions are closest: the highest cosine similarity
    between W_dec rows, most similar first. Near-duplicates and split features show up here."""
    if not features or n <= 0 or sae.d_sae < 2:
        return [[] for _ in features]
    with torch.no_grad():
        w = sae.W_dec.detach().float()
        unit = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
        index = torch.tensor([int(f) for f in features], dtype=torch.long)
        cos = unit[index] @ unit.t()
        cos[torch.arange(index.numel()), index] = -float("inf")  # not its own neighbour
        values, ids = cos.topk(min(n, sae.d_sae - 1), dim=1)
    return [[(int(i), float(v)) for i, v in zip(row_ids, row_values, strict=True)]
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)]


def dashboard_data(model: Any, sae: SAE, site: str, sequences: np.ndarray, features: Sequence[int] | None = None,
                   n_features: int = 40, texts: Sequence[str] = (), steer_prompt: str | None = None,
                   steer_coeff: float = 10.0, steer_tokens: int = 24, batch_size: int = 8,
                   n_neighbours: int = 8) -> dict[str, Any]:
    """Everything the page shows, computed once."""
    site = str(parse_site(site))
    index = index_features(model, sae, site, sequences, batch_size)
    density = index.density()
    max_act = index.max_activation()
    feats = list(features) if features is not None else pick_features(density, n_features)
    logits = logit_effects(model, sae, site, feats) if feats else []
    near = neighbours(sae, feats, n_neighbours)
    dens_log = torch.log10(density[density > 0]).numpy()
    counts, edges = np.histogram(dens_log, bins=20) if dens_log.size else (np.zeros(0), np.zeros(1))
    pages = []
    for f, effect, close in zip(feats, logits, near, strict=True):
        hist = activation_histogram(index, f)
        ex = feature_examples(model, index, f)
        mids = [f"{(a + b) / 2:.3g}" for a, b in zip(hist["edges"][:-1], hist["edges"][1:], strict=True)]
        pages.append({
            "id": int(f), "density": float(density[f]), "max": float(max_act[f]),
            "hist_svg": bar_svg(hist["counts"], mids, title=f"activations of feature {f}"),
            "logit_svg": bar_svg([v for _, v in effect["pos"]], [t for t, _ in effect["pos"]], color="#3a9a5b",
                                 title="top logit effects"),
            "pos": effect["pos"], "neg": effect["neg"], **ex,
            "neighbours": [[i, round(c, 4), float(density[i])] for i, c in close],
            "steer": (steer_generate(model, sae, site, f, steer_coeff, steer_prompt, steer_tokens)
                      if steer_prompt else None),
        })
    return {
        "site": site, "d_in": sae.d_in, "d_sae": sae.d_sae, "architecture": sae.architecture,
        "model": str(getattr(model, "source", "")), "tokens": index.n_tokens,
        "dead_fraction": float((density == 0).float().mean()),
        "l0": float(index.latent.numel() / max(index.n_tokens, 1)),
        "density_svg": bar_svg(counts.tolist(), [f"1e{e:.1f}" for e in edges[:-1]], title="log10 feature density"),
        "features": pages,
        "texts": [{"text": t, "rows": text_features(model, sae, site, t)} for t in texts],
    }


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SAE explorer: __TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#side{width:270px;overflow-y:auto;border-right:1px solid #ccc;background:#f7f7f9}
#side a{display:block;padding:4px 10px;color:#234;text-decoration:none;font-size:13px;border-bottom:1px solid #eee}
#side a:hover,#side a.on{background:#dde6f5}
#main{flex:1;overflow-y:auto;padding:14px 22px}
.ex{font-family:ui-monospace,monospace;font-size:13px;margin:3px 0;white-space:pre-wrap}
.tok{border-radius:2px}
.tok.peak{outline:1px solid #b33}
table{border-collapse:collapse;font-size:13px}td{padding:1px 8px}
.neg{color:#b33}.pos{color:#286}
h3{margin:18px 0 6px}
.small{color:#666;font-size:12px}
</style></head><body>
<nav id="side"></nav><main id="main">loading...</main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
function esc(s){return String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
function example(ex, peak){
  const m = Math.max(peak, 1e-9);
  return '<div class="ex">' + ex.tokens.map((t,i)=>{
    const a = ex.acts[i], op = Math.min(1, a/m).toFixed(2);
    return '<span class="tok'+(i===ex.pos?' peak':'')+'" title="'+esc(a)+'" style="background:rgba(230,120,30,'+op+')">'
      + esc(t) + '</span>';}).join('') + ' <span class="small">max '+ex.max+'</span></div>';
}
function table(rows, cls){return '<table>'+rows.map(r=>'<tr><td>'+esc(JSON.stringify(r[0]))+'</td><td class="'+cls+'">'
  +r[1]+'</td></tr>').join('')+'</table>';}
function home(){
  return '<h2>SAE at '+esc(D.site)+'</h2><p>'+esc(D.architecture)+' SAE, d_in '+D.d_in+', '+D.d_sae+' latents; '
    +D.tokens+' tokens indexed; L0 '+D.l0.toFixed(1)+'; dead '+(100*D.dead_fraction).toFixed(1)+'%.</p>'
    +'<p class="small">model: '+esc(D.model)+'</p><h3>Feature density (log10)</h3>'+D.density_svg
    +(D.texts.length?'<p><a href="#texts">Features per text</a></p>':'');
}
function featurePage(F){
  let h = '<h2>Feature '+F.id+'</h2><p>density '+(100*F.density).toFixed(3)+'% of tokens, max activation '
    +F.max.toFixed(3)+'</p><h3>Activation histogram</h3>'+F.hist_svg
    +'<h3>Logit effects</h3><div style="display:flex;gap:30px"><div>positive'+table(F.pos,'pos')
    +'</div><div>negative'+table(F.neg,'neg')+'</div></div>'+F.logit_svg
    +'<h3>Top activations</h3>'+F.top.map(e=>example(e, F.max)).join('');
  for (const q of F.quantiles){
    h += '<h3>Interval '+q.range[0]+' - '+q.range[1]+' <span class="small">('+q.count+' contexts)</span></h3>'
      + q.examples.map(e=>example(e, F.max)).join('');
  }
  if (F.neighbours.length){
    const shown = new Set(D.features.map(x=>x.id));
    h += '<h3>Neighbouring features <span class="small">(closest decoder directions)</span></h3><table id="neighbours">'
      +'<tr><td>feature</td><td>cosine</td><td>density</td></tr>'+F.neighbours.map(r=>'<tr><td>'
      +(shown.has(r[0])?'<a href="#f'+r[0]+'">#'+r[0]+'</a>':'#'+r[0])+'</td><td>'+r[1].toFixed(3)+'</td><td>'
      +(100*r[2]).toFixed(3)+'%</td></tr>').join('')+'</table>';
  }
  if (F.steer){
    h += '<h3>Steering (+'+F.steer.coeff+' x decoder direction)</h3><table><tr><td>default</td><td>'
      +esc(F.steer.prompt+F.steer.default)+'</td></tr><tr><td>steered</td><td>'+esc(F.steer.prompt+F.steer.steered)
      +'</td></tr></table>';
  }
  return h;
}
function textsPage(){
  return '<h2>Features per text</h2>' + D.texts.map(T=>'<div class="ex">'+T.rows.map(r=>
    '<span class="tok" title="'+esc(r.features.map(f=>'#'+f[0]+': '+f[1]).join(', '))
    +'" style="background:rgba(230,120,30,'+(r.features.length?0.35:0)+')">'+esc(r.token)+'</span>').join('')
    +'</div><table>'+T.rows.map(r=>
    '<tr><td>'+esc(r.token)+'</td><td>'+r.features.map(f=>'<a href="#f'+f[0]+'">#'+f[0]+'</a> '+f[1]).join(', ')
    +'</td></tr>').join('')+'</table>').join('');
}
function route(){
  const m = location.hash.match(/^#f(\\d+)$/);
  const main = document.getElementById("main");
  let F = null;
  if (m) F = D.features.find(x=>x.id===Number(m[1]));
  main.innerHTML = F ? featurePage(F) : (location.hash==="#texts" ? textsPage() : home());
  for (const a of document.querySelectorAll("#side a"))
    a.classList.toggle("on", a.getAttribute("href")===location.hash);
  document.body.dataset.rendered = F ? "feature" : "home";
}
document.getElementById("side").innerHTML = '<a href="#">overview</a>'
  + (D.texts.length?'<a href="#texts">texts</a>':'')
  + D.features.map(F=>'<a href="#f'+F.id+'">#'+F.id+' <span class="small">'+(100*F.density).toFixed(2)+'% '
  + esc((F.top[0]||{tokens:[]}).tokens.slice(-6).join('')).slice(0,40)+'</span></a>').join('');
window.addEventListener("hashchange", route);
route();
</script></body></html>
"""


def render_html(data: dict[str, Any], title: str | None = None) -> str:
    blob = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", html.escape(title or data["site"])).replace("__DATA__", blob)


def write_dashboard(path: str | Path, data: dict[str, Any], title: str | None = None) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data, title), encoding="utf-8")
    return out
