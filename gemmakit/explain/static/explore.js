"use strict";
// The explorer page: talks to the JSON API beside it (<page path>/api). No external resources.
const API = location.pathname.replace(/\/+$/, "") + "/api";
const $ = (id) => document.getElementById(id);
let INFO = null, TARGET = [], SPAN = null, RESULT = null, DRAG = null, RENDERS = 0;

async function call(path, body) {
  const init = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(API + path, init);
  const j = await r.json();
  if (!r.ok) throw new Error(typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail));
  return j;
}
function status(msg, busy) { $("status").textContent = msg; document.body.dataset.busy = busy ? "1" : ""; }
function fail(e) { status("error: " + e.message, false); document.body.dataset.error = e.message; }
function esc(s) { return String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }

const HUES = {pos: [38, 150, 80], neg: [206, 52, 52], mag: [124, 77, 204]};
function shade(score, scale, signed, gain) {
  const a = scale > 0 ? Math.min(1, gain * Math.abs(score) / scale) : 0;
  const h = signed ? (score >= 0 ? HUES.pos : HUES.neg) : HUES.mag;
  return "rgb(" + h.map((v) => Math.round(255 + (v - 255) * a)).join(", ") + ")";
}
function granularity() {
  const g = $("granularity").value;
  return g === "regex" ? ($("regex").value || "\\S+") : g;
}

// --- salience tab -------------------------------------------------------------------------------------------
async function tokenize() {
  const r = await call("/tokenize", {prompt: $("prompt").value, target: $("target").value});
  TARGET = r.target; SPAN = null; RESULT = null;
  drawTarget(); draw();
}
let tokenizeTimer = null;
function retokenize() { clearTimeout(tokenizeTimer); tokenizeTimer = setTimeout(() => tokenize().catch(fail), 350); }

function drawTarget() {
  const box = $("target-tokens");
  box.textContent = "";
  TARGET.forEach((t, i) => {
    const el = document.createElement("span");
    el.className = "tok" + (SPAN && i >= SPAN[0] && i < SPAN[1] ? " sel" : "");
    el.dataset.i = i;
    el.textContent = t === "" ? "\u200b" : t;
    box.appendChild(el);
  });
}
function tokenAt(node) { return node && node.dataset && node.dataset.i !== undefined ? Number(node.dataset.i) : null; }
$("target-tokens").addEventListener("mousedown", (e) => {
  const i = tokenAt(e.target);
  if (i === null) return;
  DRAG = i; SPAN = [i, i + 1]; drawTarget(); e.preventDefault();
});
$("target-tokens").addEventListener("mouseover", (e) => {
  const i = tokenAt(e.target);
  if (DRAG === null || i === null) return;
  SPAN = [Math.min(DRAG, i), Math.max(DRAG, i) + 1]; drawTarget();
});
document.addEventListener("mouseup", () => {
  if (DRAG === null) return;
  DRAG = null; explain().catch(fail);
});

async function explain() {
  if (!SPAN) return;
  const method = $("method").value, t0 = performance.now();
  status("computing " + method + " ...", true);
  RESULT = await call("/salience", {prompt: $("prompt").value, target: $("target").value, span: SPAN, method,
                                    granularity: granularity()});
  draw();
  status(method + " in " + Math.round(performance.now() - t0) + " ms", false);
  if (INFO && INFO.sae) spanFeatures().catch(fail);
}

