// bdh explore: the page. Plain JavaScript, no library; every number comes from the JSON API of
// bdh/explore/server.py. One column per model; each column keeps its own state (`col`).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};
const fmt = (v, d = 3) => (v === null || v === undefined ? "–"
  : Math.abs(v) >= 10 ** d ? Number(v).toFixed(0) : Number(v).toPrecision(d));
const pct = (v) => (100 * v).toFixed(1) + "%";

let MODELS = [];
let LIMITS = {};
const columns = [];

function message(text, ok = false) {
  const m = $("#message");
  m.textContent = text || "";
  m.className = ok ? "ok" : "";
}

// POST JSON with a few retries when the server says it is busy (429).
async function api(path, body) {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                   body: JSON.stringify(body)});
    if (res.status === 429 && attempt < 20) { await new Promise(r => setTimeout(r, 250)); continue; }
    const data = await res.json().catch(() => ({error: `HTTP ${res.status}`}));
    if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
    return data;
  }
}

// colour ramps -----------------------------------------------------------------------------------
function lossColour(loss) {
  if (loss === null) return "transparent";
  const s = Math.min(1, loss / 6);
  return `hsl(${12 - 12 * s}, 85%, ${100 - 42 * s}%)`;
}
const RAMP = [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107], [0, 0, 0]];
function heat(v) {  // v in [0, 1]
  const x = Math.max(0, Math.min(1, v)) * (RAMP.length - 1), i = Math.min(RAMP.length - 2, Math.floor(x)), f = x - i;
  return RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
}

// a small line chart: series [{values, colour, right}] over positions; marker: a position to mark.
function chart(canvas, series, marker = null, onPick = null) {
  canvas.setAttribute("data-drawn", "1");  // shown from now on, so that it has a width to measure
  const w = canvas.clientWidth || 600, h = canvas.height;
  canvas.width = w;
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, w, h);
  const pad = {l: 34, r: 38, t: 6, b: 14};
  const n = Math.max(...series.map(s => s.values.length), 1);
  const xAt = (t) => pad.l + (n <= 1 ? 0 : t / (n - 1)) * (w - pad.l - pad.r);
  g.font = "10px system-ui, sans-serif";
  g.strokeStyle = "#e3e6ec";
  g.strokeRect(pad.l, pad.t, w - pad.l - pad.r, h - pad.t - pad.b);
  for (const s of series) {
    const vals = s.values.filter(v => v !== null && isFinite(v));
    if (!vals.length) continue;
    const lo = s.min ?? Math.min(0, ...vals), hi = Math.max(s.max ?? -Infinity, ...vals, lo + 1e-9);
    const yAt = (v) => h - pad.b - (v - lo) / (hi - lo) * (h - pad.t - pad.b);
    g.strokeStyle = s.colour; g.lineWidth = 1.4; g.beginPath();
    let started = false;
    s.values.forEach((v, t) => {
      if (v === null || !isFinite(v)) { started = false; return; }
      if (started) g.lineTo(xAt(t), yAt(v)); else { g.moveTo(xAt(t), yAt(v)); started = true; }
    });
    g.stroke();
    g.fillStyle = s.colour;
    g.textAlign = s.right ? "left" : "right";
    const x = s.right ? w - pad.r + 3 : pad.l - 3;
    g.fillText(s.label ? s.label(hi) : fmt(hi, 2), x, pad.t + 8);
    g.fillText(s.label ? s.label(lo) : fmt(lo, 2), x, h - pad.b);
  }
  g.fillStyle = "#8a93a6"; g.textAlign = "left";
  g.fillText("position 0", pad.l, h - 2);
  g.textAlign = "right"; g.fillText(String(n - 1), w - pad.r, h - 2);
  if (marker !== null) {
    g.strokeStyle = "#3457d5"; g.lineWidth = 1; g.beginPath();
    g.moveTo(xAt(marker), pad.t); g.lineTo(xAt(marker), h - pad.b); g.stroke();
  }
  canvas.onclick = onPick && ((ev) => {
    const t = Math.round((ev.offsetX - pad.l) / (w - pad.l - pad.r) * (n - 1));
    if (t >= 0 && t < n) onPick(t);
  });
}

