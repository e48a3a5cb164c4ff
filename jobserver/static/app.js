// jobserver's page: reads the JSON API every few seconds (the job detail long-polls).
// Plain browser JavaScript, no build step, no external resources.
"use strict";

const TOKEN_KEY = "jobserver.token";
const REFRESH_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (selector) => document.querySelector(selector);

const view = {
  selected: null, detailVersion: null, detailLoop: 0, tasks: [],
  // The pictures' latest data, kept to redraw them when the window changes size.
  system: null, history: null, timeline: null, series: null,
  waitingForToken: false, // a server that needs a token, and none typed yet
};

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

// Several nodes sharing PostgreSQL: each incarnation, alive or dead (a SQLite server has
// no heartbeat, and the section stays hidden).
function renderNodes(system) {
  const nodes = (system.nodes || []).filter((node) => node.last_heartbeat !== null);
  $("#nodes-card").hidden = nodes.length === 0;
  $("#nodes").querySelector("tbody").replaceChildren(...nodes.map((node) => el("tr",
    { dataset: { alive: String(node.alive) }, title: node.incarnation },
    el("td", {}, node.name),
    el("td", {}, stateBadge(node.alive ? "alive" : "dead"), node.leader ? " leader" : ""),
    el("td", {}, `${seconds(node.heartbeat_age)} ago`),
    el("td", { class: "opt" }, node.free ? `${cpus(node.free.cpus)} of ${cpus(node.capacity.cpus)}` : "–"),
    el("td", { class: "opt" }, node.free ? `${size(node.free.memory)} of ${size(node.capacity.memory)}` : "–"),
    el("td", {}, String(node.running)),
  )));
  const alive = nodes.filter((node) => node.alive).length;
  $("#nodes-count").textContent = nodes.length ? `(${alive} alive)` : "";
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

function renderLists(system, running, queued, recent) {
  renderMachine(system);
  renderNodes(system);
  renderRunning(running, system);
  renderQueue(queued);
  let jobs = recent;
  if ($("#filter-state").value === "finished") jobs = jobs.filter((job) => TERMINAL.has(job.state)).slice(0, 50);
  renderRecent(jobs);
  view.system = system;
  drawMachineCharts();
}

async function refresh() {
  try {
    const stateFilter = $("#filter-state").value;
    const [system, running, queued, recent, timeline] = await Promise.all([
      api("/api/v1/system"),
      api(listQuery("running", 100)),
      api(listQuery("queued", 100)),
      api(listQuery(stateFilter === "finished" ? "" : stateFilter, stateFilter === "finished" ? 100 : 50)),
      api("/api/v1/timeline"),
    ]);
    renderLists(system.body, running.body.jobs, queued.body.jobs, recent.body.jobs);
    view.timeline = timeline.body;
    drawTimeline();
    setConnection("live", "live");
    showBanner("");
  } catch (error) {
    setConnection("error", error instanceof ApiError ? `error ${error.status}` : "offline");
    showBanner(error instanceof ApiError ? explain(error) : `Cannot reach the server: ${error.message}`);
  }
}

function renderTaskNames(names) {
  const select = $("#filter-task");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "all tasks"),
    ...names.map((name) => el("option", { value: name }, name)));
  select.value = chosen;
}

