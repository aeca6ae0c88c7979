// lookalike search page: plain JS, no build step. Talks to /v1/search, /v1/images/{id}/similar, /v1/index,
// and /v1/feedback (the "right" / "wrong" buttons on each result; they need the API key).
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), drop: $("drop-zone"), file: $("file-input"), k: $("k-select"),
  figure: $("query-figure"), query: $("query-image"), caption: $("query-caption"),
  status: $("status"), error: $("error"), results: $("results"), info: $("index-info"),
  keyBox: $("key-box"), key: $("key-input"),
};
const KEY_STORAGE = "lookalike.apiKey";
let queryUrl = null;
let lastFile = null;
let currentQuery = null;  // the query of the results shown: {id} (an indexed image) or {file} (an upload)
let pendingMark = null;   // a mark waiting for the API key: {hit, verdict, li}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
  els.status.textContent = "";
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

// The API always answers errors as {"error": {"code", "message"}}; {} when the body is not that.
async function readError(resp) {
  try {
    const body = await resp.json();
    return (body && body.error) || {};
  } catch (_) {
    return {};  // not JSON
  }
}

// Turn any failed response into words.
async function errorMessage(resp) {
  const detail = (await readError(resp)).message || "";
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
    btn.className = "open";
    btn.dataset.testid = "open";
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
    li.append(btn, feedbackButtons(hit, li));
    els.results.append(li);
  }
  const n = data.results.length;
  els.status.textContent = n
    ? `${n} result${n === 1 ? "" : "s"} in ${Math.round(data.took_ms)} ms`
    : "The index is empty: no results.";
}

// "right" / "wrong": mark this result for the query shown (POST /v1/feedback).
function feedbackButtons(hit, li) {
  const box = document.createElement("div");
  box.className = "feedback";
  for (const verdict of ["right", "wrong"]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = verdict;
    b.dataset.testid = `mark-${verdict}`;
    b.dataset.verdict = verdict;
    b.setAttribute("aria-pressed", "false");
    b.title = `Mark #${hit.id} as a ${verdict} match for this query`;
    b.addEventListener("click", () => markResult(hit, verdict, li));
    box.append(b);
  }
  return box;
}

let memoryKey = "";  // where the key lives if this browser refuses sessionStorage

function storedKey() {
  try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch (_) { return memoryKey; }
}

function storeKey(key) {
  memoryKey = key;
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  } catch (_) { /* storage disabled: memoryKey keeps it until the page is left */ }
}

function askForKey(mark, message) {
  pendingMark = mark;
  els.keyBox.hidden = false;
  showError(message);
  els.key.focus();
}

async function markResult(hit, verdict, li) {
  const query = currentQuery;
  if (!query) return;
  clearError();
  els.keyBox.hidden = false;
  const key = storedKey();
  if (!key) {
    askForKey({ hit, verdict, li }, "Saving feedback needs the API key: enter it above; the mark is sent when you save it.");
    return;
  }
  const body = new FormData();
  body.append("verdict", verdict);
  body.append("result_id", String(hit.id));
  if (query.file) body.append("file", query.file); else body.append("query_id", String(query.id));
  const buttons = [...li.querySelectorAll(".feedback button")];
  for (const b of buttons) b.disabled = true;
  let resp;
  try {
    resp = await fetch("/v1/feedback", { method: "POST", body, headers: { Authorization: `Bearer ${key}` } });
  } catch (_) {
    showError("Could not reach the server: the feedback was not saved.");
    return;
  } finally {
    for (const b of buttons) b.disabled = false;
  }
  if (resp.ok) {
    li.dataset.verdict = verdict;
    for (const b of buttons) b.setAttribute("aria-pressed", String(b.dataset.verdict === verdict));
    els.status.textContent = `Feedback saved: #${hit.id} marked ${verdict}.`;
    return;
  }
  const err = await readError(resp);
  if (resp.status === 401) {
    storeKey("");
    askForKey({ hit, verdict, li }, "Saving feedback needs the API key (401): enter it above.");
  } else if (resp.status === 403 && err.code === "writes_disabled") {
    els.keyBox.hidden = true;
    showError("This server is read-only (403): feedback cannot be saved here.");
  } else if (resp.status === 403) {
    storeKey("");
    askForKey({ hit, verdict, li }, "The API key was not accepted (403): check it and enter it again.");
  } else {
    const what = resp.status === 404 ? "That image is no longer indexed" : `The server answered ${resp.status}`;
    showError(`Feedback not saved. ${what}${err.message ? `: ${err.message}` : "."}`);
  }
}

function saveKey() {
  const key = els.key.value.trim();
  els.key.value = "";
  if (!key) return;
  storeKey(key);
  clearError();
  els.status.textContent = "API key saved for this tab.";
  const mark = pendingMark;
  pendingMark = null;
  if (mark) markResult(mark.hit, mark.verdict, mark.li);
}

// The newest search wins: each one takes a sequence number and aborts the one before it, and a
// response (or error) that arrives for an older search is dropped. Changing k and at once picking
// another file could otherwise show the new file's error beside the old image's results.
let searchSeq = 0;
let inflight = null;  // AbortController of the search in progress

function clearResults() {
  els.results.replaceChildren();
  currentQuery = null;
}

async function run(request, query) {
  const seq = ++searchSeq;
  if (inflight) inflight.abort();
  const controller = new AbortController();
  inflight = controller;
  const stale = () => seq !== searchSeq;
  clearError();
  els.status.textContent = "Searching…";
  try {
    const resp = await request(controller.signal);
    if (stale()) return;
    if (!resp.ok) {
      const message = await errorMessage(resp);
      if (stale()) return;
      clearResults();
      showError(message);
      return;
    }
    const data = await resp.json();
    if (stale()) return;
    currentQuery = query;
    renderResults(data);
  } catch (err) {
    if (stale()) return;  // aborted by a newer search, or failed after one started
    clearResults();
    showError("Could not reach the server. Check your connection and try again.");
  } finally {
    if (inflight === controller) inflight = null;
  }
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
  return run((signal) => fetch("/v1/search", { method: "POST", body, signal }), { file });
}

function searchSimilar(hit) {
  lastFile = null;
  showQuery(hit.image_url, hit.label ? `${hit.label} (#${hit.id})` : `#${hit.id}`);
  const k = encodeURIComponent(els.k.value);
  return run((signal) => fetch(`/v1/images/${hit.id}/similar?k=${k}`, { signal }), { id: hit.id });
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

els.file.addEventListener("change", () => {
  const file = els.file.files[0];
  // Reset the input, so picking the same file again is a change too and searches again.
  els.file.value = "";
  searchFile(file);
});
els.k.addEventListener("change", () => { if (lastFile) searchFile(lastFile); });
els.form.addEventListener("submit", (e) => e.preventDefault());
els.keyBox.addEventListener("submit", (e) => { e.preventDefault(); saveKey(); });
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
