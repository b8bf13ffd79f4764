// evio topology page (served by `evioctl ui`). Data comes from etcd and is treated as untrusted: it only
// ever reaches the DOM through textContent and setAttribute on fixed attribute names (never innerHTML).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const KINDS = ["direct", "relay", "connecting", "idle"];
let topo = { nodes: [], edges: [], version: 0 };
let selected = null;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function kindClass(k) {
  return "k-" + (KINDS.includes(k) ? k : "unknown");
}

function rate(bps) {
  const u = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
  let v = Number(bps) || 0, i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(Math.round(v))) + " " + u[i];
}

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n) || 0, i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(Math.round(v))) + " " + u[i];
}

function rtt(ms) {
  return ms === null || ms === undefined ? "-" : Number(ms).toFixed(2) + " ms";
}

function filters() {
  const q = document.getElementById("search").value.trim().toLowerCase();
  const kinds = new Set();
  for (const c of document.querySelectorAll("input.kind")) if (c.checked) kinds.add(c.value);
  return { q, kinds };
}

// Circle layout: the nodes on one ring in name order, labels pointing outwards, so 100 nodes stay legible.
const LABEL_MAX = 24;

function label(name) {
  return name.length > LABEL_MAX ? name.slice(0, LABEL_MAX - 1) + "…" : name;
}

// The ring gives each node ~16 units of arc (11-unit labels do not touch) and the square leaves room for the
// longest label, so the drawing scales to the panel with text at about its nominal size.
function layout(nodes) {
  const n = nodes.length;
  const r = Math.max(110, (n * 16) / (2 * Math.PI));
  const longest = nodes.reduce((m, x) => Math.max(m, label(x.name).length + 7), 0);
  const size = 2 * (r + 20 + longest * 6.5);
  const pos = new Map();
  nodes.forEach((node, i) => {
    const a = (2 * Math.PI * i) / Math.max(n, 1) - Math.PI / 2;
    pos.set(node.name, { x: size / 2 + r * Math.cos(a), y: size / 2 + r * Math.sin(a), a });
  });
  return { pos, size };
}

function renderGraph() {
  const box = document.getElementById("graph");
  const { pos, size } = layout(topo.nodes);
  const { q, kinds } = filters();
  const root = svg("svg", { viewBox: `0 0 ${size} ${size}`, role: "img", "aria-label": "topology" });
  const edges = svg("g", { class: "edges" });
  // RTT and throughput on the lines only where they stay readable: a handful of edges, or the edges of the
  // selected node (every edge has them in its tooltip).
  const few = topo.edges.length <= 6;
  for (const e of topo.edges) {
    const p = pos.get(e.a), o = pos.get(e.b);
    if (!p || !o) continue;
    const match = !q || e.a.toLowerCase().includes(q) || e.b.toLowerCase().includes(q);
    const cls = ["edge", kindClass(e.kind)];
    if (!kinds.has(e.kind) && KINDS.includes(e.kind)) cls.push("hidden");
    if (!match) cls.push("dim");
    if (selected && e.a !== selected && e.b !== selected) cls.push("dim");
    const line = svg("line", {
      class: cls.join(" "), x1: p.x, y1: p.y, x2: o.x, y2: o.y,
      "data-a": e.a, "data-b": e.b, "data-kind": e.kind,
    });
    line.appendChild(svg("title", {}, `${e.a} – ${e.b}: ${e.kind}, RTT ${rtt(e.rttMs)}, ${rate(e.rate)}`));
    edges.appendChild(line);
    if (few || (selected && (e.a === selected || e.b === selected))) {
      edges.appendChild(svg("text", {
        x: (p.x + o.x) / 2, y: (p.y + o.y) / 2 - 3, "text-anchor": "middle", "font-size": 10,
        class: "edge-label " + kindClass(e.kind), fill: "currentColor",
      }, `${rtt(e.rttMs)} · ${rate(e.rate)}`));
    }
  }
  root.appendChild(edges);
  const nodes = svg("g", { class: "nodes" });
  for (const n of topo.nodes) {
    const p = pos.get(n.name);
    const match = !q || n.name.toLowerCase().includes(q);
    const cls = ["node", n.up ? "up" : "down"];
    if (!match) cls.push("dim");
    if (selected === n.name) cls.push("sel");
    const g = svg("g", { class: cls.join(" "), "data-node": n.name, "data-up": n.up ? "true" : "false" });
    g.appendChild(svg("circle", { cx: p.x, cy: p.y, r: topo.nodes.length > 50 ? 4.5 : 8 }));
    const deg = (p.a * 180) / Math.PI;
    const flip = Math.cos(p.a) < 0;
    const text = svg("text", {
      x: p.x, y: p.y, dy: "0.35em",
      "text-anchor": flip ? "end" : "start",
      transform: `rotate(${flip ? deg + 180 : deg} ${p.x} ${p.y}) translate(${flip ? -12 : 12} 0)`,
    }, label(n.name) + (n.up ? "" : " (down)"));
    g.appendChild(text);
    g.appendChild(svg("title", {}, `${n.name} ${n.address || ""} ${n.up ? "up" : "down"}`));
    g.addEventListener("click", () => select(n.name));
    nodes.appendChild(g);
  }
  root.appendChild(nodes);
  box.replaceChildren(root);
}

