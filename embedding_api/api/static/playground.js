// The playground: every number it shows comes from this server's /v1 routes, called with the key
// typed in the page (sent as "Authorization: Bearer <key>"). No other server is ever contacted.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("embedding_api.key") || "", media: [] };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(method, path, body) {
  const headers = {};
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (exc) {
    throw new Error(`${method} /${path}: the server did not answer (${exc.message})`);
  }
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch (exc) { /* not JSON: reported below */ }
  if (!response.ok) {
    const message = data && data.error ? data.error.message : text.slice(0, 300);
    throw new Error(`${method} /${path}: ${response.status} ${message}`);
  }
  return data;
}

function fillSelect(select, models) {
  select.replaceChildren(...models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id;
    return option;
  }));
}

async function loadModels() {
  let list;
  try {
    list = (await api("GET", "v1/models")).data;
  } catch (exc) {
    $("models-note").textContent = "No models listed: enter a valid API key.";
    $("models-note").hidden = false;
    fillSelect($("embed-model"), []);
    fillSelect($("rerank-model"), []);
    showError(exc.message);
    return;
  }
  showError("");
  state.models = list;
  const embedders = list.filter((m) => m.kind !== "reranker");
  const rerankers = list.filter((m) => m.kind === "reranker");
  fillSelect($("embed-model"), embedders);
  fillSelect($("rerank-model"), rerankers);
  $("models-note").hidden = embedders.length > 0;
  $("models-note").textContent = "This server serves no embedding model.";
  $("rerank-controls").hidden = rerankers.length === 0;
  $("rerank-note").hidden = rerankers.length > 0;
  $("rerank-note").textContent = "This server serves no reranker (GET /v1/models lists none), so reranking is off.";
  showModalities();
}

function showModalities() {
  const model = (state.models || []).find((m) => m.id === $("embed-model").value);
  $("embed-modalities").textContent = model && model.modalities ? "takes: " + model.modalities.join(", ") : "";
}

// ------------------------------------------------------------------ inputs

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("video/") ? "video" : file.type.startsWith("image/") ? "image" : null;
    if (!kind) {
      showError(`${file.name}: not an image or a video (${file.type || "unknown type"})`);
      continue;
    }
    state.media.push({ kind, name: file.name, data: await readAsDataURL(file) });
  }
  renderMedia();
}

function renderMedia() {
  $("media").replaceChildren(...state.media.map((item, i) => {
    const li = document.createElement("li");
    li.dataset.kind = item.kind;
    const preview = document.createElement(item.kind === "video" ? "video" : "img");
    preview.src = item.data;
    if (item.kind === "video") preview.muted = true;
    else preview.alt = item.name;
    const name = document.createElement("div");
    name.textContent = item.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "remove";
    remove.addEventListener("click", () => { state.media.splice(i, 1); renderMedia(); });
    li.append(preview, name, remove);
    return li;
  }));
}

// The inputs in order: the text lines, then the files; each with a label and its request form.
function currentItems() {
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  return [
    ...texts.map((t) => ({ kind: "text", label: t.length > 40 ? t.slice(0, 39) + "\u2026" : t, input: t })),
    ...state.media.map((m) => ({ kind: m.kind, label: `[${m.kind}] ${m.name}`, input: { type: m.kind, data: m.data } })),
  ];
}

// ------------------------------------------------------------------ similarity

function cosineMatrix(vectors) {
  const norms = vectors.map((v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0)) || 1);
  return vectors.map((a, i) => vectors.map((b, j) => {
    let dot = 0;
    for (let k = 0; k < a.length; k++) dot += a[k] * b[k];
    return dot / (norms[i] * norms[j]);
  }));
}

function heatColour(value) {
  const v = Math.max(-1, Math.min(1, value));  // blue (-1) .. white (0) .. red (1)
  const strength = Math.round(Math.abs(v) * 70);
  return v >= 0 ? `hsl(5, 80%, ${100 - strength * 0.6}%)` : `hsl(220, 80%, ${100 - strength * 0.6}%)`;
}

