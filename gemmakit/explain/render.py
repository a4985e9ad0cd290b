"""Views of a salience result: coloured terminal text, a plain listing for pipes, and a self-contained HTML page.

Colours follow LIT's: an unsigned method (gradient L2) shades one hue by magnitude; a signed one (gradient .
input, integrated gradients) shades green for tokens that raise the span's log-probability and red for those
that lower it. Intensity is |score| / max |score| over what is shown, times a gain (the page's slider).
"""

from __future__ import annotations

import html
import json
from typing import Any

from gemmakit.explain.features import FeatureAttribution
from gemmakit.explain.salience import Salience
from gemmakit.explain.segments import aggregate

UNSIGNED = (124, 77, 204)
POSITIVE = (38, 150, 80)
NEGATIVE = (206, 52, 52)


def signed(method: str) -> bool:
    return method != "grad_l2"


def colour(score: float, scale: float, is_signed: bool, gain: float = 1.0) -> tuple[int, int, int]:
    """The background for a score: white blended towards the method's hue by min(1, gain |score| / scale)."""
    alpha = min(1.0, gain * abs(score) / scale) if scale > 0 else 0.0
    hue = (POSITIVE if score >= 0 else NEGATIVE) if is_signed else UNSIGNED
    return tuple(round(255 + (c - 255) * alpha) for c in hue)  # type: ignore[return-value]


def _segments(result: Salience, granularity: str, which: str) -> tuple[list[str], list[float]]:
    pieces, scores = result.part(which)
    segs = aggregate(pieces, scores, granularity)
    return [s.text for s in segs], [s.score for s in segs]


def terminal(result: Salience, granularity: str = "token", colour_on: bool = True, gain: float = 1.0) -> str:
    """The prompt (and the target, span underlined) with each segment's background coloured by its score; without
    colour, one `segment<TAB>score` line per prompt segment, then the target with the span in [[ ]]."""
    texts, scores = _segments(result, granularity, "prompt")
    target = result.target_tokens
    a, b = result.span
    header = f"{result.method} on {granularity}s, span {a}:{b} {''.join(target[a:b])!r}, log p = " \
             f"{result.target_logprob:.4f}"
    extra = result.details.get("completeness_error")
    if extra is not None:
        header += f", completeness error {100 * extra:.3f}% ({result.details['steps']} steps)"
    if not colour_on:
        lines = [header, *(f"{t!r}\t{s:.6g}" for t, s in zip(texts, scores, strict=True))]
        lines.append("target: " + "".join(target[:a]) + "[[" + "".join(target[a:b]) + "]]" + "".join(target[b:]))
        return "\n".join(lines)
    scale = max((abs(s) for s in scores), default=0.0)
    out = [f"\x1b[1m{header}\x1b[0m\n"]
    for text, score in zip(texts, scores, strict=True):
        r, g, bl = colour(score, scale, signed(result.method), gain)
        parts = text.split("\n")
        out.append("\n".join(f"\x1b[38;2;0;0;0;48;2;{r};{g};{bl}m{p}\x1b[0m" if p else "" for p in parts))
    out.append("\x1b[2m" + "".join(target[:a]) + "\x1b[0m\x1b[4;1m" + "".join(target[a:b]) + "\x1b[0m\x1b[2m"
               + "".join(target[b:]) + "\x1b[0m\n")
    return "".join(out)


def features_terminal(result: FeatureAttribution) -> str:
    """Top latents with their attribution, where they fire, and their summaries."""
    lines = [f"SAE at {result.site}: span log p = {result.target_logprob:.4f}; "
             f"site total {float(result.total[1:].sum()):.4g} = latents {float(result.attributions[1:].sum()):.4g}"
             f" + bias {float(result.bias[1:].sum()):.4g}"
             f" + error {float(result.error[1:].sum()):.4g}; error share {100 * result.error_share:.1f}%"]
    for f in result.features:
        where = ", ".join(f"{p['token']!r}:{p['activation']:.3g}" for p in f["positions"][:6])
        lines.append(f"  #{f['feature']:<7} {f['attribution']:+.4g}   at {where}")
        s = f.get("summary")
        if s:
            logits = " ".join(t for t, _ in s["logits_pos"][:5])
            dens = f"density {100 * s['density']:.3f}%  " if "density" in s else ""
            lines.append(f"           {dens}promotes: {logits!r}")
            if s.get("top"):
                lines.append(f"           top context: {''.join(s['top'][0]['tokens'])!r}")
    return "\n".join(lines)


