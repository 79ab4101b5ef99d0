/* Small SVG charts for the LLMOps page (no library, no network): line charts over time with optional threshold
   lines, and a stacked bar of traffic weights. Every text goes in through textContent. */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmtTime(t) {
    const d = new Date(t * 1000);
    return d.toISOString().slice(11, 16);
  }

  function fmtNum(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a >= 1) return v.toFixed(2);
    return v.toPrecision(2);
  }

  /* spec: {title, series: [{name, points: [[x, y], ...]}], thresholds: [{y, label}], width, height, yMin,
     xFormat: "time" | "index", labels: [..] for index x} */
  function lineChart(container, spec) {
    const width = spec.width || 420, height = spec.height || 180;
    const pad = { l: 44, r: 10, t: 8, b: 22 };
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.chart = spec.id || spec.title || "";
    const title = document.createElement("div");
    title.className = "chart-title";
    title.textContent = spec.title || "";
    box.appendChild(title);
    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" }, box);
    el("title", {}, svg).textContent = spec.title || "chart";
    const pts = spec.series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
    const ys = pts.map((p) => p[1]).concat((spec.thresholds || []).map((t) => t.y).filter((y) => y !== null));
    const xs = pts.map((p) => p[0]);
    if (!pts.length) {
      const t = el("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, svg);
      t.textContent = "no data yet";
      container.appendChild(box);
      return box;
    }
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    let y0 = spec.yMin !== undefined ? spec.yMin : Math.min(0, ...ys), y1 = Math.max(...ys);
    if (y0 === y1) y1 = y0 + 1;
    y1 += (y1 - y0) * 0.08;
    const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
    const sy = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
    el("line", { x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b, stroke: "#d1d5db" }, svg);
    el("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b, stroke: "#d1d5db" }, svg);
    for (const v of [y0, (y0 + y1) / 2, y1]) {
      const t = el("text", { x: pad.l - 4, y: sy(v) + 3, "text-anchor": "end" }, svg);
      t.textContent = fmtNum(v);
    }
    const xl = spec.xFormat === "index" ? (x) => (spec.labels && spec.labels[x]) || String(x) : fmtTime;
    for (const v of [x0, x1]) {
      const t = el("text", { x: sx(v), y: height - 6, "text-anchor": v === x0 ? "start" : "end" }, svg);
      t.textContent = xl(v);
    }
    (spec.thresholds || []).forEach((th, i) => {
      if (th.y === null || th.y === undefined) return;
      const c = COLORS[(i + 1) % COLORS.length];
      el("line", { x1: pad.l, x2: width - pad.r, y1: sy(th.y), y2: sy(th.y), stroke: th.color || c, "stroke-dasharray": "4 3", class: "threshold" }, svg);
      const t = el("text", { x: width - pad.r - 2, y: sy(th.y) - 3, "text-anchor": "end" }, svg);
      t.textContent = th.label || "threshold";
    });
    const legend = document.createElement("div");
    legend.className = "legend";
    spec.series.forEach((s, i) => {
      const color = s.color || COLORS[i % COLORS.length];
      const good = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
      if (good.length > 1) {
        const d = good.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
        el("path", { d, fill: "none", stroke: color, "stroke-width": 1.6 }, svg);
      }
      for (const p of good) {
        const c = el("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.6, fill: p[2] || color, class: "pt" }, svg);
        el("title", {}, c).textContent = `${s.name}: ${fmtNum(p[1])} at ${xl(p[0])}`;
      }
      const item = document.createElement("span");
      const sw = document.createElement("i");
      sw.style.background = color;
      item.appendChild(sw);
      item.appendChild(document.createTextNode(s.name));
      legend.appendChild(item);
    });
    box.appendChild(legend);
    container.appendChild(box);
    return box;
  }

  /* weights: {variant: percent} -> a stacked bar */
  function weightBar(container, weights) {
    const width = 420, height = 26;
    const box = document.createElement("div");
    box.className = "chart weights";
    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" }, box);
    el("title", {}, svg).textContent = "traffic weights";
    let x = 0;
    Object.entries(weights).forEach(([name, w], i) => {
      const wpx = (Math.max(0, Number(w)) / 100) * width;
      const r = el("rect", { x, y: 0, width: wpx, height, fill: COLORS[i % COLORS.length], class: "weight", "data-variant": name, "data-weight": w }, svg);
      el("title", {}, r).textContent = `${name}: ${fmtNum(Number(w))} %`;
      if (wpx > 40) {
        const t = el("text", { x: x + 4, y: 17, fill: "#fff" }, svg);
        t.textContent = `${name} ${fmtNum(Number(w))}%`;
        t.setAttribute("class", "on-bar");
      }
      x += wpx;
    });
    container.appendChild(box);
    return box;
  }

  window.LLMOpsCharts = { lineChart, weightBar, fmtNum, fmtTime, COLORS };
})();
