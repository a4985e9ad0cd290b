// gemmakit's chat page: streams /v1/chat/completions, keeps the conversation, stops on request.
// No build step and no dependencies: the page is plain DOM code served from the package.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // {role, content} of finished turns
let controller = null;       // AbortController of the running request: aborting closes the connection,
                             // which cancels the request on the server and frees its slot
let info = { model: "default" };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// Fenced code blocks (```lang ... ```) become <pre><code>; inline `code` becomes <code>; the rest stays text.
function render(text) {
  const parts = text.split(/```/);
  return parts.map((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const body = newline >= 0 && /^[\w+-]*$/.test(part.slice(0, newline)) ? part.slice(newline + 1) : part;
      return "<pre><code>" + escapeHtml(body) + "</code></pre>";
    }
    return escapeHtml(part).replace(/`([^`\n]+)`/g, "<code>$1</code>");
  }).join("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.innerHTML = '<div class="role"></div><div class="content"></div><div class="meta"></div>';
  div.querySelector(".role").textContent = role === "user" ? "you" : role === "assistant" ? info.model : role;
  div.querySelector(".content").innerHTML = render(text || "");
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function number(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? undefined : parse(v);
}

function showVerdicts(div, verdicts) {
  if (!verdicts || !verdicts.length) return;
  const meta = div.querySelector(".meta");
  for (const v of verdicts) {
    const span = document.createElement("span");
    span.className = "verdict" + (v.flagged && v.flagged.length ? " flagged" : "");
    span.textContent = `guard ${v.stage}: ${v.policy} ${Number(v.score).toFixed(2)}` + (v.blocked ? " (blocked)" : "");
    meta.appendChild(span);
  }
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history, { role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const body = {
    model: info.model, messages, stream: true, stream_options: { include_usage: true },
    temperature: number("temperature", parseFloat), top_p: number("top_p", parseFloat),
    top_k: number("top_k", (v) => parseInt(v, 10)), max_tokens: number("max_tokens", (v) => parseInt(v, 10)),
    seed: number("seed", (v) => parseInt(v, 10)),
  };
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let reply = "", first = null, usage = null, finish = null, verdicts = null;
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                            body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const err = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(`${response.status}: ${err.error ? err.error.message : response.statusText}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            if (first === null) first = performance.now();
            reply += choice.delta.content;
            div.querySelector(".content").innerHTML = render(reply);
            $("messages").scrollTop = $("messages").scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (chunk.guard) verdicts = chunk.guard;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      div.classList.add("error");
      div.querySelector(".content").textContent = String(e.message || e);
      finish = "error";
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    div.classList.remove("streaming");
    div.dataset.finish = finish || "";
  }
  const elapsed = (performance.now() - (first || started)) / 1000;
  const tokens = usage ? usage.completion_tokens : null;
  const parts = [finish ? `finish: ${finish}` : ""];
  if (tokens !== null) parts.push(`${tokens} tokens`);
  if (tokens && elapsed > 0) parts.push(`${(tokens / elapsed).toFixed(1)} tok/s`);
  if (first !== null) parts.push(`first token ${((first - started) / 1000).toFixed(2)} s`);
  div.querySelector(".meta").textContent = parts.filter(Boolean).join(" · ");
  showVerdicts(div, verdicts);
  if (finish !== "error") {
    history.push({ role: "user", content: text }, { role: "assistant", content: reply });
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").innerHTML = "";
});
$("api_key").addEventListener("change", () => localStorage.setItem("gemmakit_api_key", $("api_key").value));

async function loadInfo() {
  $("api_key").value = localStorage.getItem("gemmakit_api_key") || "";
  try {
    info = await (await fetch("/ui/info")).json();
  } catch (e) {
    $("status").textContent = "server unreachable";
    return;
  }
  $("model").textContent = info.model;
  $("key-label").hidden = !info.auth;
  $("explore-link").hidden = !info.explore;
  if (info.notice) { $("notice").textContent = info.notice; $("notice").hidden = false; }
  if (info.guard && info.guard.length) {
    $("guard-info").textContent = `Guard on (${info.guard_action}): ${info.guard.join(", ")}`;
    $("guard-info").hidden = false;
  }
  $("status").textContent = info.ready ? `ready · context ${info.context} tokens` : "model loading…";
  if (!info.ready) setTimeout(loadInfo, 2000);
}
loadInfo();