def page(result: Salience, granularity: str = "token", features: FeatureAttribution | None = None) -> str:
    """A self-contained HTML page (inline CSS and script, no external resources): prompt and target coloured by
    segment, the span outlined, a gain slider, the method's details and (when given) the top SAE features."""
    texts, scores = _segments(result, granularity, "prompt")
    a, b = result.span
    segments = [{"text": t, "score": s, "target": False, "span": False} for t, s in zip(texts, scores, strict=True)]
    segments += [{"text": t, "score": 0.0, "target": True, "span": a <= i < b}
                 for i, t in enumerate(result.target_tokens)]
    data = {"segments": segments, "signed": signed(result.method), "span": "".join(result.target_tokens[a:b])}
    details = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                      for k, v in [("method", result.method), ("granularity", granularity),
                                   ("span", f"{a}:{b} {data['span']!r}"), ("log p(span)", result.target_logprob),
                                   *result.details.items()])
    feats = ""
    if features is not None:
        rows = "".join(
            f"<tr><td>#{f['feature']}</td><td>{f['attribution']:+.4g}</td><td>"
            + html.escape(", ".join(f"{p['token']!r}:{p['activation']:.3g}" for p in f["positions"][:6]))
            + "</td><td>" + html.escape(" ".join(t for t, _ in f.get("summary", {}).get("logits_pos", [])[:5]))
            + "</td></tr>" for f in features.features)
        feats = (f"<h2>SAE features at {html.escape(features.site)}</h2><p>error share "
                 f"{100 * features.error_share:.1f}%</p><table><tr><th>latent</th><th>attribution</th>"
                 f"<th>fires on</th><th>promotes</th></tr>{rows}</table>")
    blob = json.dumps(data).replace("</", "<\\/")
    return _PAGE.replace("__DETAILS__", details).replace("__FEATURES__", feats).replace("__DATA__", blob)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gemmakit explain</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:980px}
#text{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ddd;padding:12px}
.seg{padding:1px 0}.target{color:#555}.span{color:#000;font-weight:bold;outline:2px solid #b8860b}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 10px;text-align:left;vertical-align:top}
</style></head><body>
<h1>Sequence salience</h1>
<label>intensity <input id="gain" type="range" min="0.2" max="5" step="0.1" value="1"></label>
<div id="text"></div>
<h2>Details</h2><table>__DETAILS__</table>
__FEATURES__
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const hue = (s) => D.signed ? (s >= 0 ? [38,150,80] : [206,52,52]) : [124,77,204];
function draw(){
  const gain = Number(document.getElementById("gain").value);
  const prompt = D.segments.filter(s => !s.target);
  const scale = Math.max(1e-30, ...prompt.map(s => Math.abs(s.score)));
  const box = document.getElementById("text");
  box.textContent = "";
  for (const s of D.segments){
    const el = document.createElement("span");
    el.className = "seg" + (s.target ? " target" : "") + (s.span ? " span" : "");
    el.textContent = s.text;
    el.title = s.score.toPrecision(4);
    if (!s.target){
      const a = Math.min(1, gain * Math.abs(s.score) / scale);
      const c = hue(s.score).map(v => Math.round(255 + (v - 255) * a));
      el.style.background = "rgb(" + c.join(",") + ")";
    }
    box.appendChild(el);
  }
}
document.getElementById("gain").addEventListener("input", draw);
draw();
</script></body></html>
"""


def result_json(result: Salience, granularity: str, features: FeatureAttribution | None = None) -> dict[str, Any]:
    out = result.to_dict(granularity)
    if features is not None:
        out["features"] = features.to_dict()
    return out