// one column per model ------------------------------------------------------------------------------
function makeColumn(m, info) {
  const root = $("#column-template").content.firstElementChild.cloneNode(true);
  root.id = `col-${m}`;
  $(".model-name", root).textContent = info.name;
  $(".model-info", root).textContent =
    `${info.model_type} · ${info.n_layer} layers × ${info.n_head} heads × ${info.neurons_per_head} neurons ` +
    `(n = ${info.n_neurons}) · d = ${info.n_embd} · ${(info.params / 1e6).toFixed(2)} M parameters · ` +
    `${info.tokenizer} tokenizer`;
  for (const [cls, def] of [["concept", info.default_contrast[0]], ["control", info.default_contrast[1]]]) {
    const sel = $("." + cls, root);
    for (const name of info.contrast_sets) sel.append(el("option", {value: name, text: name}));
    sel.value = def;
  }
  const col = {m, info, root, text: "", read: null, pos: null, neuron: null, concepts: null, site: "y"};
  $(".site", root).addEventListener("change", (ev) => { col.site = ev.target.value; drawStrips(col); });
  $(".concept-btn", root).addEventListener("click", () => findConcepts(col));
  if (info.n_layer < 2) $(".synapses", root).remove();
  $("#columns").append(root);
  return col;
}

async function readAll() {
  const text = $("#text").value;
  if (!text) { message("type some text first"); return; }
  message("reading…", true);
  $("#read-btn").disabled = true;
  try {
    await Promise.all(columns.map(col => readColumn(col, text)));
    message("");
  } catch (err) {
    message(err.message);
  } finally {
    $("#read-btn").disabled = false;
  }
}

async function readColumn(col, text) {
  const data = await api("/api/read", {model: col.m, text, top: 5});
  col.text = text; col.read = data; col.neuron = null; col.fires = null;
  $(".neuron", col.root).classList.add("hidden");
  $(".summary", col.root).textContent =
    `${data.n_tokens} tokens · mean loss ${fmt(data.mean_loss)} nats/token`;
  renderTokens(col);
  if (col.concepts) await findConcepts(col);
  await selectPosition(col, data.n_tokens - 1, true);
}

function yShare(col, t) {
  const rows = col.read.y_active[t];
  let sum = 0; for (const layer of rows) for (const c of layer) sum += c;
  return sum / (col.info.n_neurons * col.info.n_layer);
}

function renderTokens(col) {
  const box = $(".tokens", col.root);
  box.replaceChildren();
  const r = col.read;
  const shares = r.pieces.map((_, t) => yShare(col, t));
  const top = Math.max(...shares, 1e-9);
  r.pieces.forEach((piece, t) => {
    const span = el("span", {class: "tok", "data-t": t, text: piece});
    span.style.background = lossColour(r.loss[t]);
    const best = r.top[t][0];
    span.title = `position ${t}: next-token loss ${fmt(r.loss[t])}; ` +
      `predicts ${best.piece} (${pct(best.p)}); y firing ${pct(shares[t])}`;
    const bar = el("span", {class: "bar"});
    bar.style.width = `${100 * shares[t] / top}%`;
    span.append(bar);
    span.addEventListener("click", () => selectPosition(col, t));
    box.append(span);
    if (piece === "↵") box.append(document.createElement("br"));
  });
  paintFires(col);
  drawCurve(col);
}

function drawCurve(col) {
  const r = col.read;
  chart($(".curve", col.root), [
    {values: r.loss, colour: "#d9480f"},
    {values: r.pieces.map((_, t) => yShare(col, t)), colour: "#2b8a3e", right: true, label: pct},
  ], col.pos, (t) => selectPosition(col, t));
}

function paintFires(col) {
  const spans = col.root.querySelectorAll(".tokens .tok");
  spans.forEach(s => s.classList.remove("fires", "concept"));
  if (col.neuron) col.neuron.values.forEach((v, t) => { if (v > 0 && spans[t]) spans[t].classList.add("fires"); });
  if (col.fires) for (const t of col.fires) if (spans[t]) spans[t].classList.add("concept");
}

// Choosing a position in one column chooses it in the others that read the same tokens.
async function selectPosition(col, t, alone = false) {
  if (!alone) {
    const same = (c) => c !== col && c.read && c.read.ids.length === col.read.ids.length &&
                        c.read.ids.every((id, k) => id === col.read.ids[k]);
    columns.filter(same).forEach(c => selectPosition(c, t, true));
  }
  col.pos = t;
  col.root.querySelectorAll(".tokens .tok.selected").forEach(s => s.classList.remove("selected"));
  const span = col.root.querySelector(`.tokens .tok[data-t="${t}"]`);
  if (span) span.classList.add("selected");
  drawCurve(col);
  try {
    const p = await api("/api/position", {model: col.m, text: col.text, position: t});
    if (col.pos !== t) return;
    col.position = p;
    renderPosition(col);
    if (col.info.n_layer >= 2) await loadSynapses(col);
  } catch (err) { message(err.message); }
}

