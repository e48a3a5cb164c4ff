// jobserver's page: reads the JSON API every few seconds (the job detail long-polls).
// Plain browser JavaScript, no build step, no external resources.
"use strict";

const TOKEN_KEY = "jobserver.token";
const REFRESH_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (selector) => document.querySelector(selector);

const view = { selected: null, detailVersion: null, detailLoop: 0, tasks: [] };

// -- talking to the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.code || "http_error",
      error.message || `${response.status} ${response.statusText}`);
  }
  return { body, response };
}

function showBanner(text) {
  const banner = $("#banner");
  banner.textContent = text || "";
  banner.hidden = !text;
}

function setConnection(state, text) {
  const pill = $("#connection");
  pill.dataset.state = state;
  pill.textContent = text;
}

function explain(error) {
  if (error.status === 401) return "The server needs a token: enter it above.";
  if (error.status === 403) return "This token may not do that: " + error.message;
  return error.message;
}

// -- formatting -----------------------------------------------------------------------

function size(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const negative = bytes < 0;
  let value = Math.abs(bytes);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  const text = unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  return negative ? `−${text}` : text;
}

function cpus(value) { return value === null || value === undefined ? "–" : value.toFixed(2); }

function seconds(total) {
  if (total === null || total === undefined || Number.isNaN(total)) return "–";
  if (total < 1) return `${Math.round(total * 1000)} ms`;
  if (total < 60) return `${total.toFixed(1)} s`;
  const m = Math.floor(total / 60), s = Math.round(total % 60);
  if (m < 60) return `${m}m ${s}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}

function since(iso, until) {
  if (!iso) return null;
  const end = until ? Date.parse(until) : Date.now();
  return Math.max(0, (end - Date.parse(iso)) / 1000);
}

function ago(iso) {
  const value = since(iso);
  return value === null ? "–" : `${seconds(value)} ago`;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function stateBadge(state) { return el("span", { class: `state ${state}` }, state); }

function progressBar(progress) {
  const wrap = el("div", { class: "progress" });
  const fill = el("div", { class: "fill" });
  wrap.append(el("div", { class: "bar" }, fill));
  const label = el("span", { class: "label" });
  wrap.append(label);
  updateProgress(wrap, progress);
  return wrap;
}

function updateProgress(wrap, progress) {
  const fraction = progress && typeof progress.fraction === "number" ? progress.fraction : null;
  wrap.querySelector(".fill").style.width = fraction === null ? "0" : `${Math.round(fraction * 100)}%`;
  const parts = [];
  if (fraction !== null) parts.push(`${Math.round(fraction * 100)}%`);
  if (progress && progress.message) parts.push(progress.message);
  wrap.querySelector(".label").textContent = parts.join(" · ") || "–";
}

// -- the machine ----------------------------------------------------------------------

function renderGauge(id, capacity, used, reserved, free, format) {
  const gauge = $(id);
  const claimed = Math.max(0, capacity - reserved - Math.max(0, free) - used);
  const bar = gauge.querySelector(".bar");
  bar.replaceChildren();
  const pct = (value) => `${capacity > 0 ? Math.min(100, Math.max(0, (value / capacity) * 100)) : 0}%`;
  for (const [name, value] of [["used", used], ["claimed", claimed], ["reserved", reserved]]) {
    const segment = el("span", { class: name, title: `${name}: ${format(value)}` });
    segment.style.width = pct(value); // CSSOM, not a style attribute: allowed by the CSP
    bar.append(segment);
  }
  bar.setAttribute("aria-label",
    `used ${format(used)}, claimed ${format(claimed)}, reserved ${format(reserved)}, free ${format(free)} of ${format(capacity)}`);
  gauge.querySelector(".gauge-numbers").textContent =
    `${format(used)} used · ${format(Math.max(0, free))} free · ${format(capacity)} capacity`;
}

function renderMachine(system) {
  const running = system.running || [];
  const usedCpus = running.reduce((sum, job) => sum + (job.cpus_used || 0), 0);
  const usedMemory = running.reduce((sum, job) => sum + (job.memory_used || 0), 0);
  renderGauge("#gauge-cpu", system.capacity.cpus, usedCpus, system.reserved.cpus, system.free.cpus, cpus);
  renderGauge("#gauge-memory", system.capacity.memory, usedMemory, system.reserved.memory, system.free.memory, size);
  const machine = system.machine || {};
  const pressure = (value) => (value === null || value === undefined ? "not available" : `${value.toFixed(1)}%`);
  const facts = [
    ["Free CPUs (for new jobs)", cpus(system.free.cpus)],
    ["Free memory (for new jobs)", size(system.free.memory)],
    ["Reserved", `${cpus(system.reserved.cpus)} CPU · ${size(system.reserved.memory)}`],
    ["Machine idle CPU", cpus(machine.cpu_idle)],
    ["Machine available memory", size(machine.memory_available)],
    ["Memory pressure (PSI 10 s)", pressure(machine.memory_pressure)],
    ["CPU pressure (PSI 10 s)", pressure(machine.cpu_pressure)],
    ["Job slots", `${running.length} of ${system.max_jobs} in use`],
  ];
  $("#machine-facts").replaceChildren(...facts.map(([name, value]) =>
    el("div", {}, el("dt", {}, name), el("dd", {}, value))));
  const counts = system.jobs || {};
  $("#counts").textContent = `${counts.queued ?? 0} queued · ${counts.running ?? 0} running`;
}

// -- job tables -----------------------------------------------------------------------

function jobRow(job, cells) {
  const row = el("tr", { dataset: { jobId: job.id, state: job.state } });
  if (job.id === view.selected) row.classList.add("selected");
  row.append(el("td", { class: "id", title: job.id }, job.id.slice(-8)));
  for (const cell of cells) row.append(cell);
  row.addEventListener("click", () => openDetail(job.id));
  return row;
}

function fillTable(id, rows) {
  const table = $(id);
  table.querySelector("tbody").replaceChildren(...rows);
  table.parentElement.querySelector(".empty").hidden = rows.length > 0;
  table.hidden = rows.length === 0;
}

function renderRunning(jobs, system) {
  const live = new Map((system.running || []).map((entry) => [entry.id, entry]));
  fillTable("#running", jobs.map((job) => {
    const usage = live.get(job.id) || {};
    return jobRow(job, [
      el("td", {}, job.task),
      el("td", {}, job.progress ? progressBar(job.progress) : (job.cancel_requested ? "cancelling…" : "–")),
      el("td", { class: "opt" }, cpus(usage.cpus_used)),
      el("td", {}, size(usage.memory_used)),
      el("td", { class: "opt" }, seconds(since(job.started_at))),
    ]);
  }));
  $("#running-count").textContent = jobs.length ? `(${jobs.length})` : "";
}

function renderQueue(jobs) {
  fillTable("#queue", jobs.map((job) => jobRow(job, [
    el("td", {}, job.task),
    el("td", { class: "opt" }, job.priority),
    el("td", { class: "reason" }, job.waiting_reason || "–"),
    el("td", { class: "opt" }, seconds(since(job.created_at))),
  ])));
  $("#queue-count").textContent = jobs.length ? `(${jobs.length})` : "";
}

function renderRecent(jobs) {
  fillTable("#recent", jobs.map((job) => jobRow(job, [
    el("td", {}, job.task),
    el("td", {}, stateBadge(job.state)),
    el("td", {}, job.started_at ? seconds(since(job.started_at, job.finished_at)) : "–"),
    el("td", { class: "opt" }, size(job.peak_rss)),
    el("td", { class: "opt" }, job.finished_at ? ago(job.finished_at) : "–"),
  ])));
}

function listQuery(state, limit) {
  const params = new URLSearchParams({ limit: String(limit) });
  if (state) params.set("state", state);
  const task = $("#filter-task").value;
  if (task) params.set("task", task);
  return `/api/v1/jobs?${params}`;
}

async function refresh() {
  try {
    const stateFilter = $("#filter-state").value;
    const [system, running, queued, recent] = await Promise.all([
      api("/api/v1/system"),
      api(listQuery("running", 100)),
      api(listQuery("queued", 100)),
      api(listQuery(stateFilter === "finished" ? "" : stateFilter, stateFilter === "finished" ? 100 : 50)),
    ]);
    renderMachine(system.body);
    renderRunning(running.body.jobs, system.body);
    renderQueue(queued.body.jobs);
    let jobs = recent.body.jobs;
    if (stateFilter === "finished") jobs = jobs.filter((job) => TERMINAL.has(job.state)).slice(0, 50);
    renderRecent(jobs);
    setConnection("live", "live");
    showBanner("");
  } catch (error) {
    setConnection("error", error instanceof ApiError ? `error ${error.status}` : "offline");
    showBanner(error instanceof ApiError ? explain(error) : `Cannot reach the server: ${error.message}`);
  }
}

async function loadTasks() {
  try {
    const { body } = await api("/api/v1/tasks");
    const select = $("#filter-task");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "" }, "all tasks"),
      ...body.tasks.map((task) => el("option", { value: task.name }, task.name)));
    select.value = chosen;
  } catch (error) { /* refresh() reports connection problems */ }
}

// -- queue latency, from the server's Prometheus histogram ----------------------------

const LATENCY_MS = 10000;
const WAIT_BUCKET = /^jobserver_job_queue_wait_seconds_bucket\{([^}]*)\} (\S+)$/;

// Per task: [[upper bound in seconds, cumulative count], ...] in bucket order.
function queueWaits(text) {
  const tasks = new Map();
  for (const line of text.split("\n")) {
    const match = WAIT_BUCKET.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, name, value] of match[1].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[name] = value;
    if (!tasks.has(labels.task)) tasks.set(labels.task, []);
    tasks.get(labels.task).push([labels.le === "+Inf" ? Infinity : Number(labels.le), Number(match[2])]);
  }
  return tasks;
}

// The bucket bound that the q-th fraction of starts waited at most (a histogram's answer).
function bucketQuantile(buckets, q) {
  const total = buckets[buckets.length - 1][1];
  const found = buckets.find(([, count]) => count >= q * total);
  if (!found) return "–";
  const index = buckets.indexOf(found);
  return found[0] === Infinity ? `> ${seconds(buckets[index - 1][0])}` : `≤ ${seconds(found[0])}`;
}

function latencyFigure(buckets) {
  const counts = buckets.map(([, count], i) => count - (i ? buckets[i - 1][1] : 0));
  const most = Math.max(1, ...counts);
  return el("span", { class: "histogram", role: "img",
    "aria-label": "starts per wait bucket, shortest wait on the left" },
    ...counts.map((count, i) => {
      const bound = buckets[i][0];
      const bar = el("span", { class: "bin", title: `${count} started within ${bound === Infinity ? "longer" : seconds(bound)}` });
      bar.style.height = `${Math.round((count / most) * 100)}%`;
      return bar;
    }));
}

async function loadLatency() {
  try {
    const { body } = await api("/metrics", { headers: { Accept: "text/plain" } });
    const rows = [];
    for (const [task, buckets] of [...queueWaits(body)].sort()) {
      const total = buckets[buckets.length - 1][1];
      if (!total) continue;
      rows.push(el("tr", { "data-task": task },
        el("td", {}, task), el("td", {}, String(total)),
        el("td", { class: "p50" }, bucketQuantile(buckets, 0.5)),
        el("td", { class: "p95" }, bucketQuantile(buckets, 0.95)),
        el("td", { class: "opt" }, latencyFigure(buckets))));
    }
    fillTable("#latency", rows);
  } catch (error) { /* refresh() reports connection problems */ }
}

// -- one job's detail -----------------------------------------------------------------

function fact(name, value) {
  return value === null || value === undefined || value === "" ? null
    : el("div", {}, el("dt", {}, name), el("dd", {}, value));
}

function renderDetail(job) {
  $("#detail-title").textContent = `${job.task} · ${job.id}`;
  const badge = $("#detail-state");
  badge.className = `state ${job.state}`;
  badge.textContent = job.state;
  $("#detail-reason").textContent = job.waiting_reason || job.reason || (job.cancel_requested && !TERMINAL.has(job.state) ? "cancel requested" : "");
  const progress = $("#detail-progress");
  progress.hidden = !job.progress;
  if (job.progress) updateProgress(progress, job.progress);
  $("#detail-cancel").disabled = TERMINAL.has(job.state) || job.cancel_requested;
  $("#detail-retry").disabled = !TERMINAL.has(job.state) || job.state === "succeeded";
  const facts = [
    fact("Created", job.created_at), fact("Started", job.started_at), fact("Finished", job.finished_at),
    fact("Duration", job.started_at ? seconds(since(job.started_at, job.finished_at)) : null),
    fact("Attempts", `${job.attempts} (retries allowed: ${job.max_retries})`),
    fact("Priority", job.priority), fact("Peak memory", job.peak_rss ? size(job.peak_rss) : null),
    fact("CPU time", job.cpu_seconds ? seconds(job.cpu_seconds) : null), fact("Exit code", job.exit_code),
    fact("Retry after", job.run_after),
  ].filter(Boolean);
  $("#detail-facts").replaceChildren(...facts);
  $("#detail-args").textContent = JSON.stringify(job.args, null, 2);
  $("#detail-result-block").hidden = job.state !== "succeeded";
  $("#detail-result").textContent = JSON.stringify(job.result, null, 2);
  $("#detail-error-block").hidden = !job.error;
  if (job.error) {
    $("#detail-error").textContent = `${job.error.type}: ${job.error.message}` +
      (job.error.traceback ? `\n\n${job.error.traceback}` : "");
  }
  if (Array.isArray(job.artifacts)) renderArtifacts(job.artifacts);
  else if (TERMINAL.has(job.state)) loadArtifacts(job.id);
  else renderArtifacts([]);
}

function renderArtifacts(artifacts) {
  $("#detail-artifacts-block").hidden = artifacts.length === 0;
  $("#detail-artifacts").replaceChildren(...artifacts.map((artifact) => {
    const name = typeof artifact === "string" ? artifact : artifact.name || artifact.path || "artifact";
    const link = artifact.url ? el("a", { href: artifact.url }, name) : name;
    return el("li", {}, link, artifact.size !== undefined ? ` (${size(artifact.size)})` : "");
  }));
}

async function loadArtifacts(jobId) {
  // Servers that list artifacts apart from the job document: a list, or {"artifacts": [...]}.
  try {
    const { body } = await api(`/api/v1/jobs/${jobId}/artifacts`);
    if (view.selected !== jobId) return;
    renderArtifacts(Array.isArray(body) ? body : (body && body.artifacts) || []);
  } catch (error) {
    if (view.selected === jobId) renderArtifacts([]);
  }
}

async function loadLog(jobId) {
  const log = $("#detail-log");
  try {
    const { body } = await api(`/api/v1/jobs/${jobId}/logs?tail=200`, { headers: { Accept: "text/plain" } });
    if (view.selected !== jobId) return;
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = typeof body === "string" ? body : JSON.stringify(body);
    if (atBottom) log.scrollTop = log.scrollHeight;
    $("#detail-log-note").textContent = "(last 200 lines)";
  } catch (error) {
    if (view.selected !== jobId) return;
    log.textContent = "";
    $("#detail-log-note").textContent = error.status === 404 || error.status === 405
      ? "(this server does not serve job logs)" : `(${explain(error)})`;
  }
}

async function openDetail(jobId) {
  view.selected = jobId;
  view.detailVersion = null;
  const loop = ++view.detailLoop;
  $("#detail").hidden = false;
  $("#detail-action-result").textContent = "";
  $("#detail-log").textContent = "";
  document.querySelectorAll("tr.selected").forEach((row) => row.classList.remove("selected"));
  document.querySelectorAll(`tr[data-job-id="${jobId}"]`).forEach((row) => row.classList.add("selected"));
  let lastLog = 0;
  // Long polling: the server answers when the job changes, or after 25 s unchanged.
  while (view.selected === jobId && loop === view.detailLoop) {
    try {
      const wait = view.detailVersion ? "?wait=25" : "";
      const headers = view.detailVersion ? { "If-None-Match": view.detailVersion } : {};
      const { body, response } = await api(`/api/v1/jobs/${jobId}${wait}`, { headers });
      if (view.selected !== jobId || loop !== view.detailLoop) return;
      view.detailVersion = response.headers.get("ETag");
      renderDetail(body);
      if (TERMINAL.has(body.state) || Date.now() - lastLog > 1500) {
        lastLog = Date.now();
        await loadLog(jobId);
      }
      if (TERMINAL.has(body.state)) return;
      if (body.state === "running") {
        // A running job's log grows without a state change: follow it between polls.
        const started = Date.now();
        while (view.selected === jobId && loop === view.detailLoop && Date.now() - started < 2000) {
          await new Promise((resolve) => setTimeout(resolve, 1000));
          await loadLog(jobId);
          lastLog = Date.now();
        }
        view.detailVersion = null; // re-read now, then long-poll again
      }
    } catch (error) {
      $("#detail-action-result").textContent = explain(error);
      await new Promise((resolve) => setTimeout(resolve, 3000));
    }
  }
}

function closeDetail() {
  view.selected = null;
  view.detailLoop += 1;
  $("#detail").hidden = true;
  document.querySelectorAll("tr.selected").forEach((row) => row.classList.remove("selected"));
}

async function act(action) {
  const jobId = view.selected;
  const result = $("#detail-action-result");
  result.className = "action-result";
  result.textContent = `${action}…`;
  try {
    const { body } = await api(`/api/v1/jobs/${jobId}/${action}`, { method: "POST" });
    const text = action === "cancel"
      ? (body.state === "cancelled" ? "cancelled" : "cancel requested")
      : `retried as ${body.id || jobId}`;
    // Reopening the detail clears the panel's message: say what happened after it.
    if (action === "retry" && body.id && body.id !== jobId) openDetail(body.id);
    else { view.detailVersion = null; openDetail(jobId); }
    result.className = "action-result ok";
    result.textContent = text;
    refresh();
  } catch (error) {
    result.className = "action-result";
    result.textContent = error.status === 404 || error.status === 405
      ? `${action} is not available on this server (${error.status}: ${error.message})`
      : `${action} failed: ${explain(error)}`;
  }
}

// -- start ----------------------------------------------------------------------------

function start() {
  $("#token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("#token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    loadTasks();
    refresh();
  });
  $("#filter-task").addEventListener("change", refresh);
  $("#filter-state").addEventListener("change", refresh);
  $("#detail-close").addEventListener("click", closeDetail);
  $("#detail-cancel").addEventListener("click", () => act("cancel"));
  $("#detail-retry").addEventListener("click", () => act("retry"));
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeDetail(); });
  loadTasks();
  refresh();
  loadLatency();
  setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  setInterval(() => { if (!document.hidden) loadLatency(); }, LATENCY_MS);
  setInterval(() => { if (!document.hidden) loadTasks(); }, 30000);
}

start();
