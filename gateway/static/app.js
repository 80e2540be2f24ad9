// vlmq page: chat completions streamed over fetch + SSE parsing, and a live list of recent jobs.
"use strict";
const $ = (id) => document.getElementById(id);
let imageData = null;  // a data: URL from a dropped or pasted file
let running = null;    // {controller, jobId}

function headers(extra) {
  const h = Object.assign({"Content-Type": "application/json"}, extra || {});
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModels() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (!r.ok) { $("status").textContent = "models: HTTP " + r.status; return; }
  const body = await r.json();
  const select = $("model");
  const current = select.value;
  select.innerHTML = "";
  for (const m of body.data) {
    const o = document.createElement("option");
    o.value = o.textContent = m.id;
    select.appendChild(o);
  }
  if (current) select.value = current;
}

function readImage(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => { imageData = reader.result; $("preview").src = imageData; };
  reader.readAsDataURL(file);
}

function content() {
  const parts = [];
  const url = $("image-url").value.trim() || imageData;
  if (url) parts.push({type: "image_url", image_url: {url: url}});
  parts.push({type: "text", text: $("prompt").value});
  return parts;
}

async function send() {
  $("answer").textContent = "";
  $("job-id").textContent = "-";
  $("status").textContent = "sending";
  const controller = new AbortController();
  running = {controller: controller, jobId: null};
  $("send").disabled = true; $("cancel").disabled = false;
  const body = {model: $("model").value, stream: true, stream_options: {include_usage: true},
                max_tokens: parseInt($("max-tokens").value, 10) || 128,
                messages: [{role: "user", content: content()}]};
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                   body: JSON.stringify(body),
                                                   signal: controller.signal});
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      $("status").textContent = "error " + r.status + ": " + ((err.error || {}).message || "");
      return;
    }
    $("status").textContent = "streaming";
    await readEvents(r.body.getReader());
  } catch (e) {
    $("status").textContent = controller.signal.aborted ? "cancelled" : "error: " + e;
  } finally {
    $("send").disabled = false; $("cancel").disabled = true;
    running = null;
    refreshJobs();
  }
}

async function readEvents(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: "))
        .map((l) => l.slice(6)).join("\n");
      if (data) onData(data);
    }
  }
}

function onData(data) {
  if (data === "[DONE]") { $("status").textContent = "done"; return; }
  const chunk = JSON.parse(data);
  if (chunk.error) { $("status").textContent = "failed: " + chunk.error.message; return; }
  if (running && !running.jobId && chunk.id) {
    running.jobId = chunk.id.replace(/^chatcmpl-/, "");
    $("job-id").textContent = running.jobId;
  }
  for (const choice of chunk.choices || []) {
    if (choice.delta && choice.delta.content) $("answer").textContent += choice.delta.content;
    if (choice.finish_reason) $("status").textContent = "finishing (" + choice.finish_reason + ")";
  }
}

async function cancel() {
  if (!running) return;
  const jobId = running.jobId;
  running.controller.abort();  // the gateway cancels a job whose stream is closed
  if (jobId) await fetch("/v1/jobs/" + jobId + "/cancel", {method: "POST", headers: headers()});
}

function seconds(a, b) { return a && b ? ((b - a).toFixed(2) + " s") : ""; }

async function refreshJobs() {
  const r = await fetch("/v1/jobs?limit=20", {headers: headers()});
  if (!r.ok) return;
  const rows = $("job-rows");
  rows.innerHTML = "";
  for (const j of (await r.json()).data) {
    const tr = document.createElement("tr");
    const cells = [j.job_id.slice(0, 12), j.status, j.model || "", 
                   seconds(j.created_at, j.started_at || j.finished_at),
                   seconds(j.started_at, j.finished_at), j.finish_reason || ""];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    tr.className = j.status;
    tr.dataset.jobId = j.job_id;
    rows.appendChild(tr);
  }
}

function init() {
  $("api-key").value = localStorage.getItem("vlmq-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("vlmq-key", $("api-key").value.trim());
    loadModels(); refreshJobs();
  });
  $("send").addEventListener("click", send);
  $("cancel").addEventListener("click", cancel);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    readImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    for (const item of e.clipboardData.items) {
      if (item.kind === "file") readImage(item.getAsFile());
    }
  });
  loadModels();
  refreshJobs();
  setInterval(refreshJobs, 2000);
}

init();