function renderPosition(col) {
  const p = col.position, r = col.read, t = p.position;
  const panel = $(".position", col.root);
  panel.classList.remove("hidden");
  $(".pos-title", panel).textContent = `${t}: ${p.token.context}`;
  const cands = $(".cands", panel);
  cands.replaceChildren(el("tr", {}, el("th", {text: "candidate"}), el("th", {class: "num", text: "p"}), el("th")));
  const actual = t + 1 < r.ids.length ? r.ids[t + 1] : null;
  for (const c of r.top[t]) {
    const bar = el("span", {class: "pbar"}); bar.style.width = `${Math.round(120 * c.p)}px`;
    const name = el("span", {class: "piece", text: c.piece});
    if (c.id === actual) name.append(" ✓");
    cands.append(el("tr", {}, el("td", {}, name), el("td", {class: "num", text: pct(c.p)}), el("td", {}, bar)));
  }
  $(".loss-line", panel).textContent = actual === null
    ? "last position: nothing to predict against"
    : `actual next: ${r.pieces[t + 1]} · loss ${fmt(r.loss[t])} nats (p = ${pct(Math.exp(-r.loss[t]))})`;
  const counts = $(".counts", panel);
  const head = el("tr", {}, el("th", {text: "layer"}));
  for (let h = 0; h < col.info.n_head; h++) head.append(el("th", {class: "num", text: `head ${h}`}));
  counts.replaceChildren(head);
  p.x_active.forEach((row, l) => {
    const tr = el("tr", {}, el("td", {text: String(l)}));
    row.forEach((x, h) => tr.append(el("td", {class: "num", text: `${x} / ${p.y_active[l][h]}`})));
    counts.append(tr);
  });
  drawStrips(col);
  const tops = $(".top-neurons", panel);
  tops.replaceChildren();
  if (!p.top_y.length) tops.textContent = "no y neuron fires here";
  for (const n of p.top_y) {
    tops.append(el("button", {"data-layer": n.layer, "data-head": n.head, "data-neuron": n.neuron,
                              text: `L${n.layer} h${n.head} #${n.neuron} (${fmt(n.y, 2)})`,
                              onclick: () => selectNeuron(col, n.layer, n.head, n.neuron, "y")}));
  }
}

function drawStrips(col) {
  const p = col.position;
  if (!p) return;
  const box = $(".strips", col.root);
  box.replaceChildren();
  const values = p[col.site], top = p[col.site + "_max"] || 1;
  const nh = col.info.n_head, N = col.info.neurons_per_head, rowH = 6;
  values.forEach((heads, l) => {
    box.append(el("div", {class: "strip-label", text: `layer ${l}`}));
    const c = el("canvas", {width: N, height: nh * rowH, "data-layer": l});
    const g = c.getContext("2d"), img = g.createImageData(N, nh * rowH);
    heads.forEach((row, h) => row.forEach((v, i) => {
      const [R, G, B] = v > 0 ? heat(0.15 + 0.85 * v / top) : [246, 247, 249];
      for (let y = h * rowH; y < (h + 1) * rowH - 1; y++) {
        const k = 4 * (y * N + i); img.data[k] = R; img.data[k + 1] = G; img.data[k + 2] = B; img.data[k + 3] = 255;
      }
    }));
    g.putImageData(img, 0, 0);
    c.addEventListener("click", (ev) => {
      const i = Math.floor(ev.offsetX / c.clientWidth * N), h = Math.floor(ev.offsetY / c.clientHeight * nh);
      selectNeuron(col, l, Math.min(nh - 1, h), Math.min(N - 1, i), col.site);
    });
    c.title = `layer ${l}: ${nh} heads × ${N} neurons; click a neuron`;
    box.append(c);
  });
}

