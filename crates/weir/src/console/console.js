// The Weir console: reads /api/console once, then a snapshot a second from
// /api/console/stream (Server-Sent Events); computes rates from consecutive snapshots;
// acknowledges and resolves alerts through the alert API with a token asked for once and
// kept for the browser session. No external resources.
"use strict";

const HISTORY_S = 300;
const state = { prev: null, history: [], graphKey: "", deadLetterFilters: { kinds: new Set(), steps: new Set() } };

const $ = (sel) => document.querySelector(sel);
const fmt = (n) => (n === null || n === undefined || Number.isNaN(n)) ? "–"
  : Math.abs(n) >= 1e6 ? (n / 1e6).toFixed(2) + "M" : Math.abs(n) >= 1e4 ? (n / 1e3).toFixed(1) + "k"
  : Number.isInteger(n) ? String(n) : n.toFixed(1);
const time = (ms) => ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "–";
const text = (el, s) => { if (el.textContent !== s) el.textContent = s; };
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

function rate(cur, prev, field, dt) {
  if (!prev || dt <= 0) return null;
  return Math.max(0, (cur[field] - prev[field]) / dt);
}

// The server's samples of the last minutes, before this page opened: the charts start full.
function seed(history) {
  for (let i = 1; i < history.length; i++) {
    const [t0, in0, out0, , sum0, n0] = history[i - 1], [t, rin, rout, lag, sum, n] = history[i];
    const dt = (t - t0) / 1000;
    // Mean end-to-end latency of the rows written in that second (sinks with a latency column).
    const latency = n > n0 ? (sum - sum0) / (n - n0) / 1e6 : null;
    if (dt > 0) state.history.push({ t, rin: (rin - in0) / dt, rout: (rout - out0) / dt, lag, latency });
  }
}

function apply(snap) {
  const prev = state.prev;
  if (!prev && snap.history) seed(snap.history);
  const dt = prev ? (snap.now_ms - prev.now_ms) / 1000 : 0;
  text($("#job"), snap.job);
  const phase = $("#phase");
  text(phase, snap.phase);
  phase.className = "pill " + snap.phase;
  const rin = rate(snap, prev, "source_records", dt);
  const rout = rate(snap, prev, "sink_rows", dt);
  text($("#rate-in"), fmt(rin));
  text($("#rate-out"), fmt(rout));
  text($("#records"), fmt(snap.source_records));
  const lag = snap.watermark_ms ? Math.max(0, (snap.now_ms - snap.watermark_ms) / 1000) : null;
  text($("#watermark"), snap.watermark_ms ? time(snap.watermark_ms) : "none yet");
  text($("#watermark-lag"), lag === null ? "" : `(${fmt(lag)} s behind)`);
  const ck = snap.checkpoints;
  text($("#checkpoints"), !ck.enabled ? "off" : `${ck.completed} done, ${ck.failed} failed, last ${fmt(ck.last_duration_s * 1000)} ms, ${fmt(ck.last_bytes / 1024)} KiB`
    + (ck.last_completed_ms ? `, ${fmt((snap.now_ms - ck.last_completed_ms) / 1000)} s ago` : ""));
  text($("#updated"), new Date(snap.now_ms).toLocaleTimeString());
  graph(snap, prev, dt);
  const last = snap.history && snap.history.length > 1 ? snap.history.slice(-2) : null;
  const latency = last && last[1][5] > last[0][5] ? (last[1][4] - last[0][4]) / (last[1][5] - last[0][5]) / 1e6 : null;
  if (prev) {
    state.history.push({ t: snap.now_ms, rin, rout, lag, latency });
    while (state.history.length && state.history[0].t < snap.now_ms - HISTORY_S * 1000) state.history.shift();
    chart($("#chart-rates"), [["rin", getComputedStyle(document.body).getPropertyValue("--in")],
      ["rout", getComputedStyle(document.body).getPropertyValue("--out")]], "rows/s");
    chart($("#chart-lag"), [["lag", getComputedStyle(document.body).getPropertyValue("--warn")],
      ["latency", getComputedStyle(document.body).getPropertyValue("--in")]], "s");
  }
  alerts(snap.alerts);
  table("#partitions", snap.partitions, (p) => [p.topic, p.partition, fmt(p.lag)]);
  table("#quarantine", snap.quarantine, (q) => [q.key, time(q.until_ms)]);
  table("#members", snap.members || [], (m) => m.error ? ["–", m.error] : [m.member, m.partitions.join(", ")]);
  for (const n of snap.nodes) state.deadLetterFilters.steps.add(n.id);
  state.prev = snap;
}

