// The expert playground: streams a completion from this server's POST /v1/completions and draws,
// from its "routing" extension (expert_routing.py), which experts each token went to.
//
//   GET /health                  -> the model's name, limits, and its routing shape (null: no experts)
//   POST /v1/completions stream  -> one chunk per token: {"choices": [{"text"}], "routing": [entries]}
//   entry = {"index", "token", "text", "prompt", "experts": [L][k], "weights": [L][k]}
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  health: null, // GET /health
  routing: null, // {n_layer, n_expert, top_k, capacity_factor} or null (a model without experts)
  entries: [], // one routing entry per token, prompt first
  counts: [], // [L][E]: tokens of this text each expert took in each layer
  selected: null, // the entry whose grid is shown
  controller: null, // aborts the stream in flight
};

// ------------------------------------------------------------------------------- start-up

async function init() {
  $("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  try {
    const response = await fetch("/health");
    state.health = await response.json();
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
    return;
  }
  state.routing = state.health.routing;
  const limit = state.health.limits.max_new_tokens;
  $("model-info").textContent =
    `Model ${state.health.name} (${state.health.kind}), context ${state.health.context_length} tokens, ` +
    `at most ${limit} new tokens per request.` +
    (state.routing
      ? ` ${state.routing.n_layer} layers, ${state.routing.n_expert} experts, top-${state.routing.top_k}.`
      : "");
  if (!state.routing) {
    $("no-routing").hidden = false;
    $("no-routing").textContent =
      `No routing to show: ${state.health.name} (${state.health.kind}) has no experts. ` +
      "The text still streams.";
    $("routing-panels").hidden = true;
  }
  reset();
}

function reset() {
  state.entries = [];
  state.selected = null;
  state.counts = state.routing
    ? Array.from({ length: state.routing.n_layer }, () => new Array(state.routing.n_expert).fill(0))
    : [];
  $("tokens").replaceChildren();
  $("token-grid").replaceChildren();
  $("grid-token").textContent = "(hover a token)";
  $("prompt-count").textContent = "0";
  $("generated-count").textContent = "0";
  $("error").hidden = true;
  drawHeatmap();
}

// ------------------------------------------------------------------------------- the request

function numberField(id) {
  // An empty field is left out (the server's default); anything else goes as typed, to be checked there.
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function requestBody() {
  const body = {
    model: state.health.name,
    prompt: $("prompt").value,
    max_tokens: numberField("max-tokens"),
    temperature: numberField("temperature"),
    top_p: numberField("top-p"),
    seed: numberField("seed"),
    stream: true,
  };
  if (state.routing) body.return_routing = true;
  return body;
}

async function generate() {
  if (!state.health) return;
  reset();
  state.controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "generating ...";
  let finish = null;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      showError(await errorMessage(response));
      return;
    }
    finish = await readStream(response);
  } catch (err) {
    if (err.name !== "AbortError") showError(`the request failed: ${err.message}`);
    else finish = "stopped";
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    $("status").textContent = finish ? `done (${finish})` : "";
    state.controller = null;
  }
}