async function selectNeuron(col, layer, head, neuron, site) {
  try {
    const d = await api("/api/neuron", {model: col.m, text: col.text, layer, head, neuron, site});
    col.neuron = d;
    const panel = $(".neuron", col.root);
    panel.classList.remove("hidden");
    $(".neuron-title", panel).textContent =
      `#${d.neuron} of head ${d.head} (neuron ${d.index} of ${col.info.n_neurons}), ${d.site} in layer ${d.layer}: ` +
      `fires at ${d.fires} of ${d.n_tokens} positions`;
    chart($(".neuron-curve", panel), [{values: d.values, colour: "#7048e8"}], col.pos, (t) => selectPosition(col, t));
    const list = $(".strongest", panel);
    list.replaceChildren();
    if (!d.strongest.length) list.append(el("li", {text: "never fires on this text"}));
    for (const s of d.strongest) {
      list.append(el("li", {"data-t": s.position, text: `${fmt(s.value, 3)} at ${s.position}: ${s.context}`,
                            onclick: () => selectPosition(col, s.position)}));
    }
    for (const [cls, edges] of [[".out-edges", d.out_edges], [".in-edges", d.in_edges]]) {
      const table = $(cls, panel);
      table.replaceChildren(el("tr", {}, el("th", {text: "neuron"}), el("th", {class: "num", text: "G"})));
      for (const e of edges) {
        const go = el("button", {class: "link", text: `h${e.head} #${e.neuron}`,
                                 onclick: () => selectNeuron(col, layer, e.head, e.neuron, site)});
        table.append(el("tr", {}, el("td", {}, go), el("td", {class: "num", text: fmt(e.weight, 3)})));
      }
    }
    paintFires(col);
  } catch (err) { message(err.message); }
}

async function loadSynapses(col) {
  const t = col.pos;
  const d = await api("/api/synapses", {model: col.m, text: col.text, position: t, k: 12});
  if (col.pos !== t) return;
  const panel = $(".synapses", col.root);
  panel.classList.remove("hidden");
  $(".syn-title", panel).textContent = `after position ${t} (${d.token.context})`;
  const table = $(".syn-table", panel);
  table.replaceChildren(el("tr", {}, el("th", {text: "layer"}), el("th", {text: "head"}),
                              el("th", {text: "pre i → post j"}), el("th", {class: "num", text: "σ"}), el("th")));
  for (const s of d.top) {
    const tr = el("tr", {}, el("td", {text: String(s.layer)}), el("td", {text: String(s.head)}),
                  el("td", {text: `${s.i} → ${s.j}`}), el("td", {class: "num", text: fmt(s.value, 3)}),
                  el("td", {}, s.concept ? el("span", {class: "star", title: `concept synapse (${s.concept})`, text: "★"})
                                         : ""));
    tr.addEventListener("click", () => traceSynapse(col, s, tr));
    table.append(tr);
  }
  if (col.synapse) await traceSynapse(col, col.synapse);
}

async function traceSynapse(col, s, row = null) {
  col.synapse = s;
  col.root.querySelectorAll(".syn-table tr.chosen").forEach(r => r.classList.remove("chosen"));
  if (row) row.classList.add("chosen");
  try {
    const d = await api("/api/trace", {model: col.m, text: col.text, layer: s.layer, head: s.head, i: s.i, j: s.j});
    const panel = $(".synapses", col.root);
    chart($(".syn-curve", panel), [{values: d.values, colour: "#0b7285"}], col.pos, (t) => selectPosition(col, t));
    const grew = d.increments.map((v, t) => [v, t]).filter(([v]) => v > 0).sort((a, b) => b[0] - a[0]).slice(0, 5);
    const at = grew.map(([, t]) => `${col.read.pieces[t]}@${t}`).join(", ");
    $(".syn-caption", panel).textContent =
      `σ(${s.i} → ${s.j}), layer ${s.layer}, head ${s.head}, as the text is read; it grew most at ${at || "no position"}`;
  } catch (err) { message(err.message); }
}

