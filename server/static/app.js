// The chat page: plain JavaScript against this server's own OpenAI API (no build step, nothing
// fetched from anywhere else). Streams answers over SSE with fetch(); the hybrid loop's
// chain-of-thought and condensed prompts (reasoning_content) stream into a collapsible panel.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // the conversation as sent to the API: {role, content}
let controller = null;  // aborts the request in flight

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// An OpenAI error body -> one line, with the HTTP status and Retry-After when there is one.
async function describe(res) {
  let msg = `HTTP ${res.status}`;
  try {
    const body = await res.json();
    if (body.error && body.error.message) msg += `: ${body.error.message}`;
  } catch (e) { /* not JSON: the status says enough */ }
  const retry = res.headers.get("Retry-After");
  if (retry) msg += ` (retry after ${retry} s)`;
  return msg;
}

async function loadModels() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) { showError(`cannot list models: ${await describe(res)}`); return; }
    const { data } = await res.json();
    const sel = $("model");
    const keep = sel.value;
    sel.replaceChildren(...data.map((m) => {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      const meta = m.meta || {};
      o.title = [meta.model_type || meta.arch, meta.quantization, m.max_model_len && `ctx ${m.max_model_len}`]
        .filter(Boolean).join(", ");
      return o;
    }));
    if (keep && data.some((m) => m.id === keep)) sel.value = keep;
    showError("");
  } catch (e) {
    showError(`server unreachable: ${e.message}`);
  }
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.dataset.role = role;
  const content = document.createElement("div");
  content.className = "content";
  div.append(content);
  $("log").append(div);
  return div;
}

function reasoningPanel(div) {
  let d = div.querySelector("details.reasoning");
  if (!d) {
    d = document.createElement("details");
    d.className = "reasoning";
    d.innerHTML = "<summary>Reasoning</summary><pre></pre>";
    div.prepend(d);
  }
  return d.querySelector("pre");
}

function requestBody(text) {
  const body = {
    model: $("model").value, messages: history, stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const effort = $("effort").value;
  if (effort) body.reasoning_effort = effort;
  const loops = $("loops").value.trim();
  if (loops !== "") {
    const n = parseInt(loops, 10);
    body.hybrid = n > 0 ? { enabled: true, loops: n, return_reasoning: true } : { enabled: false };
  }
  return body;
}

function statsLine(usage, t0, tFirst, tEnd, nChunks) {
  const parts = [];
  if (tFirst) parts.push(`TTFT ${((tFirst - t0) / 1000).toFixed(2)} s`);
  const n = usage ? usage.completion_tokens : nChunks;
  const answer = usage && usage.hybrid ? n - usage.hybrid.raw_reasoning_tokens - usage.hybrid.condensed_tokens : n;
  if (tFirst && tEnd > tFirst && answer > 1) parts.push(`${((answer - 1) / ((tEnd - tFirst) / 1000)).toFixed(1)} tok/s`);
  if (usage) {
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    const cached = usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens;
    if (cached) parts.push(`${cached} cached`);
    const h = usage.hybrid;
    if (h) {
      parts.push(`${h.loops} loop(s): ${h.raw_reasoning_tokens} reasoning -> ${h.condensed_tokens} condensed tokens`);
      parts.push(`peak context ${h.peak_context_tokens}`);
    }
  }
  return parts.join(" · ");
}

// Reads an SSE body and calls onEvent(obj) per `data:` JSON event, until [DONE].
async function readSSE(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;  // ": ping" comments keep the connection alive
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  showError("");
  history.push({ role: "user", content: text });
  bubble("user").querySelector(".content").textContent = text;
  const div = bubble("assistant");
  const contentEl = div.querySelector(".content");
  const stats = document.createElement("div");
  stats.className = "stats";
  div.append(stats);
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const t0 = performance.now();
  let tFirst = null, usage = null, chunks = 0, answer = "", failed = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(text)), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await describe(res));
    await readSSE(res, (ev) => {
      if (ev.error) { failed = ev.error.message || "generation failed"; return; }
      if (ev.usage) usage = ev.usage;
      for (const c of ev.choices || []) {
        const d = c.delta || {};
        if (d.reasoning_content) {
          const pre = reasoningPanel(div);
          pre.textContent += d.reasoning_content;
          pre.scrollTop = pre.scrollHeight;
        }
        if (d.content) {
          tFirst = tFirst || performance.now();
          chunks += 1;
          answer += d.content;
          contentEl.textContent = answer;
        }
        for (const t of d.tool_calls || []) {
          const el = document.createElement("div");
          el.className = "tool-call";
          el.textContent = `tool call ${t.function.name}(${t.function.arguments})`;
          div.insertBefore(el, stats);
        }
      }
      $("log").scrollTop = $("log").scrollHeight;
    });
    if (failed) throw new Error(failed);
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    history.pop();  // the turn did not happen: the user can edit and resend
    if (e.name === "AbortError") showError("stopped");
    else showError(e.message.startsWith("HTTP") ? e.message : `request failed: ${e.message}`);
    div.classList.add("failed");
  } finally {
    stats.textContent = statsLine(usage, t0, tFirst, performance.now(), chunks);
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); showError(""); });
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("hybrid-llm-key", $("api-key").value);
  loadModels();
});
$("api-key").value = sessionStorage.getItem("hybrid-llm-key") || "";
loadModels();