// Layers by longest path from a source; within a layer, in file order.
function layout(nodes) {
  const depth = {};
  const byId = Object.fromEntries(nodes.map((n) => [n.id, n]));
  const d = (id, seen = new Set()) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    const n = byId[id];
    const v = n && n.inputs.length ? 1 + Math.max(...n.inputs.map((i) => d(i.from, seen))) : 0;
    depth[id] = v;
    return v;
  };
  nodes.forEach((n) => d(n.id));
  const layers = [];
  nodes.forEach((n) => (layers[depth[n.id]] ||= []).push(n.id));
  const pos = {};
  const W = 210, H = 96, GX = 100, GY = 24;
  layers.forEach((ids, x) => ids.forEach((id, y) => { pos[id] = { x: 10 + x * (W + GX), y: 10 + y * (H + GY) }; }));
  const width = 20 + layers.length * (W + GX) - GX;
  const height = 20 + Math.max(...layers.map((l) => l.length)) * (H + GY) - GY;
  return { pos, W, H, width, height };
}

function graph(snap, prev, dt) {
  const key = snap.nodes.map((n) => n.id + "<" + n.inputs.map((i) => i.from).join(",")).join(";");
  const root = $("#graph");
  if (key !== state.graphKey) {
    state.graphKey = key;
    const { pos, W, H, width, height } = layout(snap.nodes);
    const consumed = new Set(snap.nodes.flatMap((n) => n.inputs.map((i) => i.from)));
    let svg = `<svg width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img">`;
    for (const n of snap.nodes) for (const i of n.inputs) {
      const a = pos[i.from], b = pos[n.id];
      if (!a || !b) continue;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      svg += `<g class="edge"><path d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}"/>`
        + (i.by ? `<text x="${mx}" y="${(y1 + y2) / 2 - 5}" text-anchor="middle">${i.by === "*" ? "all to one" : "by " + esc(i.by)}</text>` : "") + "</g>";
    }
    for (const n of snap.nodes) {
      const p = pos[n.id];
      const role = n.inputs.length === 0 ? "source" : consumed.has(n.id) ? "step" : "sink";
      svg += `<g class="node ${role}" data-id="${esc(n.id)}" transform="translate(${p.x},${p.y})">`
        + `<rect class="box" width="${W}" height="${H}"/>`
        + `<text class="id" x="10" y="18">${esc(n.id)}</text><text class="kind" x="${W - 10}" y="18" text-anchor="end">${esc(n.kind)}</text>`
        + `<text class="rates" x="10" y="40"></text><text class="busy" x="10" y="58"></text><text class="bad" x="10" y="76"></text>`
        + `<rect class="fill-bg" x="10" y="84" width="${W - 20}" height="5"/><rect class="fill" x="10" y="84" width="0" height="5"/></g>`;
    }
    root.innerHTML = svg + "</svg>";
  }
  const old = prev ? Object.fromEntries(prev.nodes.map((n) => [n.id, n])) : {};
  for (const n of snap.nodes) {
    const g = root.querySelector(`g.node[data-id="${CSS.escape(n.id)}"]`);
    if (!g) continue;
    const o = old[n.id];
    const rin = o && dt > 0 ? (n.rows_in - o.rows_in) / dt : null;
    const rout = o && dt > 0 ? (n.rows_out - o.rows_out) / dt : null;
    const busy = o && dt > 0 ? Math.min(100, 100 * (n.busy_s - o.busy_s) / dt) : null;
    text(g.querySelector("text.rates"), `${fmt(rin)} → ${fmt(rout)} rows/s`);
    text(g.querySelector("text.busy"), `busy ${busy === null ? "–" : busy.toFixed(0) + "%"} · in ${fmt(n.rows_in)}`);
    text(g.querySelector("text.bad"), (n.dead_letters || n.late) ? `${fmt(n.dead_letters)} dead letters · ${fmt(n.late)} late` : "");
    const bar = g.querySelector("rect.fill");
    const W = Number(g.querySelector("rect.fill-bg").getAttribute("width"));
    bar.setAttribute("width", String(Math.round(W * Math.min(1, n.fill))));
    bar.setAttribute("class", "fill" + (n.fill > 0.8 ? " high" : ""));
    g.setAttribute("data-rows-in", String(n.rows_in));
  }
}