async function loadTasks() {
  try {
    const { body } = await api("/api/v1/tasks");
    renderTaskNames(body.tasks.map((task) => task.name));
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

function renderLatency(metrics) {
  const rows = [];
  for (const [task, buckets] of [...queueWaits(metrics)].sort()) {
    const total = buckets[buckets.length - 1][1];
    if (!total) continue;
    rows.push(el("tr", { "data-task": task },
      el("td", {}, task), el("td", {}, String(total)),
      el("td", { class: "p50" }, bucketQuantile(buckets, 0.5)),
      el("td", { class: "p95" }, bucketQuantile(buckets, 0.95)),
      el("td", { class: "opt" }, latencyFigure(buckets))));
  }
  fillTable("#latency", rows);
}

async function loadLatency() {
  try {
    const { body } = await api("/metrics", { headers: { Accept: "text/plain" } });
    renderLatency(body);
  } catch (error) { /* refresh() reports connection problems */ }
}

// -- pictures: hand-drawn SVG, sized to their box (redrawn when the window changes) ---

const PICTURES_MS = 10000;
// SVG's namespace, as the HTML parser assigns it (the static files hold no absolute URL).
const SVG_NS = (() => { const box = document.createElement("div"); box.innerHTML = "<svg></svg>"; return box.firstChild.namespaceURI; })();
const CHART_HEIGHT = 150;
const MARGIN = { left: 52, right: 10, top: 8, bottom: 22 };
const MIN_SPAN_MS = 20000; // the shortest time a chart spans (a server that just started)

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function tooltip(text) { return svg("title", {}, text); }

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function plotWidth(plot) { return Math.max(260, Math.floor(plot.clientWidth || 600)); }

// A linear scale from [d0, d1] to [r0, r1].
function scale(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (value) => r0 + ((value - d0) / span) * (r1 - r0);
}

// The time axis under a chart: three labels and ticks, start, middle, end.
function timeAxis(x, start, end, y) {
  const group = svg("g", { class: "axis" });
  for (const [at, anchor] of [[start, "start"], [(start + end) / 2, "middle"], [end, "end"]]) {
    group.append(svg("line", { x1: x(at), x2: x(at), y1: y, y2: y + 4 }));
    group.append(svg("text", { x: x(at), y: y + 15, "text-anchor": anchor }, clock(at)));
  }
  return group;
}

function valueAxis(y, top, format, left, right) {
  const group = svg("g", { class: "axis" });
  for (const value of [0, top / 2, top]) {
    group.append(svg("line", { class: "grid", x1: left, x2: right, y1: y(value), y2: y(value) }));
    group.append(svg("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, format(value)));
  }
  return group;
}

function points(list) { return list.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "); }

function area(list, baseline) {
  if (!list.length) return "";
  const top = list.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
  return `${top} L${list[list.length - 1][0].toFixed(1)},${baseline} L${list[0][0].toFixed(1)},${baseline} Z`;
}

// The machine now, from GET /api/v1/system, as one more history sample.
function liveSample(system) {
  const running = system.running || [];
  const sum = (pick) => running.reduce((total, job) => total + (pick(job) || 0), 0);
  return {
    at: null,
    cpu: { capacity: system.capacity.cpus, used: sum((job) => job.cpus_used),
      claimed: sum((job) => job.request.cpus), reserved: system.reserved.cpus, free: system.free.cpus },
    memory: { capacity: system.capacity.memory, used: sum((job) => job.memory_used),
      claimed: sum((job) => job.request.memory), reserved: system.reserved.memory, free: system.free.memory },
    running: running.length,
    overload: system.overload,
    live: true,
  };
}

function drawMachineCharts() {
  if (!view.history) return;
  const samples = view.history.samples.slice();
  if (view.system) {
    // Now, on this browser's clock, but never before the server's last sample.
    const live = liveSample(view.system);
    const last = samples.length ? Date.parse(samples[samples.length - 1].at) : 0;
    live.at = new Date(Math.max(Date.now(), last)).toISOString();
    samples.push(live);
  }
  for (const [id, format] of [["#chart-cpu", cpus], ["#chart-memory", size]]) {
    usageChart($(id), samples, view.history.window, format);
  }
}

function usageChart(figure, samples, windowSeconds, format) {
  const resource = figure.dataset.resource;
  const plot = figure.querySelector(".plot");
  const width = plotWidth(plot);
  const end = samples.length ? Date.parse(samples[samples.length - 1].at) : Date.now();
  const first = samples.length ? Date.parse(samples[0].at) : end;
  const start = Math.min(end - MIN_SPAN_MS, Math.max(first, end - windowSeconds * 1000));
  const shown = samples.filter((sample) => Date.parse(sample.at) >= start);
  const top = Math.max(1e-9, ...shown.map((s) => Math.max(s[resource].capacity, s[resource].claimed, s[resource].used)));
  const x = scale(start, end, MARGIN.left, width - MARGIN.right);
  const base = CHART_HEIGHT - MARGIN.bottom;
  const y = scale(0, top, base, MARGIN.top);
  const at = (sample) => x(Date.parse(sample.at));
  const series = (pick) => shown.map((sample) => [at(sample), y(Math.min(top, Math.max(0, pick(sample[resource]))))]);
  const chart = svg("svg", { width, height: CHART_HEIGHT, viewBox: `0 0 ${width} ${CHART_HEIGHT}`,
    role: "img", "aria-label": `${resource} over time: used, reserved by running jobs, free`,
    "data-samples": shown.length });
  chart.append(valueAxis(y, top, format, MARGIN.left, width - MARGIN.right));
  // Admission stopped: a band from each such sample to the next, and a mark where it began.
  shown.forEach((sample, i) => {
    if (!sample.overload) return;
    const from = at(sample);
    const to = i + 1 < shown.length ? at(shown[i + 1]) : width - MARGIN.right;
    chart.append(svg("rect", { class: "stopped", x: from, y: MARGIN.top, width: Math.max(2, to - from),
      height: base - MARGIN.top }, tooltip(`admission stopped at ${clock(Date.parse(sample.at))}: ${sample.overload}`)));
    if (i === 0 || !shown[i - 1].overload) {
      chart.append(svg("line", { class: "stop-mark", x1: from, x2: from, y1: MARGIN.top, y2: base },
        tooltip(`admission stopped at ${clock(Date.parse(sample.at))}: ${sample.overload}`)));
    }
  });
  chart.append(svg("path", { class: "area claimed", d: area(series((u) => u.claimed), base) }));
  chart.append(svg("path", { class: "area used", d: area(series((u) => u.used), base) }));
  chart.append(svg("polyline", { class: "line capacity", points: points(series((u) => u.capacity)) }));
  chart.append(svg("polyline", { class: "line free", points: points(series((u) => u.free)) }));
  // Hover anywhere: the sample's numbers (one invisible column per sample).
  shown.forEach((sample, i) => {
    const left = i ? (at(shown[i - 1]) + at(sample)) / 2 : at(sample);
    const right = i + 1 < shown.length ? (at(sample) + at(shown[i + 1])) / 2 : at(sample) + 1;
    const u = sample[resource];
    chart.append(svg("rect", { class: "hover", x: left, y: MARGIN.top, width: Math.max(1, right - left),
      height: base - MARGIN.top }, tooltip(`${sample.live ? "now" : clock(Date.parse(sample.at))}: ` +
      `${format(u.used)} used, ${format(u.claimed)} reserved by ${sample.running} running job(s), ` +
      `${format(u.free)} free, ${format(u.capacity)} capacity` + (sample.overload ? `; admission stopped: ${sample.overload}` : ""))));
  });
  chart.append(timeAxis(x, start, end, base));
  plot.replaceChildren(chart);
}

// Outcome of an attempt, for its colour: how it ended, or "running".
function outcomeKind(attempt) {
  if (attempt.finished_at === null) return "running";
  if (["succeeded", "failed", "cancelled"].includes(attempt.outcome)) return attempt.outcome;
  return "retried";
}

// Greedy lanes: each bar (by start) goes in the first lane free by its start.
function assignLanes(bars) {
  const ends = [];
  for (const bar of bars) {
    let lane = ends.findIndex((end) => end <= bar.start);
    if (lane < 0) { lane = ends.length; ends.push(0); }
    ends[lane] = bar.end;
    bar.lane = lane;
  }
  return ends.length;
}

const LANE_HEIGHT = 16;
const LANE_GAP = 4;
const NODE_GAP = 18;

function drawTimeline() {
  const plot = $("#timeline");
  const card = plot.closest(".card");
  const timeline = view.timeline;
  if (!timeline) return;
  const end = Date.parse(timeline.now);
  const attempts = timeline.attempts.map((attempt) => ({
    attempt,
    start: Date.parse(attempt.started_at),
    end: attempt.finished_at ? Date.parse(attempt.finished_at) : end,
    node: attempt.node || "local",
  })).filter((bar) => bar.end >= end - 3600 * 1000);
  card.querySelector(".empty").hidden = attempts.length > 0;
  plot.hidden = attempts.length === 0;
  if (!attempts.length) { plot.replaceChildren(); return; }
  const start = Math.min(end - MIN_SPAN_MS, Math.max(end - 3600 * 1000, Math.min(...attempts.map((bar) => bar.start))));
  const width = plotWidth(plot);
  const x = scale(start, end, MARGIN.left, width - MARGIN.right);
  // One group of lanes per node; with one node (a single server) no heading is needed.
  const nodes = [...new Set(attempts.map((bar) => bar.node))].sort();
  const headed = nodes.length > 1;
  let top = MARGIN.top;
  const chart = svg("svg", { width, role: "img", "aria-label": "recent jobs on a time axis" });
  for (const node of nodes) {
    const bars = attempts.filter((bar) => bar.node === node).sort((a, b) => a.start - b.start);
    if (headed) {
      chart.append(svg("text", { class: "node-name", x: 4, y: top + 11 }, node));
      top += NODE_GAP;
    }
    const lanes = assignLanes(bars);
    for (const bar of bars) {
      const a = bar.attempt;
      const left = x(Math.max(start, bar.start));
      const kind = outcomeKind(a);
      const took = seconds((bar.end - bar.start) / 1000);
      const rect = svg("rect", {
        class: `attempt outcome-${kind}`, x: left, y: top + bar.lane * (LANE_HEIGHT + LANE_GAP),
        width: Math.max(3, x(bar.end) - left), height: LANE_HEIGHT, rx: 2,
        "data-job-id": a.job_id, "data-outcome": kind,
      }, tooltip(`${a.task} · ${a.job_id}\nattempt ${a.attempt}: ${a.outcome || "running"} · ${took}` +
        `\nstarted ${clock(bar.start)}` + (a.finished_at ? `, ended ${clock(bar.end)}` : "") +
        (headed ? `\nnode ${node}` : "")));
      rect.addEventListener("click", () => openDetail(a.job_id));
      chart.append(rect);
    }
    top += lanes * (LANE_HEIGHT + LANE_GAP);
  }
  chart.append(timeAxis(x, start, end, top + 2));
  const height = top + MARGIN.bottom + 4;
  chart.setAttribute("height", height);
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  plot.replaceChildren(chart);
}

const TASK_CHART_HEIGHT = 120;
const MAX_TASK_CHARTS = 12;

function drawTaskCharts() {
  const container = $("#task-charts");
  const series = view.series;
  if (!series) return;
  const tasks = series.tasks
    .map((entry) => ({ ...entry, total: entry.buckets.reduce((sum, b) => sum + b.finished, 0) }))
    .sort((a, b) => b.total - a.total || a.task.localeCompare(b.task))
    .slice(0, MAX_TASK_CHARTS);
  container.closest(".card").querySelector(".empty").hidden = tasks.length > 0;
  container.replaceChildren(...tasks.map((entry) => {
    const figure = el("figure", { class: "chart", "data-task": entry.task });
    const plot = el("div", { class: "plot" });
    const succeeded = entry.buckets.flatMap((b) => (b.duration_p50 === null ? [] : [b]));
    const last = succeeded[succeeded.length - 1];
    figure.append(el("figcaption", {}, `${entry.task} · ${entry.total} finished` +
      (last ? ` · latest p50 ${seconds(last.duration_p50)}, p95 ${seconds(last.duration_p95)}` : "")), plot);
    container.append(figure); // measured below, so it must be in the page
    taskChart(plot, entry, series);
    return figure;
  }));
}

function taskChart(plot, entry, series) {
  const width = plotWidth(plot);
  const bucketMs = series.bucket * 1000;
  const start = Date.parse(series.since);
  const end = Math.max(Date.parse(series.now), start + bucketMs);
  const base = TASK_CHART_HEIGHT - MARGIN.bottom;
  const x = scale(start, end, MARGIN.left, width - MARGIN.right);
  const most = Math.max(1, ...entry.buckets.map((b) => b.finished));
  const count = scale(0, most, base, MARGIN.top);
  const slowest = Math.max(1e-3, ...entry.buckets.map((b) => b.duration_p95 || 0));
  const duration = scale(0, slowest, base, MARGIN.top);
  const chart = svg("svg", { width, height: TASK_CHART_HEIGHT, viewBox: `0 0 ${width} ${TASK_CHART_HEIGHT}`,
    role: "img", "aria-label": `${entry.task}: jobs finished per bucket and p50/p95 duration` });
  chart.append(valueAxis(count, most, (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)), MARGIN.left, width - MARGIN.right));
  const barWidth = Math.max(2, x(start + bucketMs) - x(start) - 1);
  const p50 = [];
  const p95 = [];
  for (const bucket of entry.buckets) {
    const from = Date.parse(bucket.start);
    const left = x(from);
    const label = `${clock(from)}: ${bucket.finished} finished (${bucket.succeeded} succeeded, ` +
      `${bucket.failed} failed, ${bucket.cancelled} cancelled)` +
      (bucket.duration_p50 === null ? "" : `; p50 ${seconds(bucket.duration_p50)}, p95 ${seconds(bucket.duration_p95)}`);
    const unsucceeded = bucket.finished - bucket.succeeded;
    chart.append(svg("rect", { class: "throughput", x: left, y: count(bucket.finished), width: barWidth,
      height: base - count(bucket.finished) }, tooltip(label)));
    if (unsucceeded) {
      chart.append(svg("rect", { class: "throughput failed", x: left, y: count(bucket.finished), width: barWidth,
        height: base - count(unsucceeded) }, tooltip(label)));
    }
    if (bucket.duration_p50 !== null) {
      const middle = left + barWidth / 2;
      p50.push([middle, duration(bucket.duration_p50), label]);
      p95.push([middle, duration(bucket.duration_p95), label]);
    }
  }
  for (const [name, line] of [["p95", p95], ["p50", p50]]) {
    chart.append(svg("polyline", { class: `line ${name}`, points: points(line) }));
    for (const [px, py, label] of line) {
      chart.append(svg("circle", { class: `dot ${name}`, cx: px, cy: py, r: 2.5 }, tooltip(label)));
    }
  }
  if (p50.length) {
    chart.append(svg("text", { class: "axis-note", x: MARGIN.left + 4, y: MARGIN.top + 9 },
      `duration: top ${seconds(slowest)}`));
  }
  chart.append(timeAxis(x, start, end, base));
  plot.replaceChildren(chart);
}

function drawPictures() {
  drawMachineCharts();
  drawTimeline();
  drawTaskCharts();
}

async function loadPictures() {
  try {
    const [history, series] = await Promise.all([api("/api/v1/system/history"), api("/api/v1/stats/history")]);
    view.history = history.body;
    view.series = series.body;
    drawMachineCharts();
    drawTaskCharts();
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
    view.waitingForToken = false;
    loadTasks();
    refresh();
    loadLatency();
    loadPictures();
  });
  $("#filter-task").addEventListener("change", refresh);
  $("#filter-state").addEventListener("change", refresh);
  $("#detail-close").addEventListener("click", closeDetail);
  $("#detail-cancel").addEventListener("click", () => act("cancel"));
  $("#detail-retry").addEventListener("click", () => act("retry"));
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeDetail(); });
  let resizing = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(drawPictures, 150);
  });
  // The page came with what the API would answer now: draw it before any request.
  const snapshot = JSON.parse($("#snapshot").textContent);
  if (snapshot) {
    renderTaskNames(snapshot.tasks);
    renderLists(snapshot.system, snapshot.running, snapshot.queued, snapshot.recent);
    Object.assign(view, { history: snapshot.history, timeline: snapshot.timeline, series: snapshot.series });
    drawPictures();
    renderLatency(snapshot.metrics);
  } else if (!sessionStorage.getItem(TOKEN_KEY)) {
    // The server needs a token and this tab has none: ask, and wait for it.
    showBanner("The server needs a token: enter it above.");
    view.waitingForToken = true;
  }
  const every = (ms, load) => setInterval(() => { if (!document.hidden && !view.waitingForToken) load(); }, ms);
  // What came with the page is fresh: read again at the next interval.
  if (!snapshot && !view.waitingForToken) { loadTasks(); refresh(); loadLatency(); loadPictures(); }
  every(REFRESH_MS, refresh);
  every(LATENCY_MS, loadLatency);
  every(PICTURES_MS, loadPictures);
  every(30000, loadTasks);
}

start();