function draw() {
  const box = $("prompt-view");
  box.textContent = "";
  if (!RESULT) { box.textContent = $("prompt").value; $("details").textContent = ""; $("legend").textContent = ""; return; }
  const R = RESULT, gain = Number($("gain").value);
  const spanStart = R.prompt_tokens + R.span[0], spanEnd = R.prompt_tokens + R.span[1];
  // the colour scale: the largest |segment score| among segments that hold only scored tokens
  const scored = new Set();
  R.segment_of.forEach((s, i) => { if (i < spanStart) scored.add(s); });
  R.segment_of.forEach((s, i) => { if (i >= spanStart) scored.delete(s); });
  const scale = Math.max(0, ...[...scored].map((s) => Math.abs(R.segment_scores[s])));
  R.tokens.forEach((t, i) => {
    const el = document.createElement("span"), seg = R.segment_of[i];
    el.className = "tok" + (i >= spanStart && i < spanEnd ? " in-span" : "") + (i >= R.prompt_tokens ? " target" : "");
    el.dataset.seg = seg;
    el.textContent = t === "" ? "\u200b" : t;
    if (scored.has(seg)) {
      el.style.background = shade(R.segment_scores[seg], scale, R.signed, gain);
      el.title = R.granularity + " score " + R.segment_scores[seg].toPrecision(4) + " (token " + R.scores[i].toPrecision(4) + ")";
    }
    box.appendChild(el);
  });
  $("legend").textContent = R.signed ? "green: raises log p(span), red: lowers it" : "shade: gradient norm";
  const d = R.details, parts = ["log p(span) = " + R.target_logprob.toFixed(4), "weights: " + d.weights];
  if (d.completeness_error !== undefined)
    parts.push("completeness error " + (100 * d.completeness_error).toFixed(3) + "% after " + d.steps_used + " steps");
  $("details").textContent = parts.join(" · ");
  document.body.dataset.rendered = String(++RENDERS);
}

async function spanFeatures() {
  const r = await call("/attribute", {prompt: $("prompt").value, target: $("target").value, span: SPAN, top: 8});
  $("span-features").innerHTML = "<h3>SAE features at " + esc(r.site) + " carrying the span</h3><p class='small'>error share " +
    (100 * r.error_share).toFixed(1) + "% of the site's attribution</p><table><tr><th>feature</th><th>attribution</th><th>fires on</th></tr>" +
    r.features.map((f) => "<tr><td><span class='feat' data-f='" + f.feature + "'>#" + f.feature + "</span></td><td>" +
      f.attribution.toPrecision(3) + "</td><td>" + esc(f.positions.slice(0, 5).map((p) => JSON.stringify(p.token)).join(" ")) +
      "</td></tr>").join("") + "</table>";
}

// --- SAE tab ------------------------------------------------------------------------------------------------
let ROWS = [];
async function saeFeatures() {
  const r = await call("/features", {text: $("sae-text").value, top: 5});
  ROWS = r.rows;
  const peak = Math.max(1e-9, ...ROWS.map((row) => row.features.length ? row.features[0][1] : 0));
  const box = $("sae-tokens");
  box.textContent = "";
  ROWS.forEach((row, i) => {
    const el = document.createElement("span");
    el.className = "tok"; el.dataset.row = i;
    el.textContent = row.token;
    const a = row.features.length ? Math.min(1, row.features[0][1] / peak) : 0;
    el.style.background = "rgba(230, 120, 30, " + a.toFixed(2) + ")";
    el.addEventListener("click", () => showRow(i));
    box.appendChild(el);
  });
  $("sae-rows").innerHTML = "<p class='small'>click a token for its features</p>";
}
function showRow(i) {
  const row = ROWS[i];
  $("sae-rows").innerHTML = "<h3>Token " + esc(JSON.stringify(row.token)) + "</h3>" + (row.features.length ?
    "<table>" + row.features.map((f) => "<tr><td><span class='feat' data-f='" + f[0] + "'>#" + f[0] + "</span></td><td>" +
      f[1] + "</td></tr>").join("") + "</table>" : "<p class='small'>no feature fires here</p>");
}
function context(ex) {
  const m = Math.max(1e-9, ...ex.acts);
  return "<div class='ctx'>" + ex.tokens.map((t, i) => "<span style='background:rgba(230,120,30," +
    Math.min(1, ex.acts[i] / m).toFixed(2) + ")'>" + esc(t) + "</span>").join("") + " <span class='small'>max " + ex.max + "</span></div>";
}
async function card(feature) {
  selectTab("sae");
  const c = await call("/feature/" + feature);
  let h = "<h3>Feature #" + c.feature + " at " + esc(c.site) + "</h3>";
  if (c.density !== undefined) h += "<p>density " + (100 * c.density).toFixed(3) + "% of tokens · max activation " + c.max_activation.toFixed(3) + "</p>";
  h += "<div class='row'><div><b>promotes</b><table>" + c.logits_pos.map((p) => "<tr><td>" + esc(JSON.stringify(p[0])) +
    "</td><td class='pos'>" + p[1] + "</td></tr>").join("") + "</table></div><div><b>suppresses</b><table>" +
    c.logits_neg.map((p) => "<tr><td>" + esc(JSON.stringify(p[0])) + "</td><td class='neg'>" + p[1] + "</td></tr>").join("") + "</table></div>";
  if (c.histogram && c.histogram.counts.length) {
    const top = Math.max(...c.histogram.counts);
    h += "<div><b>activations</b><div style='display:flex;align-items:flex-end;height:80px;gap:1px'>" +
      c.histogram.counts.map((n) => "<div title='" + n + "' style='width:8px;background:#4a7bd0;height:" + (80 * n / top).toFixed(1) + "px'></div>").join("") + "</div></div>";
  }
  h += "</div>";
  if (c.top) h += "<h3>Top activating contexts</h3>" + (c.top.length ? c.top.map(context).join("") : "<p class='small'>never fires in the store</p>");
  else h += "<p class='small'>start with --store for density and top-activating contexts</p>";
  $("card").innerHTML = h;
  $("steer-box").hidden = false;
  $("steer-feature").textContent = "#" + c.feature;
  $("steer-box").dataset.f = c.feature;
}
async function steer() {
  status("steering ...", true);
  const r = await call("/steer", {prompt: $("steer-prompt").value, feature: Number($("steer-box").dataset.f),
                                  value: Number($("steer-value").value), mode: $("steer-mode").value,
                                  max_new_tokens: Number($("steer-n").value)});
  $("steer-out").innerHTML = "<tr><th>default</th><td>" + esc(r.prompt + r.default) + "</td></tr><tr><th>" + esc(r.mode) +
    " " + r.value + "</th><td id='steered'>" + esc(r.prompt + r.steered) + "</td></tr>";
  status("", false);
}