function renderTable() {
  const { q } = filters();
  const body = document.querySelector("#nodes tbody");
  const rows = [];
  for (const n of topo.nodes) {
    const tr = el("tr", { "data-node": n.name, "data-up": n.up ? "true" : "false" });
    if (q && !n.name.toLowerCase().includes(q)) tr.classList.add("hidden");
    if (selected === n.name) tr.classList.add("sel");
    const name = el("td", { class: "name" });
    const a = el("a", { href: "#" + encodeURIComponent(n.name) }, n.name);
    a.addEventListener("click", (ev) => { ev.preventDefault(); select(n.name); });
    name.appendChild(a);
    tr.appendChild(name);
    tr.appendChild(el("td", { class: "state " + (n.up ? "st-up" : "st-down") }, n.up ? "up" : "down"));
    tr.appendChild(el("td", { class: "vip" }, n.address || "-"));
    tr.appendChild(el("td", { class: "subnet" }, n.podSubnet || "-"));
    tr.appendChild(el("td", { class: "nat" }, n.nat + (n.relay ? " (+relay)" : "")));
    tr.appendChild(el("td", { class: "mapping" }, (n.publicMapping || []).join(", ") || "-"));
    tr.appendChild(el("td", { class: "version" }, n.version || "-"));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const up = topo.nodes.filter((n) => n.up).length;
  const byKind = {};
  for (const e of topo.edges) byKind[e.kind] = (byKind[e.kind] || 0) + 1;
  const parts = Object.keys(byKind).sort().map((k) => `${byKind[k]} ${k}`);
  document.getElementById("summary").textContent =
    `${up}/${topo.nodes.length} nodes up · ${topo.edges.length} paths` + (parts.length ? ` (${parts.join(", ")})` : "");
  const conn = document.getElementById("conn");
  conn.textContent = topo.etcdConnected ? "live" : "etcd unreachable";
  conn.className = topo.etcdConnected ? "" : "down";
}

async function renderDetail() {
  const box = document.getElementById("detail");
  if (!selected) { box.replaceChildren(); return; }
  let d;
  try {
    const r = await fetch("/api/nodes/" + encodeURIComponent(selected), { cache: "no-store" });
    if (!r.ok) { box.replaceChildren(el("p", {}, `${selected}: gone`)); return; }
    d = await r.json();
  } catch (e) {
    return;
  }
  const n = d.node;
  const parts = [el("h2", { id: "detail-title" }, `${n.name} — ${n.up ? "up" : "down"}`)];
  const info = el("table", { id: "detail-info" });
  const rows = [
    ["VIP", n.address || "-"], ["pod subnet", n.podSubnet || "-"], ["NAT", n.nat],
    ["public mapping", (n.publicMapping || []).join(", ") || "-"], ["version", n.version || "-"],
    ["endpoints", (d.endpoints || []).join(", ") || "-"], ["candidates", (d.candidates || []).join(", ") || "-"],
    ["summary written", n.summaryTime ? `${Math.max(0, d.now - n.summaryTime)} s ago` : "-"],
  ];
  for (const [k, v] of rows) {
    const tr = el("tr");
    tr.appendChild(el("th", {}, k));
    tr.appendChild(el("td", {}, v));
    info.appendChild(tr);
  }
  parts.push(info);
  const peers = el("table", { id: "detail-peers" });
  const head = el("tr");
  for (const h of ["peer", "path", "endpoint", "RTT", "handshake", "rx", "tx", "throughput"]) head.appendChild(el("th", {}, h));
  peers.appendChild(head);
  for (const p of d.peers || []) {
    const tr = el("tr", { "data-peer": p.peer, "data-kind": p.kind });
    const hs = p.lastHandshake ? `${Math.max(0, d.now - p.lastHandshake)} s ago` : "never";
    const cells = [p.peer, p.kind, p.endpoint || "-", rtt(p.rttMs), hs, bytes(p.rxBytes), bytes(p.txBytes),
      `${rate(p.rxRate)} in, ${rate(p.txRate)} out`];
    cells.forEach((c, i) => tr.appendChild(el("td", i === 1 ? { class: kindClass(p.kind) } : {}, c)));
    peers.appendChild(tr);
  }
  if (!(d.peers || []).length) {
    const tr = el("tr");
    tr.appendChild(el("td", { colspan: 8 }, "(no peers reported)"));
    peers.appendChild(tr);
  }
  parts.push(peers);
  box.replaceChildren(...parts);
}

function select(name) {
  selected = selected === name ? null : name;
  if (selected) history.replaceState(null, "", "#" + encodeURIComponent(selected));
  render();
}

function render() {
  renderGraph();
  renderTable();
  renderDetail();
}

async function refresh() {
  try {
    const r = await fetch("/api/topology", { cache: "no-store" });
    if (!r.ok) throw new Error(String(r.status));
    topo = await r.json();
    document.body.setAttribute("data-version", String(topo.version));
  } catch (e) {
    topo.etcdConnected = false;
  }
  render();
}

function main() {
  if (location.hash.length > 1) selected = decodeURIComponent(location.hash.slice(1));
  document.getElementById("search").addEventListener("input", render);
  for (const c of document.querySelectorAll("input.kind")) c.addEventListener("change", render);
  // The server embeds the topology as of the page load (a JSON data block, never executed): first paint
  // without a round trip.
  const initial = document.getElementById("initial");
  if (initial) {
    try {
      topo = JSON.parse(initial.textContent);
      document.body.setAttribute("data-version", String(topo.version));
      render();
    } catch (e) { /* read it below */ }
  }
  refresh();
  // Live: the server announces every change (the version); the page then reads the topology again.
  const es = new EventSource("/api/events");
  es.addEventListener("topology", (ev) => {
    if (String(ev.data) !== String(topo.version)) refresh();
  });
  es.onerror = () => {
    document.getElementById("conn").textContent = "reconnecting…";
  };
}

main();