function chart(canvas, series, unit) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const pts = state.history;
  const now = pts.length ? pts[pts.length - 1].t : Date.now();
  const max = Math.max(1e-9, ...pts.flatMap((p) => series.map(([k]) => p[k] ?? 0)));
  ctx.strokeStyle = "#d7dde4"; ctx.fillStyle = "#65707d"; ctx.font = "11px system-ui";
  ctx.beginPath(); ctx.moveTo(pad, 4); ctx.lineTo(pad, h - pad + 4); ctx.lineTo(w - 4, h - pad + 4); ctx.stroke();
  ctx.fillText(fmt(max) + " " + unit, pad + 4, 12);
  ctx.fillText("-5 min", pad, h - 8); ctx.fillText("now", w - 26, h - 8);
  for (const [k, color] of series) {
    ctx.strokeStyle = color.trim() || "#2f6fdb"; ctx.lineWidth = 1.5; ctx.beginPath();
    let first = true;
    for (const p of pts) {
      if (p[k] === null || p[k] === undefined) continue;
      const x = pad + (w - pad - 4) * (1 - (now - p.t) / (HISTORY_S * 1000));
      const y = (h - pad) - (h - pad - 8) * (p[k] / max) + 4;
      if (first) { ctx.moveTo(x, y); first = false; } else ctx.lineTo(x, y);
    }
    ctx.stroke();
  }
}

function table(sel, rows, cells) {
  const body = $(sel + " tbody");
  const html = rows.length ? rows.map((r) => "<tr>" + cells(r).map((c) => `<td>${esc(c)}</td>`).join("") + "</tr>").join("")
    : `<tr><td colspan="9" class="hint">none</td></tr>`;
  if (body.innerHTML !== html) body.innerHTML = html;
}

function alerts(list) {
  text($("#alert-count"), list.length ? `(${list.length} open)` : "");
  const body = $("#alerts tbody");
  const html = list.length ? list.map((a) => `<tr class="${esc(a.state)}" data-alert="${esc(a.id)}">`
    + [a.state, a.rule, a.key, a.severity, fmt(a.value), a.count, time(a.first_seen)].map((c) => `<td>${esc(c)}</td>`).join("")
    + `<td>${a.state === "firing" ? `<button class="ack" data-id="${esc(a.id)}">Acknowledge</button>` : ""}`
    + `<button class="resolve" data-id="${esc(a.id)}">Resolve</button></td></tr>`).join("")
    : `<tr><td colspan="8" class="hint">no open alerts</td></tr>`;
  if (body.innerHTML !== html) body.innerHTML = html;
}

function token() {
  let t = sessionStorage.getItem("weir-token");
  if (!t) {
    t = window.prompt("API token (api.token or WEIR_API_TOKEN of the pipeline)") || "";
    if (t) sessionStorage.setItem("weir-token", t);
  }
  return t;
}

async function act(id, what) {
  const t = token();
  if (!t) return;
  const r = await fetch(`/alerts/${encodeURIComponent(id)}/${what}`, { method: "POST", headers: { Authorization: "Bearer " + t } });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) sessionStorage.removeItem("weir-token");
  text($("#alert-message"), r.ok ? `${what === "ack" ? "Acknowledged" : "Resolved"} ${id}.` : `Refused (${r.status}): ${body.error || ""}`);
  refresh();
}

$("#alerts").addEventListener("click", (e) => {
  const b = e.target.closest("button");
  if (b) act(b.dataset.id, b.classList.contains("ack") ? "ack" : "resolve");
});

async function deadLetters() {
  const q = new URLSearchParams({ limit: "100" });
  if ($("#dl-kind").value) q.set("kind", $("#dl-kind").value);
  if ($("#dl-step").value) q.set("step", $("#dl-step").value);
  const r = await fetch("/dead-letters/recent?" + q);
  if (!r.ok) return;
  const rows = await r.json();
  for (const l of rows) { state.deadLetterFilters.kinds.add(l.kind); state.deadLetterFilters.steps.add(l.step); }
  for (const [sel, set] of [["#dl-kind", state.deadLetterFilters.kinds], ["#dl-step", state.deadLetterFilters.steps]]) {
    const s = $(sel), have = new Set([...s.options].map((o) => o.value));
    for (const v of set) if (!have.has(v)) s.add(new Option(v, v));
  }
  table("#dead-letters", rows, (l) => [time(l.time_ms), l.kind, l.step, l.reason, l.origin + (l.position ? " " + l.position : "")]);
}
$("#dl-kind").addEventListener("change", deadLetters);
$("#dl-step").addEventListener("change", deadLetters);

async function refresh() {
  const r = await fetch("/api/console");
  if (r.ok) apply(await r.json());
}

refresh().then(() => {
  const es = new EventSource("/api/console/stream");
  es.addEventListener("snapshot", (e) => apply(JSON.parse(e.data)));
  deadLetters();
  setInterval(deadLetters, 2000);
});