// --- wiring -------------------------------------------------------------------------------------------------
function selectTab(name) {
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("on", b.dataset.tab === name));
  $("tab-salience").hidden = name !== "salience";
  $("tab-sae").hidden = name !== "sae";
}
document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => selectTab(b.dataset.tab)));
document.addEventListener("click", (e) => {
  const f = e.target.dataset && e.target.dataset.f;
  if (f !== undefined && e.target.classList.contains("feat")) card(Number(f)).catch(fail);
});
$("prompt").addEventListener("input", retokenize);
$("target").addEventListener("input", retokenize);
$("method").addEventListener("change", () => explain().catch(fail));
$("granularity").addEventListener("change", () => { $("regex").hidden = $("granularity").value !== "regex"; explain().catch(fail); });
$("regex").addEventListener("change", () => explain().catch(fail));
$("gain").addEventListener("input", draw);
$("generate").addEventListener("click", async () => {
  try {
    status("generating ...", true);
    const r = await call("/generate", {prompt: $("prompt").value, max_new_tokens: Number($("gen-n").value)});
    $("target").value = r.target;
    await tokenize();
    SPAN = [0, TARGET.length]; drawTarget();
    await explain();
  } catch (e) { fail(e); }
});
$("sae-go").addEventListener("click", () => saeFeatures().catch(fail));
$("steer-go").addEventListener("click", () => steer().catch(fail));

(async () => {
  INFO = await call("/info");
  $("model").textContent = INFO.model;
  $("method").innerHTML = INFO.methods.map((m) => "<option>" + m + "</option>").join("");
  $("granularity").innerHTML = INFO.granularities.map((g) => "<option>" + g + "</option>").join("") + "<option value='regex'>regex…</option>";
  $("sae-info").textContent = INFO.sae ? INFO.sae.architecture + " SAE at " + INFO.sae.site + ", " + INFO.sae.d_sae +
    " latents" + (INFO.sae.store ? "; store " + INFO.sae.store : "") : "No SAE loaded: start the explorer with --sae PATH.";
  $("sae-go").disabled = !INFO.sae;
  await tokenize();
  document.body.dataset.ready = "1";
})().catch(fail);
