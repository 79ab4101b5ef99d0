/* The LLMOps page: models, endpoints, drift and the actions log, from /llmops/ui/api/*. Everything read from the
   stores is written with textContent: model names, reasons and report paths are data, never markup. */
"use strict";
(function () {
  const C = window.LLMOpsCharts;

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = String(v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }

  function table(headers, rows, attrs) {
    return h("table", attrs || {}, h("thead", {}, h("tr", {}, ...headers.map((x) => h("th", { text: x })))),
      h("tbody", {}, ...rows));
  }

  function when(ts) {
    if (!ts) return "–";
    return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  function notice(text, kind) {
    const n = document.getElementById("notice");
    n.textContent = text || "";
    n.className = kind || "";
  }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({ credentials: "same-origin", headers: { Accept: "application/json" } }, options || {}));
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
      const err = new Error(`${response.status}: ${detail}`);
      err.status = response.status;
      throw err;
    }
    return body;
  }

  async function act(path, payload) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-LLMOps-Action": "1" },
      body: JSON.stringify(payload || {}),
    });
  }

  function artifactUrl(path) {
    return "../artifacts/" + String(path).split("/").map(encodeURIComponent).join("/");
  }

  function openReport(path) {
    const viewer = document.getElementById("viewer");
    document.getElementById("viewer-title").textContent = path;
    document.getElementById("viewer-frame").src = artifactUrl(path);
    viewer.hidden = false;
    viewer.scrollIntoView();
  }

  function reportLink(path, label) {
    return h("a", { href: artifactUrl(path), class: "report-link", "data-report": path, onclick: (e) => { e.preventDefault(); openReport(path); } }, label || "report");
  }

  // ---- models -------------------------------------------------------------------------------------------------
  function aliasTimeline(model) {
    const series = [];
    const versions = model.versions.map((v) => Number(v.version));
    Object.entries(model.alias_history || {}).forEach(([alias, moves]) => {
      series.push({ name: alias, points: moves.map((m) => [Number(m.at_ms) / 1000, Number(m.version)]) });
    });
    return C.lineChart(document.createElement("div"), {
      id: `alias-${model.name}`, title: "alias history (version over time)", series, yMin: Math.min(0, ...versions),
    });
  }

  function renderModels(data) {
    const root = document.getElementById("models");
    root.replaceChildren();
    if (data.error) root.appendChild(h("p", { class: "bad", text: data.error }));
    if (data.note) root.appendChild(h("p", { class: "muted", text: data.note }));
    if (!data.models.length) root.appendChild(h("p", { class: "muted", text: "No registered models." }));
    for (const model of data.models) {
      const card = h("div", { class: "card model", "data-model": model.name });
      card.appendChild(h("h2", { text: model.name }));
      card.appendChild(h("p", {}, "Aliases: ", ...Object.entries(model.aliases).map(([a, v]) => h("span", { class: "badge", text: `${a} → v${v}` }))));
      const historyRows = [];
      Object.entries(model.alias_history || {}).forEach(([alias, moves]) => {
        for (const m of moves.slice().reverse()) {
          historyRows.push(h("tr", { class: "alias-move" }, h("td", { text: alias }), h("td", { text: `v${m.version}` }),
            h("td", { text: m.previous ? `v${m.previous}` : "–" }), h("td", { text: m.at || "" }), h("td", { text: m.reason || "" })));
        }
      });
      const charts = h("div", { class: "charts" });
      charts.appendChild(aliasTimeline(model));
      const metricNames = [...new Set(model.versions.flatMap((v) => Object.keys(v.metrics || {})))].slice(0, 2);
      for (const metric of metricNames) {
        const pts = model.versions.slice().reverse().map((v) => [Number(v.version), v.metrics[metric] === undefined ? null : v.metrics[metric]]);
        C.lineChart(charts, { id: `metric-${model.name}-${metric}`, title: `${metric} by version`, series: [{ name: metric, points: pts }], xFormat: "index", labels: Object.fromEntries(pts.map((p) => [p[0], `v${p[0]}`])) });
      }
      card.appendChild(charts);
      card.appendChild(h("h3", { text: "Alias history" }));
      card.appendChild(historyRows.length ? table(["alias", "version", "previous", "at", "reason"], historyRows, { class: "alias-history" }) : h("p", { class: "muted", text: "No recorded alias moves." }));
      card.appendChild(h("h3", { text: "Versions" }));
      const rows = model.versions.map((v) => {
        const metrics = Object.entries(v.metrics || {}).slice(0, 6).map(([k, x]) => `${k}=${C.fmtNum(x)}`).join(", ");
        const actions = h("td");
        if (v.can_promote && !(v.aliases || []).includes("champion")) {
          actions.appendChild(h("button", { type: "button", class: "action promote", "data-version": v.version, onclick: (e) => confirmBox(e.target, `Confirm: ${model.name}@champion → v${v.version}`, false, () => promote(model.name, v.version)) }, "Promote to champion"));
        }
        return h("tr", { class: "version", "data-version": v.version },
          h("td", { text: `v${v.version}` }), h("td", { text: when(v.created_ms / 1000) }),
          h("td", {}, ...(v.aliases || []).map((a) => h("span", { class: "badge", text: a }))),
          h("td", { text: metrics || "–" }), h("td", { text: v.quantization || "–" }),
          h("td", {}, h("code", { text: v.data_manifest_hash ? v.data_manifest_hash.slice(0, 12) : "–", title: v.data_manifest_hash || "" })),
          h("td", { text: v.dag_run || "–" }), actions);
      });
      card.appendChild(table(["version", "created", "aliases", "metrics", "quantization", "data manifest", "DAG run", ""], rows, { class: "versions" }));
      root.appendChild(card);
    }
  }

  // The page runs in a sandboxed iframe without modals (no confirm/prompt): actions confirm in the page.
  function confirmBox(anchor, label, withReason, run, defaultReason) {
    const old = anchor.parentNode.querySelector(".confirm");
    if (old) old.remove();
    const reason = withReason ? h("input", { type: "text", class: "reason", "aria-label": "reason", value: defaultReason || "rolled back from the LLMOps page", size: 40 }) : null;
    const box = h("span", { class: "confirm" }, " ", reason,
      h("button", { type: "button", class: "action confirm-action danger", onclick: () => { box.remove(); run(reason ? reason.value : ""); } }, label),
      h("button", { type: "button", onclick: () => box.remove() }, "Cancel"));
    anchor.after(box);
  }

  async function promote(name, version) {
    try {
      const out = await act(`api/models/${encodeURIComponent(name)}/promote`, { version, alias: "champion" });
      notice(`${out.target}: ${out.outcome}`, "ok");
    } catch (e) { notice(`promote refused: ${e.message}`, "error"); }
    load();
  }

  // ---- endpoints --------------------------------------------------------------------------------------------
  function renderEndpoints(data) {
    const root = document.getElementById("endpoints");
    root.replaceChildren();
    if (!data.endpoints.length) root.appendChild(h("p", { class: "muted", text: "No endpoints recorded." }));
    for (const ep of data.endpoints) {
      const card = h("div", { class: "card endpoint", "data-endpoint": ep.name, "data-platform": ep.platform });
      card.appendChild(h("h2", {}, `${ep.name} `, h("span", { class: "badge", text: ep.platform }), h("span", { class: ep.up ? "good" : "bad", text: ep.up ? " up" : " not answering" })));
      if (ep.error) card.appendChild(h("p", { class: "bad", text: ep.error }));
      if (ep.owner_dag_id) card.appendChild(h("p", { class: "muted", text: `owned by DAG ${ep.owner_dag_id}` }));
      card.appendChild(h("h3", { text: "Traffic" }));
      C.weightBar(card, ep.weights || {});
      card.appendChild(table(["variant", "model", "weight %", "shadow", "requests (1 h)", "error rate", "p50 ms", "p95 ms"],
        (ep.variants || []).map((v) => h("tr", { class: "variant", "data-variant": v.name, "data-weight": v.weight },
          h("td", { text: v.name }), h("td", { text: v.source || "" }), h("td", { class: "weight", text: C.fmtNum(v.weight) }),
          h("td", { text: v.shadow ? "yes" : "" }), h("td", { text: v.requests ?? "–" }),
          h("td", { text: v.error_rate === null || v.error_rate === undefined ? "–" : `${(v.error_rate * 100).toFixed(2)} %` }),
          h("td", { text: C.fmtNum(v.p50_ms) }), h("td", { text: C.fmtNum(v.p95_ms) }))), { class: "variants" }));
      const ro = ep.rollout;
      if (ro) {
        card.appendChild(h("h3", { text: "Rollout" }));
        const slo = ro.slo || {};
        card.appendChild(h("p", { class: "rollout" }, h("span", { class: `state-${ro.state}`, text: ro.state }),
          ` ${ro.variant} (${ro.strategy || "?"}) — step ${ro.step + 1}/${ro.steps.length || "?"}`,
          ro.step_percent !== null ? ` at ${C.fmtNum(ro.step_percent)} %` : "",
          ro.bake_left_s !== null ? `, bake time left ${Math.round(ro.bake_left_s)} s` : "",
          ro.paused ? ", held (paused)" : "",
          ` — SLO: p95 ≤ ${slo.p95_latency_ms ?? "?"} ms, error rate ≤ ${slo.max_error_rate !== undefined ? (slo.max_error_rate * 100).toFixed(2) + " %" : "?"}, min ${slo.min_requests ?? "?"} requests`));
        if (ro.paused) card.appendChild(h("p", { class: "rollout-paused bad", text: `paused by ${ro.paused.by} at ${when(ro.paused.at)}: ${ro.paused.reason || "–"} — the step holds its traffic and is still judged; it rolls back if the pause outlasts the operator's max_pause_s` }));
        else if (ro.message) card.appendChild(h("p", { class: "rollout-message", text: ro.message }));
        if (ro.verdicts.length) {
          card.appendChild(table(["step", "%", "status", "after s", "verdict"], ro.verdicts.map((v) =>
            h("tr", { class: "verdict" }, h("td", { text: (v.step ?? 0) + 1 }), h("td", { text: C.fmtNum(v.percent) }),
              h("td", { class: v.status === "passed" ? "good" : "bad", text: v.status }), h("td", { text: C.fmtNum(v.elapsed_s) }), h("td", { text: v.message || "" })))));
        }
        if (ep.can_edit && (ro.state === "in_progress" || ro.state === "failed")) {
          const buttons = h("p", {}, h("button", { type: "button", class: "action rollback danger", "data-endpoint": ep.name, onclick: (e) => confirmBox(e.target, "Confirm roll back", true, (reason) => rollback(ep, reason)) }, "Roll back"));
          if (ro.state === "in_progress" && ro.paused) {
            buttons.appendChild(h("button", { type: "button", class: "action resume", "data-endpoint": ep.name, onclick: () => pauseOrResume(ep, "resume", "") }, "Resume"));
          } else if (ro.state === "in_progress" && ro.strategy) {
            buttons.appendChild(h("button", { type: "button", class: "action pause", "data-endpoint": ep.name, onclick: (e) => confirmBox(e.target, "Confirm pause", true, (reason) => pauseOrResume(ep, "pause", reason), "paused from the LLMOps page") }, "Pause"));
          }
          card.appendChild(buttons);
        }
      }
      const charts = h("div", { class: "charts" });
      const series = ep.series || {};
      const names = Object.keys(series);
      C.lineChart(charts, { id: `latency-${ep.name}`, title: "p50 / p95 latency (ms) over time", series: names.flatMap((n) => [
        { name: `${n} p50`, points: series[n].map((b) => [b.t, b.p50_ms]) },
        { name: `${n} p95`, points: series[n].map((b) => [b.t, b.p95_ms]) }]), thresholds: ro && ro.slo ? [{ y: ro.slo.p95_latency_ms, label: "SLO p95" }] : [] });
      C.lineChart(charts, { id: `errors-${ep.name}`, title: "error rate over time", series: names.map((n) => ({ name: n, points: series[n].map((b) => [b.t, b.error_rate]) })), thresholds: ro && ro.slo ? [{ y: ro.slo.max_error_rate, label: "SLO" }] : [], yMin: 0 });
      card.appendChild(charts);
      root.appendChild(card);
    }
  }

  async function rollback(ep, reason) {
    try {
      const out = await act(`api/endpoints/${encodeURIComponent(ep.platform)}/${encodeURIComponent(ep.name)}/rollback`, { reason });
      notice(`${ep.name}: rolled back (${out.variant} removed); weights now ${JSON.stringify(out.after)}`, "ok");
    } catch (e) { notice(`rollback refused: ${e.message}`, "error"); }
    load();
  }

  async function pauseOrResume(ep, action, reason) {
    try {
      const out = await act(`api/endpoints/${encodeURIComponent(ep.platform)}/${encodeURIComponent(ep.name)}/${action}`, { reason });
      notice(`${ep.name}: ${out.message}`, "ok");
    } catch (e) { notice(`${action} refused: ${e.message}`, "error"); }
    load();
  }

  // ---- drift -----------------------------------------------------------------------------------------------
  function renderDrift(data) {
    const root = document.getElementById("drift");
    root.replaceChildren();
    if (data.retrain_error) root.appendChild(h("p", { class: "muted", text: `retrain runs unavailable: ${data.retrain_error}` }));
    if (!data.models.length) root.appendChild(h("p", { class: "muted", text: "No drift windows recorded." }));
    for (const model of data.models) {
      const card = h("div", { class: "card drift-model", "data-model": model.name });
      card.appendChild(h("h2", { text: model.name }));
      const checks = [...new Set(model.windows.flatMap((w) => Object.keys(w.checks)))];
      const charts = h("div", { class: "charts" });
      for (const check of checks) {
        const pts = model.windows.map((w) => {
          const c = w.checks[check] || {};
          return [Number(w.end), c.score ?? null, c.drift ? "#dc2626" : undefined];
        });
        const thr = model.windows.map((w) => (w.checks[check] || {}).threshold).filter((x) => x !== null && x !== undefined);
        C.lineChart(charts, { id: `drift-${model.name}-${check}`, title: `${check} score per window`, series: [{ name: check, points: pts }], thresholds: thr.length ? [{ y: thr[thr.length - 1], label: "threshold" }] : [] });
      }
      card.appendChild(charts);
      const shown = model.windows.slice(-50).reverse();
      card.appendChild(table(["window end", "verdict", "rows", "scores vs thresholds", "report"], shown.map((w) => h("tr", { class: "window" },
        h("td", { text: w.end_iso || when(w.end) }), h("td", { class: w.drift ? "bad" : "good", text: w.verdict || "" }), h("td", { text: w.rows ?? "–" }),
        h("td", { text: Object.entries(w.checks).map(([k, c]) => `${k} ${C.fmtNum(c.score)} / ${C.fmtNum(c.threshold)}${c.drift ? " ⚠" : ""}`).join("; ") }),
        h("td", {}, reportLink(w.report, "report")))), { class: "windows" }));
      if (model.windows.length > shown.length) card.appendChild(h("p", { class: "muted", text: `${model.windows.length - shown.length} older windows in the chart only` }));
      card.appendChild(h("h3", { text: "Retrain runs started by drift events" }));
      if (!model.retrains.length) card.appendChild(h("p", { class: "muted", text: "None." }));
      else card.appendChild(table(["event at", "from", "runs started"], model.retrains.map((e) => h("tr", { class: "retrain" },
        h("td", { text: e.at || "" }), h("td", { text: e.source || "" }), h("td", { text: e.runs.map((r) => `${r.dag_id}/${r.run_id} (${r.state})`).join(", ") || "none" })))));
      root.appendChild(card);
    }
  }

  // ---- actions ----------------------------------------------------------------------------------------------
  function renderActions(data) {
    const root = document.getElementById("actions");
    root.replaceChildren(h("h2", { text: "Actions taken from this page" }));
    if (!data.actions.length) { root.appendChild(h("p", { class: "muted", text: "None yet." })); return; }
    root.appendChild(table(["at", "user", "action", "target", "DAG", "outcome", "detail"], data.actions.map((a) => h("tr", { class: "audit" },
      h("td", { text: a.at || "" }), h("td", { text: a.user || "" }), h("td", { text: a.action || "" }), h("td", { text: a.target || "" }),
      h("td", { text: a.dag_id || "" }), h("td", { text: a.outcome || "" }), h("td", { text: a.detail || a.reason || "" })))));
  }

  // ---- task view ---------------------------------------------------------------------------------------------
  function renderValue(value) {
    if (value === null || value === undefined) return h("span", { class: "muted", text: "–" });
    if (typeof value !== "object") return h("span", { text: String(value) });
    return h("pre", { text: JSON.stringify(value, null, 1) });
  }

  async function loadTask() {
    const q = new URLSearchParams(window.location.search);
    const params = new URLSearchParams({ dag_id: q.get("dag_id") || "", run_id: q.get("run_id") || "", task_id: q.get("task_id") || "", map_index: q.get("map_index") || "-1" });
    if (params.get("map_index") === "" || Number.isNaN(Number(params.get("map_index")))) params.set("map_index", "-1");
    document.getElementById("task-title").textContent = `${params.get("dag_id")} / ${params.get("run_id")} / ${params.get("task_id")}`;
    const root = document.getElementById("task");
    try {
      const data = await api(`api/task?${params.toString()}`);
      root.replaceChildren();
      if (data.reports.length) {
        root.appendChild(h("h2", { text: "Reports" }));
        root.appendChild(h("ul", {}, ...data.reports.map((p) => h("li", {}, reportLink(p, p)))));
      }
      root.appendChild(h("h2", { text: "Result" }));
      if (data.result && typeof data.result === "object" && !Array.isArray(data.result)) {
        root.appendChild(table(["key", "value"], Object.entries(data.result).map(([k, v]) => h("tr", { class: "result" }, h("td", { text: k }), h("td", {}, renderValue(v)))), { class: "task-result" }));
      } else if (data.result !== null && data.result !== undefined) {
        root.appendChild(renderValue(data.result));
      } else {
        root.appendChild(h("p", { class: "muted", text: "This task stored no result (not an LLMOps task, or it has not run)." }));
      }
      if (data.reports.length) openReport(data.reports[0]);
    } catch (e) {
      root.replaceChildren(h("p", { class: "bad", text: `cannot load the task's report: ${e.message}` }));
    }
  }

  // ---- the home-page widget ----------------------------------------------------------------------------------
  async function loadWidget() {
    const root = document.getElementById("widget");
    const [eps, drift] = await Promise.all([api("api/endpoints?series=0"), api("api/drift")]);
    root.replaceChildren(h("h2", {}, h("a", { href: "../../plugin/llmops", target: "_top", text: "LLMOps" })));
    root.appendChild(table(["endpoint", "health", "weights", "rollout"], eps.endpoints.map((ep) => h("tr", { class: "widget-endpoint", "data-endpoint": ep.name },
      h("td", { text: `${ep.name} (${ep.platform})` }), h("td", { class: ep.up ? "good" : "bad", text: ep.up ? "up" : "not answering" }),
      h("td", { text: Object.entries(ep.weights || {}).map(([k, v]) => `${k} ${C.fmtNum(v)}%`).join(", ") || "–" }),
      h("td", { class: ep.rollout ? `state-${ep.rollout.state}` : "", text: ep.rollout ? `${ep.rollout.state}${ep.rollout.paused ? " (paused)" : ""} ${ep.rollout.variant}` : "–" })))));
    root.appendChild(table(["model", "last drift window", "verdict"], drift.models.map((m) => {
      const last = m.windows[m.windows.length - 1] || {};
      return h("tr", { class: "widget-drift", "data-model": m.name }, h("td", { text: m.name }), h("td", { text: last.end_iso || "–" }),
        h("td", { class: last.drift ? "bad" : "good", text: last.verdict || "–" }));
    })));
  }

  // ---- wiring -----------------------------------------------------------------------------------------------
  async function section(name, path, render) {
    try { render(await api(path)); } catch (e) {
      document.getElementById(name).replaceChildren(h("p", { class: "bad", text: `cannot load ${name}: ${e.message}` }));
    }
  }

  function load() {
    return Promise.all([
      section("models", "api/models", renderModels),
      section("endpoints", "api/endpoints", renderEndpoints),
      section("drift", "api/drift", renderDrift),
      section("actions", "api/audit", renderActions),
    ]).then(() => document.body.setAttribute("data-loaded", "1"));
  }

  function showTab(name) {
    for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
    for (const s of document.querySelectorAll("section.tab")) s.classList.toggle("active", s.id === name);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const close = document.getElementById("viewer-close");
    if (close) close.addEventListener("click", () => { document.getElementById("viewer").hidden = true; document.getElementById("viewer-frame").src = "about:blank"; });
    if (document.body.dataset.view === "widget") {
      loadWidget().catch((e) => notice(`cannot load: ${e.message}`, "error")).then(() => document.body.setAttribute("data-loaded", "1"));
      return;
    }
    if (document.body.dataset.view === "widget") {
      loadWidget().catch((e) => notice(`cannot load: ${e.message}`, "error")).then(() => document.body.setAttribute("data-loaded", "1"));
      return;
    }
    if (document.body.dataset.view === "task") { loadTask().then(() => document.body.setAttribute("data-loaded", "1")); return; }
    for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
    document.getElementById("refresh").addEventListener("click", load);
    api("api/me").then((me) => { document.getElementById("who").textContent = me.user; }).catch(() => {});
    load();
  });
})();