async function findConcepts(col) {
  const panel = $(".synapses", col.root);
  const box = $(".concepts", panel);
  const concept = $(".concept", panel).value, control = $(".control", panel).value;
  box.textContent = "ranking synapses on the shipped sentence sets (the first time takes a while)…";
  try {
    const d = await api("/api/concepts", {model: col.m, text: col.text || $("#text").value, concept, control});
    col.concepts = d;
    col.fires = new Set((d.fires || []).flat());
    box.replaceChildren(el("div", {class: "hint",
      text: `${d.top.length} synapses that grow more on ${d.concept} than on ${d.control} sentences ` +
            `(Mann-Whitney, of ${d.n_synapses.toLocaleString()} synapses). Underlined in the text: where one fires.`}));
    const table = el("table");
    table.append(el("tr", {}, el("th", {text: "synapse"}), el("th", {class: "num", text: "r"}),
                    el("th", {class: "num", text: "p"}), el("th", {text: "driven by"}), el("th", {text: "fires at"})));
    d.top.forEach((s, k) => {
      const words = (s.drivers || []).map(w => w.word).join(", ");
      const fires = d.fires ? d.fires[k].length : 0;
      const tr = el("tr", {}, el("td", {text: `L${s.layer} h${s.head} ${s.i}→${s.j}`}),
                    el("td", {class: "num", text: fmt(s.rank_biserial, 2)}), el("td", {class: "num", text: fmt(s.p, 2)}),
                    el("td", {text: words}), el("td", {class: "num", text: String(fires)}));
      tr.style.cursor = "pointer";
      tr.addEventListener("click", () => traceSynapse(col, s));
      table.append(tr);
    });
    box.append(table);
    if (col.read) { paintFires(col); if (col.pos !== null) await loadSynapses(col); }
  } catch (err) { box.textContent = err.message; }
}

// Generate: one stream per model, one JSON line per token ---------------------------------------------
async function generateAll() {
  const text = $("#text").value;
  if (!text) { message("type some text first"); return; }
  const body = {text, max_new_tokens: Number($("#max-new").value), temperature: Number($("#temperature").value),
                seed: Number($("#seed").value)};
  const k = $("#top-k").value.trim();
  body.top_k = k === "" ? null : Number(k);
  $("#gen-btn").disabled = true;
  message("generating…", true);
  try {
    await Promise.all(columns.map(col => generateColumn(col, {...body, model: col.m})));
    message("");
  } catch (err) { message(err.message); }
  finally { $("#gen-btn").disabled = false; }
}

async function generateColumn(col, body) {
  const out = $(".gen-out", col.root), stats = $(".gen-stats", col.root);
  out.removeAttribute("data-done");
  out.replaceChildren(el("span", {class: "prompt", text: body.text}));
  const gen = el("span", {class: "gen"});
  out.append(gen);
  const res = await fetch("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(body)});
  if (!res.ok) {
    const data = await res.json().catch(() => ({error: `HTTP ${res.status}`}));
    throw new Error(data.error || `HTTP ${res.status}`);
  }
  const reader = res.body.getReader(), decoder = new TextDecoder();
  const started = performance.now();
  let buffer = "", n = 0, ySum = 0;
  const total = col.info.n_neurons * col.info.n_layer;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl); buffer = buffer.slice(nl + 1);
      if (!line) continue;
      const ev = JSON.parse(line);
      if (ev.error) throw new Error(ev.error);
      n += 1; ySum += ev.y_active.reduce((a, b) => a + b, 0) / total;
      if (ev.text) {
        const span = el("span", {text: ev.text});
        span.title = `token ${ev.index}: p = ${pct(ev.p)}, y firing ${pct(ev.y_active.reduce((a, b) => a + b, 0) / total)}`;
        gen.append(span);
      }
      out.scrollTop = out.scrollHeight;
      const secs = (performance.now() - started) / 1000;
      stats.textContent = `${n} tokens · ${(n / Math.max(secs, 1e-3)).toFixed(1)} tokens/s · ` +
        `y firing ${pct(ySum / n)} on average · from the carried state, never re-read`;
    }
  }
  out.setAttribute("data-done", "1");
}

// start ----------------------------------------------------------------------------------------------
async function start() {
  const res = await fetch("/api/models");
  const data = await res.json();
  MODELS = data.models; LIMITS = data.limits;
  document.documentElement.style.setProperty("--n", String(MODELS.length));
  $("#columns").style.setProperty("--n", String(MODELS.length));
  $("#models-line").textContent = MODELS.map(m => m.name).join("  |  ");
  MODELS.forEach((info, m) => columns.push(makeColumn(m, info)));
  const text = $("#text");
  text.maxLength = LIMITS.max_chars;
  $("#max-new").max = LIMITS.max_new_tokens;
  const count = () => { $("#chars").textContent = `${text.value.length} / ${LIMITS.max_chars} characters`; };
  text.addEventListener("input", count); count();
  text.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) readAll(); });
  $("#read-btn").addEventListener("click", readAll);
  $("#gen-btn").addEventListener("click", generateAll);
  document.body.setAttribute("data-ready", "1");
}

start().catch(err => message(`cannot reach the server: ${err.message}`));
