// moe-lab dashboard page: polls the JSON API and draws plotly figures (plotly.js is served locally).
"use strict";
(() => {
  const state = {
    runs: [], selected: null, lastStep: undefined, lastStatus: undefined, pollMs: 2000, view: "run",
    cmp: { a: null, b: null, layer: 0, key: "" }, timer: null,
  };
  const $ = (id) => document.getElementById(id);
  const PLOT_CFG = { responsive: true, displaylogo: false };

  async function api(path) {
    let resp;
    try {
      resp = await fetch(path, { headers: { Accept: "application/json" } });
    } catch (e) {
      throw new Error(`cannot reach the dashboard server (${e.message})`);
    }
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok || body === null) {
      const err = new Error(body && body.error ? body.error.message : `${path}: HTTP ${resp.status}`);
      err.problems = body && body.error ? body.error.problems || [] : [];
      err.status = resp.status;
      throw err;
    }
    return body;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(3);
    return v.toFixed(4).replace(/\.?0+$/, "");
  }

  function problemText(p) {
    const where = p.file ? `${p.file}${p.line ? ":" + p.line : ""}: ` : "";
    return where + p.message;
  }

  function showProblems(container, problems, extra) {
    const items = (problems || []).map((p) => el("div", "banner " + (p.level === "error" ? "error" : "warning"), problemText(p)));
    if (extra) items.push(el("div", "banner error", extra));
    container.replaceChildren(...items);
  }

  function setConn(ok, text) {
    const c = $("conn");
    c.textContent = text;
    c.classList.toggle("down", !ok);
  }

  function plot(div, fig, emptyText) {
    if (!window.Plotly || !div) return;
    const base = fig.layout || {};
    // legends go under the plot: they never cover a second y axis or the curves
    const layout = Object.assign({}, base, {
      autosize: true,
      legend: { orientation: "h", x: 0, xanchor: "left", y: -0.3, yanchor: "top" },
      margin: Object.assign({}, base.margin || {}, { b: 40, t: 40 }, base.yaxis2 ? { r: 70 } : {}),
    });
    if (!fig.data || fig.data.length === 0) {
      layout.annotations = [{ text: emptyText || "no data yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
      layout.xaxis = Object.assign({}, layout.xaxis, { visible: false });
      layout.yaxis = Object.assign({}, layout.yaxis, { visible: false });
    }
    // a curve of one or two points is invisible as a line: show its markers
    const data = (fig.data || []).map((t) => (t.type === "scatter" && t.x && t.x.length < 3 && t.mode === "lines")
      ? Object.assign({}, t, { mode: "lines+markers" }) : t);
    window.Plotly.react(div, data, layout, PLOT_CFG);
  }

  function stepText(run) {
    if (run.last_step === null || run.last_step === undefined) return "no steps yet";
    return run.total_steps ? `step ${run.last_step} / ${run.total_steps}` : `step ${run.last_step}`;
  }

  // ---- run list ----------------------------------------------------------------------------------
  function renderRunList() {
    const ul = $("run-list");
    if (state.runs.length === 0) {
      ul.replaceChildren(el("li", "muted", "No runs yet. Start one with: moe-lab train --preset tiny --name demo"));
      return;
    }
    ul.replaceChildren(...state.runs.map((r) => {
      const li = el("li", r.id === state.selected ? "selected" : "");
      li.dataset.runId = String(r.id);
      li.appendChild(el("div", "name", r.name));
      const loss = r.latest && r.latest.loss !== undefined ? ` · loss ${fmt(r.latest.loss)}` : "";
      li.appendChild(el("div", "meta", `${r.status} · ${stepText(r)}${loss}`));
      const errors = (r.problems || []).filter((p) => p.level === "error").length;
      const warnings = (r.problems || []).length - errors;
      if (errors) li.appendChild(el("div", "flag error", `${errors} problem${errors > 1 ? "s" : ""} in the run directory`));
      else if (warnings) li.appendChild(el("div", "flag", `${warnings} warning${warnings > 1 ? "s" : ""}`));
      li.addEventListener("click", () => { setView("run"); selectRun(r.id); });
      return li;
    }));
    fillCompareSelects();
  }

  // ---- one run -----------------------------------------------------------------------------------
  function renderHeatmaps(container, figs, prefix) {
    while (container.children.length > figs.length) container.lastChild.remove();
    figs.forEach((fig, i) => {
      let div = document.getElementById(`${prefix}-${i}`);
      if (!div) {
        div = el("div", "chart");
        div.id = `${prefix}-${i}`;
        container.appendChild(div);
      }
      plot(div, fig, "no expert loads logged yet");
    });
    if (figs.length === 0 && container.children.length === 0) container.appendChild(el("div", "muted", "No expert loads logged yet."));
  }

  function renderRunHead(run) {
    $("run-title").textContent = run.name;
    const badge = $("run-status");
    badge.textContent = run.status;
    badge.className = "badge " + run.status;
    $("run-step").textContent = stepText(run);
    const prog = $("run-progress");
    if (run.total_steps && run.last_step !== null) {
      prog.hidden = false;
      prog.max = run.total_steps;
      prog.value = run.last_step;
    } else prog.hidden = true;
  }

  async function refreshRun() {
    const id = state.selected;
    if (id === null) return;
    try {
      const detail = await api(`/api/runs/${id}`);
      const figs = await api(`/api/runs/${id}/figures`);
      if (state.selected !== id) return;
      renderRunHead(detail);
      $("run-empty").hidden = true;
      $("run-charts").hidden = false;
      $("run-config").textContent = detail.config ? JSON.stringify(detail.config, null, 2) : "(no config.yaml)";
      const f = figs.figures;
      plot($("chart-loss"), f.loss);
      plot($("chart-eval"), f.eval, "no evaluation yet");
      renderHeatmaps($("heatmaps"), f.heatmaps, "heatmap");
      plot($("chart-entropy"), f.entropy);
      plot($("chart-balance"), f.balance);
      plot($("chart-drop"), f.drop_rate);
      showProblems($("run-problems"), figs.problems, window.Plotly ? null : "plotly.js did not load: charts cannot be drawn");
      state.lastStep = detail.last_step;
      state.lastStatus = detail.status;
    } catch (e) {
      showProblems($("run-problems"), e.problems, `Cannot show run ${id}: ${e.message}`);
    }
  }

  function selectRun(id) {
    state.selected = id;
    state.lastStep = undefined;
    history.replaceState(null, "", `#run=${id}`);
    renderRunList();
    return refreshRun();
  }

  // ---- compare -----------------------------------------------------------------------------------
  function fillCompareSelects() {
    for (const [key, idx] of [["a", 0], ["b", 1]]) {
      const sel = $(`cmp-${key}`);
      const current = state.cmp[key] ?? (state.runs[idx] || state.runs[0] || {}).id ?? null;
      sel.replaceChildren(...state.runs.map((r) => {
        const o = el("option", null, r.name);
        o.value = String(r.id);
        return o;
      }));
      if (current !== null) sel.value = String(current);
      state.cmp[key] = current;
    }
  }

  async function refreshCompare() {
    const { a, b } = state.cmp;
    if (a === null || b === null) return;
    try {
      const r = await api(`/api/compare?a=${a}&b=${b}`);
      $("cmp-th-a").textContent = r.a.name;
      $("cmp-th-b").textContent = r.b.name;
      $("cmp-table").tBodies[0].replaceChildren(...r.table.map((row) => {
        const tr = el("tr");
        [row.metric, fmt(row.a), fmt(row.b), fmt(row.diff)].forEach((t) => tr.appendChild(el("td", null, t)));
        return tr;
      }));
      const f = r.figures;
      plot($("cmp-loss"), f.loss);
      plot($("cmp-eval"), f.eval, "no evaluation yet");
      plot($("cmp-entropy"), f.entropy);
      plot($("cmp-balance"), f.balance);
      const nLayers = Math.max(f.heatmaps.a.length, f.heatmaps.b.length);
      const layerSel = $("cmp-layer");
      if (layerSel.options.length !== nLayers) {
        layerSel.replaceChildren(...Array.from({ length: nLayers }, (_, i) => { const o = el("option", null, String(i)); o.value = String(i); return o; }));
        layerSel.value = String(Math.min(state.cmp.layer, Math.max(nLayers - 1, 0)));
      }
      const layer = Number(layerSel.value || 0);
      const esc = (t) => String(t).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
      const titled = (fig, name) => fig ? Object.assign({}, fig, { layout: Object.assign({}, fig.layout, { title: { text: `${esc(name)}: expert load, layer ${layer}` } }) }) : { data: [], layout: {} };
      plot($("cmp-heat-a"), titled(f.heatmaps.a[layer], r.a.name), "no expert loads");
      plot($("cmp-heat-b"), titled(f.heatmaps.b[layer], r.b.name), "no expert loads");
      const problems = (r.a.problems || []).map((p) => Object.assign({}, p, { message: `${r.a.name}: ${p.message}` }))
        .concat((r.b.problems || []).map((p) => Object.assign({}, p, { message: `${r.b.name}: ${p.message}` })));
      showProblems($("cmp-problems"), problems);
      state.cmp.key = compareKey();
    } catch (e) {
      showProblems($("cmp-problems"), e.problems, `Cannot compare: ${e.message}`);
    }
  }

  function compareKey() {
    return [state.cmp.a, state.cmp.b].map((id) => {
      const r = state.runs.find((x) => x.id === id);
      return r ? `${id}:${r.last_step}:${r.status}` : `${id}`;
    }).join("|");
  }

  function setView(view) {
    state.view = view;
    $("view-run").hidden = view !== "run";
    $("view-compare").hidden = view !== "compare";
    $("tab-run").classList.toggle("active", view === "run");
    $("tab-compare").classList.toggle("active", view === "compare");
    if (view === "compare") refreshCompare();
    else if (window.Plotly) document.querySelectorAll("#view-run .js-plotly-plot").forEach((d) => window.Plotly.Plots.resize(d));
  }

  // ---- live polling ------------------------------------------------------------------------------
  async function poll() {
    try {
      const list = await api("/api/runs");
      state.runs = list.runs;
      renderRunList();
      showProblems($("global-problems"), list.problems);
      setConn(true, `live · updated ${new Date().toLocaleTimeString()}`);
      if (state.selected === null && state.runs.length) {
        const m = /run=(\d+)/.exec(location.hash);
        const wanted = m ? Number(m[1]) : null;
        const first = state.runs.find((r) => r.id === wanted) || state.runs[state.runs.length - 1];
        await selectRun(first.id);
      } else if (state.view === "run" && state.selected !== null) {
        const run = state.runs.find((r) => r.id === state.selected);
        if (run && (run.last_step !== state.lastStep || run.status !== state.lastStatus)) await refreshRun();
        else if (run) showProblems($("run-problems"), run.problems);
      }
      if (state.view === "compare" && compareKey() !== state.cmp.key) await refreshCompare();
    } catch (e) {
      setConn(false, `connection problem: ${e.message}`);
      showProblems($("global-problems"), e.problems, `The dashboard API failed: ${e.message}`);
    } finally {
      state.timer = setTimeout(poll, state.pollMs);
    }
  }

  async function start() {
    $("tab-run").addEventListener("click", () => setView("run"));
    $("tab-compare").addEventListener("click", () => setView("compare"));
    for (const key of ["a", "b"]) {
      $(`cmp-${key}`).addEventListener("change", (ev) => { state.cmp[key] = Number(ev.target.value); refreshCompare(); });
    }
    $("cmp-layer").addEventListener("change", (ev) => { state.cmp.layer = Number(ev.target.value); refreshCompare(); });
    if (!window.Plotly) showProblems($("global-problems"), [], "plotly.js did not load (/static/vendor/plotly.min.js): charts cannot be drawn");
    try {
      const health = await api("/api/health");
      state.pollMs = health.poll_ms || state.pollMs;
    } catch (e) {
      setConn(false, `connection problem: ${e.message}`);
    }
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
