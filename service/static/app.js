// lookalike search page: plain JS, no build step. Talks to /v1/search, /v1/images/{id}/similar, /v1/index.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), drop: $("drop-zone"), file: $("file-input"), k: $("k-select"),
  figure: $("query-figure"), query: $("query-image"), caption: $("query-caption"),
  status: $("status"), error: $("error"), results: $("results"), info: $("index-info"),
};
let queryUrl = null;
let lastFile = null;

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
  els.status.textContent = "";
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

// Turn any failed response into words: the API always answers {"error": {"code", "message"}}.
async function errorMessage(resp) {
  let detail = "";
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) detail = body.error.message;
  } catch (_) { /* not JSON */ }
  const what = {
    400: "The image could not be read", 413: "The image is too large", 415: "This file type is not supported",
    422: "The request was not valid", 503: "The service is busy or starting up; try again in a moment",
  }[resp.status] || `The server answered ${resp.status}`;
  return detail ? `${what}: ${detail}` : `${what}.`;
}

function showQuery(src, caption) {
  els.query.src = src;
  els.caption.textContent = caption;
  els.figure.hidden = false;
}

function renderResults(data) {
  els.results.replaceChildren();
  for (const hit of data.results) {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.testid = "result";
    li.dataset.id = String(hit.id);
    const btn = document.createElement("button");
    btn.type = "button";
    btn.title = `Find images like #${hit.id}`;
    const img = document.createElement("img");
    img.src = hit.image_url;
    img.alt = hit.label ? `${hit.label} (#${hit.id})` : `image #${hit.id}`;
    img.loading = "lazy";
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("div");
    score.className = "score";
    score.dataset.testid = "score";
    score.textContent = `score ${hit.score.toFixed(3)}`;
    const label = document.createElement("div");
    label.className = "label";
    label.dataset.testid = "label";
    label.textContent = hit.label || "(no label)";
    label.title = hit.path;
    meta.append(score, label);
    btn.append(img, meta);
    btn.addEventListener("click", () => searchSimilar(hit));
    li.append(btn);
    els.results.append(li);
  }
  const n = data.results.length;
  els.status.textContent = n
    ? `${n} result${n === 1 ? "" : "s"} in ${Math.round(data.took_ms)} ms`
    : "The index is empty: no results.";
}

async function run(request) {
  clearError();
  els.status.textContent = "Searching…";
  let resp;
  try {
    resp = await request();
  } catch (err) {
    showError("Could not reach the server. Check your connection and try again.");
    return;
  }
  if (!resp.ok) {
    els.results.replaceChildren();
    showError(await errorMessage(resp));
    return;
  }
  renderResults(await resp.json());
}

function searchFile(file) {
  if (!file) return;
  lastFile = file;
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  showQuery(queryUrl, file.name);
  const body = new FormData();
  body.append("file", file);
  body.append("k", els.k.value);
  return run(() => fetch("/v1/search", { method: "POST", body }));
}

function searchSimilar(hit) {
  lastFile = null;
  showQuery(hit.image_url, hit.label ? `${hit.label} (#${hit.id})` : `#${hit.id}`);
  const k = encodeURIComponent(els.k.value);
  return run(() => fetch(`/v1/images/${hit.id}/similar?k=${k}`));
}

async function loadInfo() {
  try {
    const resp = await fetch("/v1/index");
    if (!resp.ok) { els.info.textContent = await errorMessage(resp); return; }
    const info = await resp.json();
    els.info.textContent = `${info.size.toLocaleString()} images indexed · model ${info.model.slice(0, 12)} · ${info.factory}`;
  } catch (_) {
    els.info.textContent = "Could not reach the server.";
  }
}

els.file.addEventListener("change", () => searchFile(els.file.files[0]));
els.k.addEventListener("change", () => { if (lastFile) searchFile(lastFile); });
els.form.addEventListener("submit", (e) => e.preventDefault());
for (const type of ["dragenter", "dragover"]) {
  els.drop.addEventListener(type, (e) => { e.preventDefault(); els.drop.classList.add("dragging"); });
}
for (const type of ["dragleave", "drop"]) {
  els.drop.addEventListener(type, (e) => { e.preventDefault(); els.drop.classList.remove("dragging"); });
}
els.drop.addEventListener("drop", (e) => {
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file) searchFile(file);
});
loadInfo();
