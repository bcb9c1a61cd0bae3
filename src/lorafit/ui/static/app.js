// lorafit ui: the runs under --runs, their loss curves (live while they train), stop and resume.
"use strict";
const TOKEN = document.querySelector('meta[name="lorafit-token"]').content;
const COLOURS = ["#0a84ff", "#ff9f0a", "#30d158", "#bf5af2", "#ff375f", "#64d2ff", "#ac8e68"];
const curves = new Map();   // run name -> {train: [[step, loss]], valid: [[step, loss]], source: EventSource}
const plotted = new Set();  // runs overlaid on the chart
let views = [];             // the runs as /api/runs last described them
let chart = null;

function say(text) { document.getElementById("message").textContent = text || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({"X-Lorafit-Token": TOKEN}, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, {headers}));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || body.error || response.statusText);
  return body;
}

function follow(name) {
  // Every metrics line from the first, then each new one as the run writes it.
  if (curves.has(name)) return;
  const curve = {train: [], valid: [], source: null};
  curves.set(name, curve);
  const source = new EventSource(`/api/runs/${encodeURIComponent(name)}/stream`);
  curve.source = source;
  source.addEventListener("metric", (event) => {
    const record = JSON.parse(event.data);
    if (typeof record.loss === "number") curve.train.push([record.step, record.loss]);
    if (typeof record.valid_loss === "number") curve.valid.push([record.step, record.valid_loss]);
    scheduleDraw();
  });
  source.addEventListener("status", (event) => {
    const view = JSON.parse(event.data);
    views = views.map((v) => (v.name === view.name ? view : v));
    renderRuns();
  });
}

let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; draw(); });
}

function draw() {
  const names = [...plotted].filter((n) => curves.has(n));
  const tables = [], series = [{label: "step"}];
  let points = 0;
  names.forEach((name, index) => {
    const curve = curves.get(name), colour = COLOURS[index % COLOURS.length];
    for (const [kind, rows] of [["train", curve.train], ["valid", curve.valid]]) {
      const byStep = new Map(rows);  // a step logged twice keeps its last value
      const steps = [...byStep.keys()].sort((a, b) => a - b);
      tables.push([steps, steps.map((s) => byStep.get(s))]);
      points += steps.length;
      series.push(kind === "train"
        ? {label: `${name} train`, stroke: colour, width: 1.6, spanGaps: true}
        : {label: `${name} validation`, stroke: colour, width: 0, dash: [4, 4], spanGaps: true,
           points: {show: true, size: 7, fill: colour}});
    }
  });
  const element = document.getElementById("chart");
  element.dataset.points = String(points);
  if (chart) { chart.destroy(); chart = null; }
  if (!tables.length) { element.textContent = "Tick a run to plot its loss."; return; }
  element.textContent = "";
  const data = uPlot.join(tables);
  chart = new uPlot({width: Math.max(element.clientWidth, 480), height: 360, series,
                     scales: {x: {time: false}}, axes: [{label: "optimizer step"}, {label: "loss (nats/token)"}]},
                    data, element);
}

function cell(text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }

function renderRuns() {
  const body = document.querySelector("#runs tbody");
  body.textContent = "";
  for (const view of views) {
    const row = document.createElement("tr");
    row.dataset.run = view.name;
    row.dataset.status = view.status;
    const tick = document.createElement("input");
    tick.type = "checkbox";
    tick.checked = plotted.has(view.name);
    tick.setAttribute("aria-label", `plot ${view.name}`);
    tick.addEventListener("change", () => {
      if (tick.checked) { plotted.add(view.name); follow(view.name); } else plotted.delete(view.name);
      scheduleDraw();
    });
    const pick = document.createElement("td"); pick.append(tick); row.append(pick);
    const name = document.createElement("td");
    const link = document.createElement("a"); link.className = "run-name"; link.textContent = view.name;
    link.addEventListener("click", () => showRun(view.name)); name.append(link); row.append(name);
    const status = document.createElement("td");
    const badge = document.createElement("span"); badge.className = `status ${view.status}`; badge.textContent = view.status;
    status.append(badge); row.append(status);
    row.append(cell(`${view.steps}${view.max_steps ? " / " + view.max_steps : ""}`, "num"));
    const ppl = view.valid_ppl_after != null ? `${view.valid_ppl_before.toFixed(2)} → ${view.valid_ppl_after.toFixed(2)}` : "";
    row.append(cell(ppl, "num"));
    const actions = document.createElement("td");
    actions.append(...runActions(view));
    row.append(actions);
    body.append(row);
  }
}

