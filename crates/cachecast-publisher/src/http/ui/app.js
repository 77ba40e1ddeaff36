// The cachecast status page: environments, their caches and agents, the last invalidations and
// a plot of confirmation latency, read from the API with a token the user pastes. The token
// lives in this variable only: never in storage, a cookie or a URL.
"use strict";

let token = null;
let timer = null;
const REFRESH_MS = 2000;
const PLOT_MINUTES = 10;
const BUCKET_MS = 30000;

const statusLine = document.getElementById("status");
const fleet = document.getElementById("fleet");

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  token = input.value.trim();
  input.value = "";
  if (timer) clearInterval(timer);
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
});

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + token } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`${path}: ${response.status} ${body.message || body.code || ""}`);
  }
  return body;
}

async function refresh() {
  try {
    const { environments } = await api("/api/1.0/runtime/environments");
    const views = await Promise.all(environments.map(async (env) => {
      const path = encodeURIComponent(env);
      const [inventory, audit] = await Promise.all([
        api(`/api/1.0/runtime/caches/${path}`),
        api(`/api/1.0/runtime/invalidations/${path}?limit=100`),
      ]);
      return { env, inventory, audit };
    }));
    fleet.replaceChildren(...views.map(renderEnv));
    setStatus(`${environments.length} environment(s), updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

function setStatus(text, error = false) {
  statusLine.textContent = text;
  statusLine.className = error ? "error" : "";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function table(id, headers, rows) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
}

function ms(value) {
  return value == null ? "-" : `${Math.round(value)} ms`;
}

function renderEnv({ env, inventory, audit }) {
  const caches = inventory.caches.map((c) => el("tr", { "data-cache": c.id },
    el("td", {}, c.id), el("td", {}, c.backend),
    el("td", { class: `state-${c.state}` },
      c.state === "unattended" && c.unattendedForMs != null
        ? `unattended for ${Math.round(c.unattendedForMs / 1000)} s`
        : c.state + (c.lagging ? `: ${c.lagging}` : "")),
    el("td", {}, c.attendedBy.join(", ")),
    el("td", {}, c.appliedSequence ?? "-"),
    el("td", {}, c.lagEvents ?? "-")));
  const agents = inventory.agents.map((a) => el("tr", { "data-agent": a.id },
    el("td", {}, a.id), el("td", {}, a.backend), el("td", {}, a.version),
    el("td", { class: `state-${a.state}` }, a.state + (a.lagging ? `: ${a.lagging}` : "")),
    el("td", {}, a.cacheId ?? "in process"),
    el("td", {}, `${Math.round(a.lastSeenMs / 1000)} s ago`),
    el("td", {}, a.appliedSequence), el("td", {}, `${a.lagEvents} / ${ms(a.lagMs)}`)));
  const records = audit.records.slice(0, 20).map((r) => el("tr", { "data-request": r.requestId },
    el("td", {}, new Date(r.atUnixMs).toLocaleTimeString()),
    el("td", {}, r.requestId), el("td", {}, r.caller ?? "-"),
    el("td", {}, JSON.stringify(r.target)),
    el("td", { class: `outcome-${r.outcome}` }, r.outcome),
    el("td", {}, ms(r.tookMs)),
    el("td", {}, ...Object.entries(r.agents || {}).map(([id, result]) =>
      el("div", { class: `status-${result.status}` },
        `${id}: ${result.status} ${ms(result.latencyMs)}${result.error ? " (" + result.error + ")" : ""}`)))));
  return el("section", { class: "env", id: `env-${env}` },
    el("h2", {}, env),
    el("h3", {}, "Caches"),
    table(`caches-${env}`, ["cache", "backend", "state", "attended by", "position", "lag (events)"], caches),
    el("h3", {}, "Agents"),
    table(`agents-${env}`, ["agent", "backend", "version", "state", "cache", "last seen", "position", "lag"], agents),
    el("h3", {}, `Confirmation latency, last ${PLOT_MINUTES} minutes`),
    plot(audit.records),
    el("div", { class: "legend" }, el("span", { class: "p50" }, "p50"), el("span", { class: "p99" }, "p99")),
    el("h3", {}, "Last invalidations"),
    table(`invalidations-${env}`, ["at", "request", "caller", "target", "outcome", "took", "caches"], records));
}

function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

// p50 and p99 of confirmed invalidations per 30 s over the last minutes.
function plot(records) {
  const width = 640, height = 140, now = Date.now(), start = now - PLOT_MINUTES * 60000;
  const canvas = el("canvas", { width, height });
  const buckets = new Map();
  for (const r of records) {
    if (r.outcome !== "confirmed" || r.atUnixMs < start) continue;
    const b = Math.floor((r.atUnixMs - start) / BUCKET_MS);
    if (!buckets.has(b)) buckets.set(b, []);
    buckets.get(b).push(r.tookMs);
  }
  const points = [...buckets.entries()].sort((a, b) => a[0] - b[0]).map(([b, values]) => {
    values.sort((x, y) => x - y);
    return { x: (b + 0.5) * BUCKET_MS, p50: quantile(values, 0.5), p99: quantile(values, 0.99) };
  });
  const ctx = canvas.getContext("2d");
  const top = Math.max(1, ...points.map((p) => p.p99));
  ctx.fillStyle = "#4a5868";
  ctx.font = "11px system-ui";
  ctx.fillText(`${Math.round(top)} ms`, 4, 12);
  for (const [key, color] of [["p50", "#2563eb"], ["p99", "#b42318"]]) {
    ctx.strokeStyle = color;
    ctx.beginPath();
    points.forEach((p, i) => {
      const x = (p.x / (PLOT_MINUTES * 60000)) * width;
      const y = height - 4 - (p[key] / top) * (height - 20);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = color;
    for (const p of points) {
      const x = (p.x / (PLOT_MINUTES * 60000)) * width;
      const y = height - 4 - (p[key] / top) * (height - 20);
      ctx.fillRect(x - 2, y - 2, 4, 4);
    }
  }
  return canvas;
}