function renderMatrix(items, matrix) {
  const table = document.createElement("table");
  table.className = "heat";
  const head = table.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  items.forEach((item) => {
    const th = document.createElement("th");
    th.textContent = item.label;
    th.title = item.label;
    head.appendChild(th);
  });
  const body = table.createTBody();
  matrix.forEach((row, i) => {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.textContent = items[i].label;
    th.title = items[i].label;
    tr.appendChild(th);
    row.forEach((value, j) => {
      const td = tr.insertCell();
      td.className = "cell";
      td.dataset.row = i;
      td.dataset.col = j;
      td.dataset.value = value.toFixed(4);
      td.textContent = value.toFixed(4);
      td.title = `${items[i].label} \u00b7 ${items[j].label}: ${value.toFixed(4)}`;
      td.style.background = heatColour(value);
    });
  });
  $("matrix").replaceChildren(table);
  $("similarity").hidden = false;
}

async function compute() {
  const items = currentItems();
  if (!items.length) return showError("Add texts (one per line) or files first.");
  const button = $("compute");
  button.disabled = true;
  try {
    const answer = await api("POST", "v1/embeddings", {
      model: $("embed-model").value || undefined, input: items.map((i) => i.input), encoding_format: "float",
    });
    const vectors = answer.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
    renderMatrix(items, cosineMatrix(vectors));
    $("matrix").dataset.model = answer.model;
    showError("");
  } catch (exc) {
    showError(exc.message);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ rerank

// The inputs are the documents, less those of a kind the reranker does not take (said on the page).
async function rerank() {
  const items = currentItems();
  const query = $("query").value.trim();
  if (!query) return showError("Type a query to rerank the inputs against.");
  const reranker = (state.models || []).find((m) => m.id === $("rerank-model").value);
  const takes = (reranker && reranker.modalities) || ["text", "image", "video"];
  const kept = items.map((item, i) => ({ item, i })).filter(({ item }) => takes.includes(item.kind));
  const left = items.filter((item) => !takes.includes(item.kind));
  $("rerank-left-out").hidden = !left.length;
  $("rerank-left-out").textContent = left.length
    ? `Left out (the reranker takes ${takes.join(", ")}): ${left.map((item) => item.label).join(", ")}` : "";
  if (!kept.length) return showError("Add texts (one per line) or files to rerank.");
  const button = $("rerank");
  button.disabled = true;
  try {
    const answer = await api("POST", "v1/rerank", {
      model: $("rerank-model").value || undefined, query, documents: kept.map(({ item }) => item.input),
    });
    $("bars").replaceChildren(...answer.results.map((r) => {
      const { item, i } = kept[r.index];
      const li = document.createElement("li");
      li.className = "bar";
      li.dataset.index = i;  // the position among the inputs
      li.dataset.value = r.relevance_score.toFixed(6);
      const label = document.createElement("div");
      label.className = "bar-label";
      label.textContent = item.label;
      const track = document.createElement("div");
      track.className = "bar-track";
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(1, r.relevance_score)) * 100}%`;
      const score = document.createElement("span");
      score.className = "bar-score";
      score.textContent = r.relevance_score.toFixed(4);
      label.append(" ", score);
      track.append(fill);
      li.append(label, track);
      return li;
    }));
    showError("");
  } catch (exc) {
    showError(exc.message);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ wiring

$("api-key").value = state.key;
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem("embedding_api.key", state.key);
  loadModels();
});
$("embed-model").addEventListener("change", showModalities);
$("files").addEventListener("change", (event) => { addFiles([...event.target.files]); event.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) {
    addFiles([...event.dataTransfer.files]);
  } else {
    const text = event.dataTransfer.getData("text/plain").trim();
    if (text) $("texts").value = ($("texts").value.trimEnd() + "\n" + text).trimStart();
  }
});
$("compute").addEventListener("click", compute);
$("rerank").addEventListener("click", rerank);
loadModels();