function runActions(view) {
  const out = [];
  if (view.status === "running") out.push(button("Stop", () => act(view.name, "stop")));
  if (view.status === "stopped") out.push(button("Resume", () => act(view.name, "resume")));
  if (view.has_report) {
    const link = document.createElement("a");
    link.href = `/runs/${encodeURIComponent(view.name)}/report`; link.textContent = "report"; link.target = "_blank";
    out.push(link);
  }
  return out;
}

function button(label, handler) {
  const b = document.createElement("button"); b.textContent = label; b.addEventListener("click", handler); return b;
}

async function act(name, action) {
  try {
    const result = await api(`/api/runs/${encodeURIComponent(name)}/${action}`, {method: "POST"});
    say(action === "stop" ? `Stopping ${name}: it finishes its step and writes a checkpoint.`
                          : `Resumed ${name}: ${result.command}`);
  } catch (error) { say(`${action} ${name}: ${error.message}`); }
  setTimeout(refresh, 800);
}

async function showRun(name) {
  const detail = await api(`/api/runs/${encodeURIComponent(name)}`);
  const panel = document.getElementById("detail-panel");
  panel.hidden = false;
  document.getElementById("detail-title").textContent = name;
  document.getElementById("detail-config").textContent = detail.config_yaml;
  const figures = document.getElementById("detail-figures");
  figures.textContent = "";
  const summary = detail.summary || {}, data = summary.data || detail.data || {};
  const parts = [
    ["status", detail.run.status],
    ["trainable parameters", summary.trainable_parameters ? summary.trainable_parameters.trainable.toLocaleString() : "-"],
    ["train documents", data.train_documents != null ? data.train_documents : "-"],
    ["train tokens", summary.train_tokens != null ? summary.train_tokens.toLocaleString() : "-"],
    ["tokens/s", summary.tokens_per_second != null ? summary.tokens_per_second.toFixed(0) : "-"],
  ];
  for (const [label, value] of parts) {
    const span = document.createElement("span"); span.textContent = `${label}: ${value}`; figures.append(span);
  }
  const actions = document.getElementById("detail-actions");
  actions.textContent = ""; actions.append(...runActions(detail.run));
}

function fillCompareChoices() {
  for (const id of ["compare-a", "compare-b"]) {
    const select = document.getElementById(id), kept = select.value;
    const names = views.map((v) => v.name);
    if ([...select.options].map((o) => o.value).join() === names.join()) continue;
    select.textContent = "";
    for (const name of names) { const o = document.createElement("option"); o.value = o.textContent = name; select.append(o); }
    if (names.includes(kept)) select.value = kept;
    else if (id === "compare-b" && names.length > 1) select.value = names[1];
  }
}