async function errorMessage(response) {
  // The API's own words: {"error": {"message": ...}} (OpenAI's shape) or {"error": "..."} (503).
  try {
    const payload = await response.json();
    const error = payload.error;
    return typeof error === "string" ? error : error.message;
  } catch (err) {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

async function readStream(response) {
  // Server-sent events: "data: {...}\n\n" per chunk, then "data: [DONE]". Returns the finish reason.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        showError(chunk.error.message || chunk.error);
        continue;
      }
      finish = chunk.choices[0].finish_reason || finish;
      if (chunk.routing) chunk.routing.forEach(addToken);
      else addText(chunk.choices[0].text);
    }
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

// ------------------------------------------------------------------------------- tokens

function expertColor(expert) {
  const hue = Math.round((360 * expert) / Math.max(1, state.routing.n_expert));
  return `hsl(${hue} 70% 45%)`;
}

function addText(text) {
  // A model without routing: the text arrives as plain pieces.
  if (!text) return;
  const span = document.createElement("span");
  span.className = "token generated";
  span.textContent = text;
  $("tokens").append(span);
  const count = $("tokens").children.length;
  $("generated-count").textContent = String(count);
}

function addToken(entry) {
  state.entries.push(entry);
  const span = document.createElement("span");
  span.className = `token ${entry.prompt ? "prompt" : "generated"}`;
  span.dataset.index = String(entry.index);
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = entry.text;
  const experts = document.createElement("span");
  experts.className = "experts";
  entry.experts.forEach((layer, l) => {
    const row = document.createElement("span");
    row.className = "layer";
    row.title = `layer ${l}: experts ${layer.join(", ")}`;
    layer.forEach((expert) => {
      const chip = document.createElement("i");
      chip.textContent = String(expert);
      chip.style.background = expertColor(expert);
      row.append(chip);
    });
    experts.append(row);
  });
  span.append(text, experts);
  span.addEventListener("mouseenter", () => showGrid(entry));
  span.addEventListener("click", () => showGrid(entry));
  $("tokens").append(span);
  entry.experts.forEach((layer, l) => layer.forEach((expert) => (state.counts[l][expert] += 1)));
  const prompt = state.entries.filter((e) => e.prompt).length;
  $("prompt-count").textContent = String(prompt);
  $("generated-count").textContent = String(state.entries.length - prompt);
  drawHeatmap();
}

// ------------------------------------------------------------------------------- the two grids

function table(rows, columns, cell) {
  // A layer x expert table: cell(l, e, td) fills each cell.
  const grid = document.createElement("table");
  const head = grid.createTHead().insertRow();
  head.append(document.createElement("th"));
  for (let e = 0; e < columns; e++) {
    const th = document.createElement("th");
    th.textContent = `e${e}`;
    head.append(th);
  }
  const body = grid.createTBody();
  for (let l = 0; l < rows; l++) {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.textContent = `layer ${l}`;
    row.append(th);
    for (let e = 0; e < columns; e++) {
      const td = row.insertCell();
      td.className = "cell";
      cell(l, e, td);
    }
  }
  return grid;
}

function showGrid(entry) {
  state.selected = entry;
  document.querySelectorAll(".token.selected").forEach((t) => t.classList.remove("selected"));
  const span = document.querySelector(`.token[data-index="${entry.index}"]`);
  if (span) span.classList.add("selected");
  $("grid-token").textContent = `token ${entry.index}: ${JSON.stringify(entry.text)}`;
  const { n_layer, n_expert } = state.routing;
  const grid = table(n_layer, n_expert, (l, e, td) => {
    const slot = entry.experts[l].indexOf(e);
    const weight = slot === -1 ? 0 : entry.weights[l][slot];
    td.dataset.weight = String(weight);
    td.textContent = weight ? weight.toFixed(2) : "";
    td.style.background = weight ? `rgba(37, 99, 235, ${0.15 + 0.85 * weight})` : "";
    td.title = slot === -1 ? `layer ${l}, expert ${e}: not chosen` : `layer ${l}, expert ${e}: weight ${weight}`;
  });
  grid.id = "token-table";
  $("token-grid").replaceChildren(grid);
}

function drawHeatmap() {
  if (!state.routing) return;
  const { n_layer, n_expert, top_k } = state.routing;
  const tokens = state.entries.length;
  // The capacity of an expert for this many tokens, as the model computes it: ceil(f * N * k / E).
  // A dropless model (no factor) has no limit; its share is then measured against an even split (f = 1).
  const factor = state.routing.capacity_factor ?? 1;
  const capacity = Math.max(1, Math.ceil((factor * tokens * top_k) / n_expert));
  const peak = Math.max(1, ...state.counts.flat());
  const grid = table(n_layer, n_expert, (l, e, td) => {
    const count = state.counts[l][e];
    const share = tokens ? count / capacity : 0;
    td.dataset.count = String(count);
    td.innerHTML = `<b>${count}</b><small>${Math.round(100 * share)}%</small>`;
    td.style.background = count ? `rgba(220, 38, 38, ${0.1 + 0.9 * (count / peak)})` : "";
    td.title = `layer ${l}, expert ${e}: ${count} tokens, ${Math.round(100 * share)}% of its capacity (${capacity})`;
  });
  grid.id = "heatmap-table";
  Array.from(grid.tBodies[0].rows).forEach((row, l) => {
    const total = row.insertCell();
    total.className = "total";
    total.dataset.total = String(state.counts[l].reduce((a, b) => a + b, 0));
    total.textContent = `= ${total.dataset.total}`;
  });
  $("heatmap").replaceChildren(grid);
  const limit = state.routing.capacity_factor
    ? `capacity factor ${factor}: each expert may take ceil(${factor} x ${tokens} x ${top_k} / ${n_expert}) = ${capacity}`
    : `dropless (no capacity limit); % is of an even split, ${tokens} x ${top_k} / ${n_expert} = ${capacity}`;
  $("heatmap-note").innerHTML =
    `<span id="routed-count">${tokens}</span> tokens routed, ${top_k} experts each per layer; ${limit}.`;
}

init();