function shown(value) {
  if (value == null) return "-";
  if (typeof value === "number") return Number.isInteger(value) ? value.toLocaleString() : value.toFixed(3);
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function table(header, rows, id) {
  const t = document.createElement("table"); t.id = id;
  const head = document.createElement("tr");
  for (const h of header) { const th = document.createElement("th"); th.textContent = h; head.append(th); }
  t.append(head);
  for (const row of rows) {
    const tr = document.createElement("tr");
    row.forEach((value, i) => { const td = cell(i ? shown(value) : value, i ? "num" : ""); tr.append(td); });
    if (row.length === 3 && shown(row[1]) !== shown(row[2])) tr.lastChild.classList.add("differs");
    t.append(tr);
  }
  return t;
}

async function compare() {
  const a = document.getElementById("compare-a").value, b = document.getElementById("compare-b").value;
  try {
    const result = await api(`/api/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
    const panel = document.getElementById("comparison");
    panel.textContent = "";
    const title = document.createElement("h3"); title.textContent = "Figures"; panel.append(title);
    panel.append(table(["", ...result.runs], result.figures, "compare-figures"));
    const config = document.createElement("h3");
    config.textContent = `Config keys that differ (${result.config_differences.length})`;
    panel.append(config, table(["key", ...result.runs], result.config_differences, "compare-config"));
    plotted.clear(); plotted.add(a); plotted.add(b); follow(a); follow(b); renderRuns(); scheduleDraw();
  } catch (error) { say(`compare: ${error.message}`); }
}
document.getElementById("compare-button").addEventListener("click", compare);

function showReports(names) {
  const holder = document.getElementById("eval-reports");
  holder.textContent = names.length ? "lorafit eval reports: " : "";
  for (const name of names) {
    const link = document.createElement("a");
    link.href = `/runs/${encodeURIComponent(name)}/report`; link.textContent = name; link.target = "_blank";
    link.className = "eval-report";
    holder.append(link, " ");
  }
}

async function refresh() {
  try {
    const listing = await api("/api/runs");
    views = listing.runs;
    fillCompareChoices();
    showReports(listing.reports || []);
    if (!plotted.size && views.length) { plotted.add(views[views.length - 1].name); }
    for (const name of plotted) follow(name);
    renderRuns();
    scheduleDraw();
  } catch (error) { say(`runs: ${error.message}`); }
}

refresh();
setInterval(refresh, 3000);  // new runs started from a shell appear without a reload

// --- the new-run form, built from the config's fields (GET /api/form) ---------------------------
let formFields = [];

function fieldInput(field) {
  let input;
  if (field.kind === "boolean") {
    input = document.createElement("input"); input.type = "checkbox"; input.checked = Boolean(field.default);
  } else if (field.kind === "choice") {
    input = document.createElement("select");
    for (const choice of field.choices) {
      const option = document.createElement("option"); option.value = option.textContent = String(choice);
      input.append(option);
    }
    input.value = String(field.default);
  } else {
    input = document.createElement("input"); input.type = "text";
    input.value = field.default == null ? "" : String(field.default);
    if (field.key === "data.train" || field.key === "data.valid") input.setAttribute("list", "data-choices");
  }
  input.name = field.key; input.id = `field-${field.key}`; input.dataset.kind = field.kind;
  return input;
}

async function loadForm() {
  const form = await api("/api/form");
  formFields = form.fields;
  const choices = document.getElementById("data-choices");
  for (const path of form.data_choices) { const o = document.createElement("option"); o.value = path; choices.append(o); }
  document.getElementById("processes-label").hidden = !form.launcher;
  const sections = document.getElementById("form-sections");
  const bySection = new Map();
  for (const field of formFields) {
    if (!bySection.has(field.section)) bySection.set(field.section, []);
    bySection.get(field.section).push(field);
  }
  for (const [section, fields] of bySection) {
    const fieldset = document.createElement("fieldset");
    const details = document.createElement("details");
    details.open = section === "model" || section === "data";
    const summary = document.createElement("summary"); summary.textContent = section; details.append(summary);
    for (const field of fields) {
      const row = document.createElement("div"); row.className = "field"; row.dataset.key = field.key;
      const label = document.createElement("label"); label.textContent = field.key; label.htmlFor = `field-${field.key}`;
      const cellInput = document.createElement("div");
      const error = document.createElement("div"); error.className = "error"; error.dataset.for = field.key;
      cellInput.append(fieldInput(field), error);
      const help = document.createElement("div"); help.className = "help";
      help.textContent = `${field.description} (default: ${JSON.stringify(field.default)})`;
      row.append(label, cellInput, help);
      details.append(row);
    }
    fieldset.append(details); sections.append(fieldset);
  }
  document.getElementById("check-button").addEventListener("click", () => submitForm("/api/check"));
  document.getElementById("preview-button").addEventListener("click", () => submitForm("/api/preview"));
  document.getElementById("start-button").addEventListener("click", () => submitForm("/api/runs"));
}

function formBody() {
  const values = {};
  for (const field of formFields) {
    const input = document.getElementById(`field-${field.key}`);
    values[field.key] = field.kind === "boolean" ? input.checked : input.value;
  }
  return {name: document.getElementById("run-name").value.trim(), values,
          processes: Number(document.getElementById("processes").value || 1)};
}

function showErrors(errors) {
  for (const element of document.querySelectorAll(".error")) element.textContent = "";
  for (const row of document.querySelectorAll(".field.invalid")) row.classList.remove("invalid");
  for (const [key, message] of Object.entries(errors || {})) {
    const slot = document.querySelector(`.error[data-for="${CSS.escape(key)}"]`);
    if (slot) slot.textContent = message;
    const row = document.querySelector(`.field[data-key="${CSS.escape(key)}"]`);
    if (row) { row.classList.add("invalid"); row.closest("details").open = true; }
    if (!slot) say(`${key}: ${message}`);
  }
}

function showPreview(result) {
  const panel = document.getElementById("preview");
  panel.textContent = "";
  const title = document.createElement("h3");
  title.textContent = result.kind === "documents"
    ? `The first documents of ${result.files} file(s), as extracted`
    : `The first examples (${result.format}, template: ${result.template}); highlighted: the tokens the loss is taken on`;
  panel.append(title);
  for (const item of result.items) {
    const source = document.createElement("div"); source.className = "help"; source.textContent = item.source;
    const pre = document.createElement("pre");
    if (result.kind === "documents") pre.textContent = item.text;
    else for (const [text, trained] of item.segments) {
      const span = document.createElement("span"); span.className = trained ? "trained" : "context";
      span.textContent = text; pre.append(span);
    }
    panel.append(source, pre);
  }
}

async function submitForm(path) {
  const response = await fetch(path, {method: "POST", body: JSON.stringify(formBody()),
    headers: {"Content-Type": "application/json", "X-Lorafit-Token": TOKEN}});
  const body = await response.json().catch(() => ({}));
  if (response.status === 422) { showErrors(body.errors); say("Fix the fields marked in red."); return; }
  if (!response.ok) { say(body.detail || body.error || response.statusText); return; }
  showErrors({});
  if (path === "/api/preview") { showPreview(body); say(""); return; }
  document.getElementById("command").textContent = body.command;
  if (path === "/api/runs") {
    say(`Started ${body.name}: ${body.command}`);
    plotted.add(body.name);
    setTimeout(refresh, 1000);
  } else say("The config is valid.");
}

loadForm().catch((error) => say(`form: ${error.message}`));

// --- chat: the base and up to three adapters answer one prompt (lorafit serve's app under /serve) ---
let chatModels = [];

async function loadChatChoices() {
  const choices = await api("/api/chat/choices");
  const holder = document.getElementById("chat-adapters");
  holder.textContent = "adapters:";
  for (const name of choices.adapters) {
    const label = document.createElement("label");
    const box = document.createElement("input"); box.type = "checkbox"; box.value = name; box.name = "chat-adapter";
    box.addEventListener("change", () => {
      const ticked = document.querySelectorAll('input[name="chat-adapter"]:checked');
      if (ticked.length > choices.max_adapters) { box.checked = false; say(`At most ${choices.max_adapters} adapters.`); }
    });
    label.append(box, ` ${name}`); holder.append(label);
  }
}

async function loadChatModels() {
  const adapters = [...document.querySelectorAll('input[name="chat-adapter"]:checked')].map((b) => b.value);
  const base = document.getElementById("chat-base").value;
  const loaded = document.getElementById("chat-loaded");
  loaded.textContent = "loading...";
  try {
    const result = await api("/api/chat/models", {method: "POST", body: JSON.stringify({base, adapters}),
                                                  headers: {"Content-Type": "application/json"}});
    chatModels = result.models;
    loaded.textContent = `loaded: ${chatModels.join(", ")}`;
  } catch (error) { loaded.textContent = ""; say(`chat: ${error.message}`); }
}

async function askOne(model, prompt, maxTokens) {
  const response = await fetch("/serve/v1/chat/completions", {method: "POST",
    headers: {"Content-Type": "application/json", "X-Lorafit-Token": TOKEN},
    body: JSON.stringify({model, messages: [{role: "user", content: prompt}], max_tokens: maxTokens, temperature: 0})});
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.message) || body.error || response.statusText);
  return body.choices[0].message.content;
}

async function askAll() {
  const prompt = document.getElementById("chat-prompt").value;
  const maxTokens = Number(document.getElementById("chat-max-tokens").value || 64);
  const panel = document.getElementById("chat-answers");
  panel.textContent = "";
  if (!chatModels.length) { say("Load the models first."); return; }
  const boxes = chatModels.map((model, index) => {
    const box = document.createElement("div"); box.className = "answer"; box.dataset.model = model;
    const head = document.createElement("label");
    const pick = document.createElement("input"); pick.type = "radio"; pick.name = "chat-chosen"; pick.value = model;
    pick.checked = index === chatModels.length - 1;
    head.append(pick, ` ${model}`);
    const pre = document.createElement("pre"); pre.textContent = "...";
    box.append(head, pre); panel.append(box);
    return pre;
  });
  // Every model at once: the server's worker decodes them in one continuous batch.
  await Promise.all(chatModels.map(async (model, index) => {
    try { boxes[index].textContent = await askOne(model, prompt, maxTokens); }
    catch (error) { boxes[index].textContent = `error: ${error.message}`; }
    boxes[index].parentElement.dataset.done = "1";
  }));
}

async function saveChat() {
  const answers = {};
  for (const box of document.querySelectorAll("#chat-answers .answer")) answers[box.dataset.model] = box.querySelector("pre").textContent;
  const chosen = (document.querySelector('input[name="chat-chosen"]:checked') || {}).value;
  try {
    const result = await api("/api/chat/save", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({file: document.getElementById("chat-file").value,
                            prompt: document.getElementById("chat-prompt").value, answers, chosen})});
    say(`Saved to ${result.saved} (${result.records} records).`);
  } catch (error) { say(`save: ${error.message}`); }
}

document.getElementById("chat-load").addEventListener("click", loadChatModels);
document.getElementById("chat-ask").addEventListener("click", askAll);
document.getElementById("chat-save").addEventListener("click", saveChat);
loadChatChoices().catch((error) => say(`chat: ${error.message}`));
