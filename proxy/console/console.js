// dnschaos game-day console.  Plain JavaScript, no build step, no library:
// it polls the admin JSON API (the one the CLI uses) and /metrics about once a
// second and draws tables and small SVG pictures.  Every text from the API
// goes into the page with textContent, never as HTML: query names come from
// clients.
"use strict";

(() => {
  const POLL_MS = 1000;
  const DEPS_MS = 3000;
  const SCENARIOS_MS = 5000;
  const TOKEN_KEY = "dnschaos.token";
  const HISTORY = 60;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (selector) => document.querySelector(selector);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    readsBlocked: false,
    selected: null,
    selectedByUser: false,
    runs: [],
    details: new Map(),      // scenario name -> GET /api/scenarios/{name}
    scenarioList: [],
    reports: new Map(),      // ended run id -> its final report
    prevMetrics: null,
    history: [],
    skew: 0,                 // server clock - browser clock, seconds
    depsAt: 0,
    scenariosAt: 0,
    polling: false,
    again: false,
    timer: null,
  };

  // --- small helpers ------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function seconds(value) {
    if (value === null || value === undefined) return null;
    if (typeof value === "number") return value;
    const parsed = Date.parse(value);
    return Number.isNaN(parsed) ? null : parsed / 1000;
  }

  function now() {
    return Date.now() / 1000 + state.skew;
  }

  function duration(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "-";
    const s = Math.max(0, value);
    if (s < 10) return s.toFixed(1) + " s";
    const whole = Math.round(s);  // rounded once: never "9m 60s"
    if (whole < 60) return whole + " s";
    const m = Math.floor(whole / 60);
    if (m < 60) return `${m}m ${String(whole % 60).padStart(2, "0")}s`;
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
  }

  function ago(value) {
    const t = seconds(value);
    if (t === null) return "-";
    const d = now() - t;
    return d < 1 ? "just now" : duration(d) + " ago";
  }

  function rate(value) {
    if (value === null || !Number.isFinite(value)) return "-";
    return value < 10 ? value.toFixed(1) : String(Math.round(value));
  }

  function showMessage(text, isError) {
    const box = $("#message");
    const time = new Date().toISOString().slice(11, 19);
    box.textContent = `${time} ${text}`;
    box.className = isError ? "error" : "";
    box.hidden = false;
  }

  function setConn(kind, text) {
    const badge = $("#conn");
    badge.textContent = text;
    badge.className = "badge " + kind;
  }

  function counts(obj) {
    return Object.entries(obj || {}).map(([k, v]) => `${k}: ${v}`).join(", ") || "-";
  }

  function listed(names, max) {
    const all = Object.keys(names || {});
    if (!all.length) return "-";
    const more = all.length > max ? ` +${all.length - max}` : "";
    return all.slice(0, max).join(", ") + more;
  }

  // --- the API ------------------------------------------------------------------------

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    const init = { method, headers, cache: "no-store" };
    if (method !== "GET") headers["X-Dnschaos-User"] = "console";  // the audit log's "who"
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      setConn("bad", "proxy unreachable");
      return { status: 0, data: null, text: "", error: "the proxy does not answer" };
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (err) {
      data = null;
    }
    const error = response.ok ? null : (data && data.error) || text || `HTTP ${response.status}`;
    return { status: response.status, data, text, error };
  }

  // A read: null when it failed (401 asks for the token once, and stops the
  // polling until one is given).
  async function read(path) {
    if (state.readsBlocked) return null;
    const r = await api("GET", path);
    if (r.status === 401) {
      state.readsBlocked = true;
      setConn("bad", "token needed");
      if (state.token) forgetToken();
      askToken("This proxy needs its admin token to show anything "
        + "(its admin listener is not on loopback, or /metrics needs it).").then((given) => {
        if (given) kick();
      });
      return null;
    }
    if (r.status === 0) return null;
    if (!state.readsBlocked) setConn("ok", state.token ? "live (token)" : "live");
    return r;
  }

  // A change: on 401 it says so, asks for the token and, once given, tries again.
  async function mutate(method, path, body, what) {
    const r = await api(method, path, body);
    if (r.status === 401) {
      const wrong = Boolean(state.token);
      const text = `${what}: refused, this needs the admin token`
        + (wrong ? " (the token given is wrong)" : "");
      showMessage(text, true);
      if (wrong) forgetToken();
      if (await askToken(text + ".")) {
        const again = await mutate(method, path, body, what);
        if (again.status > 0 && again.status < 400) showMessage(`${what}: token accepted`, false);
        return again;
      }
      return r;
    }
    if (r.status >= 400 || r.status === 0) showMessage(`${what}: ${r.error}`, true);
    return r;
  }

  // --- the token ----------------------------------------------------------------------

  let tokenPromise = null;
  let tokenResolve = null;

  function askToken(why) {
    $("#token-why").textContent = why;
    if (!tokenPromise) tokenPromise = new Promise((resolve) => { tokenResolve = resolve; });
    const dialog = $("#token-dialog");
    if (!dialog.open) dialog.showModal();
    dialog.querySelector("input").focus();
    return tokenPromise;
  }

  function tokenDone(given) {
    const resolve = tokenResolve;
    tokenPromise = tokenResolve = null;
    const dialog = $("#token-dialog");
    if (dialog.open) dialog.close();
    if (resolve) resolve(given);
  }

  function forgetToken() {
    state.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
  }

  function setupToken() {
    const form = $("#token-form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const input = form.querySelector("input");
      const token = input.value.trim();
      if (!token) return;
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = "";
      state.readsBlocked = false;
      tokenDone(true);
      kick();
    });
    $("#token-cancel").addEventListener("click", () => tokenDone(false));
    $("#token-dialog").addEventListener("cancel", (event) => {
      event.preventDefault();
      tokenDone(false);
    });
    $("#token-clear").addEventListener("click", () => {
      forgetToken();
      tokenDone(false);
      showMessage("token forgotten", false);
    });
    $("#token-button").addEventListener("click", () => {
      askToken("Give the proxy's admin token (admin_token).").then((given) => {
        if (given) showMessage("token set for this tab", false);
      });
    });
  }

  // --- rows kept between polls (so a button is not replaced under the pointer) ---------

  // cells: strings or nodes; a row is rebuilt only when its `sig` changes,
  // its text cells are updated in place otherwise.
  function syncRows(tbody, items, key, build) {
    const old = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
    let previous = null;
    for (const item of items) {
      const k = key(item);
      const spec = build(item);
      let tr = old.get(k);
      if (tr && tr.dataset.sig !== spec.sig) {
        tr.remove();
        tr = null;
      }
      if (!tr) {
        tr = el("tr", { class: spec.class || null });
        tr.dataset.key = k;
        tr.dataset.sig = spec.sig;
        for (const cell of spec.cells) tr.append(cell instanceof Node && cell.tagName === "TD" ? cell : el("td", {}, cell));
        if (spec.onclick) {
          tr.classList.add("clickable");
          tr.addEventListener("click", (event) => {
            if (!event.target.closest("button")) spec.onclick();
          });
        }
      } else {
        spec.cells.forEach((cell, i) => {
          const td = tr.children[i];
          if (!(cell instanceof Node)) {
            if (td.textContent !== String(cell)) td.textContent = String(cell);
          } else if (spec.live && spec.live.includes(i)) {
            td.replaceChildren(cell);
          }
        });
        tr.className = [spec.class, spec.onclick ? "clickable" : null].filter(Boolean).join(" ");
      }
      old.delete(k);
      if (previous ? previous.nextSibling !== tr : tbody.firstChild !== tr) {
        if (previous) previous.after(tr); else tbody.prepend(tr);
      }
      previous = tr;
    }
    for (const tr of old.values()) tr.remove();
  }

  // --- polling ------------------------------------------------------------------------

  function kick() {
    if (state.polling) {
      state.again = true;
      return;
    }
    clearTimeout(state.timer);
    poll();
  }

  async function poll() {
    if (document.hidden) {  // a tab in the background asks nothing; shown again, it kicks
      state.timer = setTimeout(poll, POLL_MS);
      return;
    }
    state.polling = true;
    try {
      const t = Date.now();
      const tasks = [pollRuns(), pollStatus(), pollMetrics()];
      if (t - state.scenariosAt > SCENARIOS_MS) tasks.push(pollScenarios());
      if (t - state.depsAt > DEPS_MS) tasks.push(pollDeps());
      await Promise.all(tasks);
      await pollSelected();
    } catch (err) {
      showMessage("console: " + err.message, true);
    } finally {
      state.polling = false;
      const soon = state.again;
      state.again = false;
      state.timer = setTimeout(poll, soon ? 0 : POLL_MS);
    }
  }

  async function scenarioDetail(name) {
    if (!state.details.has(name)) {
      const r = await read(`/api/scenarios/${encodeURIComponent(name)}`);
      if (!r || r.status !== 200) return null;
      state.details.set(name, r.data);
    }
    return state.details.get(name);
  }

  // Phase lengths in seconds for a run (the file's, rescaled to the run's time_scale).
  function phaseLengths(detail, run) {
    if (!detail || !Array.isArray(detail.phases)) return null;
    const factor = run && run.time_scale && detail.time_scale
      ? run.time_scale / detail.time_scale : 1;
    return detail.phases.map((p) => ({ name: p.name, length: p.duration * factor }));
  }

  // --- runs ---------------------------------------------------------------------------

  async function pollStatus() {
    const r = await read("/api/status");
    if (!r || r.status !== 200) return;
    const serverTime = seconds(r.data.time);
    if (serverTime !== null) state.skew = serverTime - Date.now() / 1000;
    renderRules(r.data.rules || []);
  }

  async function pollRuns() {
    const r = await read("/api/runs");
    if (!r || r.status !== 200) return;
    state.runs = r.data.runs || [];
    for (const run of state.runs) {
      if (run.state !== "ended") await scenarioDetail(run.scenario);
    }
    if (!state.selectedByUser || !state.runs.some((run) => run.run === state.selected)) {
      const live = state.runs.filter((run) => run.state !== "ended");
      const pick = live.length ? live[live.length - 1] : state.runs[0];
      state.selected = pick ? pick.run : null;
      if (!pick) state.selectedByUser = false;
    }
    renderRuns();
  }

  function renderRuns() {
    const runs = state.runs.slice(0, 30);
    $("#runs-empty").hidden = runs.length > 0;
    syncRows($("#runs tbody"), runs, (run) => run.run, (run) => {
      const ended = run.state === "ended";
      const actions = el("span", {});
      if (!ended) {
        if (run.state === "paused") {
          actions.append(el("button", { type: "button", class: "resume", onclick: () => act("resume", run.run) }, "resume"));
        } else if (run.state === "running") {
          actions.append(el("button", { type: "button", class: "pause", onclick: () => act("pause", run.run) }, "pause"));
        }
        actions.append(el("button", { type: "button", class: "stop danger", onclick: () => act("stop", run.run) }, "stop"));
      }
      const phases = run.phases || (state.details.get(run.scenario) || {}).phases;
      const total = Array.isArray(phases) ? phases.length : phases;
      const phase = run.phase === null || run.phase === undefined ? (ended ? run.ended || "" : "-")
        : `${run.phase_index + 1}/${total || "?"} ${run.phase}`;
      const mini = ended ? "" : timeline(run, true);
      const stateCell = el("td", {}, el("span", { class: `state ${run.state}` }, run.state),
        run.dry_run ? " dry run" : "");
      return {
        sig: `${run.state}|${run.dry_run}`,
        class: run.run === state.selected ? "selected" : null,
        cells: [run.run, run.scenario, stateCell, phase, mini,
          ended ? "" : duration(run.remaining), ended ? "" : duration(run.time_left), actions],
        live: [4],
        onclick: () => {
          state.selected = run.run;
          state.selectedByUser = true;
          renderRuns();
          kick();
        },
      };
    });
  }

  async function act(action, run) {
    const body = action === "stop" ? { reason: "stopped from the console" } : {};
    const r = await mutate("POST", `/api/runs/${encodeURIComponent(run)}/${action}`, body,
      `${action} ${run}`);
    if (r.status === 200) {
      const done = { pause: "paused", resume: "resumed", stop: "stopped" }[action];
      showMessage(`${done}: ${(r.data[done] || []).join(", ") || "nothing (already done)"}`, false);
    }
    kick();
  }

  // The phases as segments, the one in force highlighted, a marker at "now".
  function timeline(run, mini, report) {
    const lengths = phaseLengths(state.details.get(run.scenario), run);
    const box = mini ? svg("svg", { class: "mini", viewBox: "0 0 180 14", preserveAspectRatio: "none" })
      : $("#timeline");
    if (!mini) box.replaceChildren();
    if (!lengths || !lengths.length) return mini ? box : null;
    const width = mini ? 180 : Math.max(300, box.clientWidth || 1000);
    const height = mini ? 14 : 56;
    if (!mini) box.setAttribute("viewBox", `0 0 ${width} ${height}`);
    box.classList.toggle("paused", run.state === "paused");
    const total = lengths.reduce((sum, p) => sum + p.length, 0) || 1;
    const ended = run.state === "ended";
    const current = ended ? -1 : (run.phase_index ?? -1);
    // An ended run: the phases it went through (its report's timeline) are done.
    const ran = new Set(((report && report.timeline) || []).map((p) => p.index));
    let x = 0;
    let marker = null;
    lengths.forEach((p, i) => {
      const w = (p.length / total) * width;
      const cls = ended ? (ran.has(i) ? "seg-done" : "seg-next")
        : i < current ? "seg-done" : i === current ? "seg-current" : "seg-next";
      const rect = svg("rect", { x, y: mini ? 0 : 4, width: Math.max(1, w), height: mini ? 14 : 30, class: cls });
      rect.append(svg("title", {}, `${p.name}: ${duration(p.length)}`));
      box.append(rect);
      if (i === current && run.remaining !== null && run.remaining !== undefined) {
        marker = x + w * Math.min(1, Math.max(0, 1 - run.remaining / (p.length || 1)));
        box.append(svg("rect", { x, y: mini ? 0 : 4, width: Math.max(0, marker - x),
          height: mini ? 14 : 30, class: "seg-elapsed" }));
      }
      if (!mini && w > 40) {
        box.append(svg("text", { x: x + 6, y: 24 }, `${i + 1}. ${p.name}`));
        box.append(svg("text", { x: x + 6, y: 52, class: "len" }, duration(p.length)));
      }
      x += w;
    });
    if (marker !== null) {
      box.append(svg("line", { x1: marker, x2: marker, y1: 0, y2: mini ? 14 : 38, class: "marker" }));
    }
    return box;
  }

  // --- the selected run: timeline, rules, affected clients, recovery -------------------

  async function pollSelected() {
    const id = state.selected;
    const run = state.runs.find((r) => r.run === id);
    $("#run-detail").hidden = !run;
    if (!run) {
      renderAffected(null, null);
      renderRecovery(null);
      return;
    }
    await scenarioDetail(run.scenario);
    const detailReq = read(`/api/runs/${encodeURIComponent(id)}`);
    let report = state.reports.get(id);
    let reportReq = null;
    if (!report) reportReq = read(`/api/reports/${encodeURIComponent(id)}`);
    const [detail, reportRes] = await Promise.all([detailReq, reportReq]);
    if (reportRes && reportRes.status === 200) {
      report = reportRes.data;
      if (report.ended_at) state.reports.set(id, report);
    }
    if (state.selected !== id) return;
    const row = detail && detail.status === 200 ? detail.data : run;
    renderDetail(row, report);
    renderAffected(row, report);
    renderRecovery(row);
  }

  function renderDetail(run, report) {
    $("#detail-run").textContent = `${run.run} (${run.scenario})`;
    timeline(run, false, report);
    const text = $("#countdown");
    text.replaceChildren();
    if (run.state === "running" || run.state === "paused") {
      const lengths = phaseLengths(state.details.get(run.scenario), run) || [];
      text.append(run.state === "paused" ? "Paused in phase " : "Phase ",
        `${run.phase_index + 1} of ${lengths.length || "?"}, `, el("strong", {}, run.phase || "-"),
        run.state === "paused" ? ", frozen with " : ": ", el("strong", { id: "phase-left" }, duration(run.remaining)),
        " left; hard end in ", el("strong", {}, duration(run.time_left)),
        run.state === "paused" ? " (the hard limit keeps counting)" : "");
    } else if (run.state === "pending") {
      text.append("Starts in ", el("strong", {}, duration(seconds(run.started_at) - now())));
    } else {
      text.append("Ended: ", el("strong", {}, run.ended || (report && report.ended) || "ended"),
        (run.ended_because || (report && report.ended_because)) ? ` (${run.ended_because || report.ended_because})` : "");
    }
    const rules = (report && report.rules) || [];
    syncRows($("#run-rules tbody"), rules, (r) => `${r.phase}/${r.rule}`, (r) => ({
      sig: "", cells: [r.phase, r.rule, r.fault, r.matched, r.injected, r.clients],
    }));
  }

  function renderAffected(run, report) {
    $("#affected-run").textContent = run ? run.run : "";
    const clients = (report && report.clients) || [];
    $("#affected-empty").hidden = clients.length > 0;
    $("#affected-empty").textContent = run ? "No client hit yet." : "Select a run.";
    syncRows($("#affected tbody"), clients, (c) => c.client, (c) => ({
      sig: "", cells: [c.client, c.queries, counts(c.faults), listed(c.faulted, 3), ago(c.last_seen)],
    }));
  }

  function renderRecovery(run) {
    const status = $("#recovery-state");
    const tbody = $("#recovery tbody");
    $("#recovery-run").textContent = run ? run.run : "";
    if (!run) {
      status.textContent = "Select a run.";
      tbody.replaceChildren();
      return;
    }
    const recovery = run.recovery;
    if (!recovery) {
      status.textContent = run.state === "ended" ? "No recovery to watch for this run."
        : "Watched from the run's end: each client hit, and whether its names answer again.";
      tbody.replaceChildren();
      return;
    }
    const entries = recovery.entries || [];
    const tally = {};
    for (const e of entries) tally[e.status] = (tally[e.status] || 0) + 1;
    status.textContent = (recovery.closed ? "Recovery window closed. "
      : run.state === "ended" ? `Watching for ${duration(recovery.window)} after the end. `
        : `Watched for ${duration(recovery.window)} once the run ends. `)
      + (entries.length ? counts(tally) : "Nothing to watch yet.");
    syncRows(tbody, entries, (e) => `${e.client} ${e.name}`, (e) => ({
      sig: e.status,
      cells: [e.client, e.name, el("span", { class: `state ${e.status}` }, e.status),
        e.after === null || e.after === undefined ? "-" : duration(e.after)],
    }));
  }

  // --- scenarios, rules and starting ---------------------------------------------------

  async function pollScenarios() {
    const r = await read("/api/scenarios");
    if (!r || r.status !== 200) return;
    state.scenariosAt = Date.now();
    state.scenarioList = r.data.scenarios || [];
    const files = new Map(state.scenarioList.map((s) => [s.name, `${s.file}|${s.duration}`]));
    for (const [name, detail] of state.details) {
      if (files.get(name) !== `${detail.file}|${detail.duration}`) state.details.delete(name);
    }
    $("#scenarios-empty").hidden = state.scenarioList.length > 0;
    syncRows($("#scenarios tbody"), state.scenarioList, (s) => s.name, (s) => ({
      sig: `${s.refused_file}`,
      cells: [
        el("td", {}, el("strong", {}, s.name), s.refused_file ? el("div", { class: "error" }, "newest file refused") : null),
        s.phases, duration(s.duration),
        s.schedule ? `${s.schedule} ${s.timezone || ""}` + (s.next_start ? ` (next ${s.next_start})` : "") : "-",
        (s.running || []).length ? `${s.running.length} run(s)` : "-",
        s.description || "",
        el("button", { type: "button", class: "start", onclick: () => openStart(s.name) }, "start…"),
      ],
    }));
    const errors = Object.entries(r.data.errors || {});
    $("#scenario-errors").replaceChildren(...errors.map(([file, message]) =>
      el("p", { class: "error" }, `${file}: ${message}`)));
  }

  function renderRules(rules) {
    $("#rules-empty").hidden = rules.length > 0;
    syncRows($("#rules tbody"), rules, (r) => r.name, (r) => ({
      sig: "",
      cells: [r.name + (r.dry_run ? " (dry run)" : ""),
        typeof r.match === "string" ? r.match : JSON.stringify(r.match),
        (r.fault && r.fault.type) || JSON.stringify(r.fault), r.matched, r.injected,
        duration(r.remaining),
        el("button", { type: "button", class: "danger", onclick: () => removeRule(r.name) }, "remove")],
    }));
  }

  async function removeRule(name) {
    const r = await mutate("DELETE", `/api/rules/${encodeURIComponent(name)}`, undefined,
      `remove rule ${name}`);
    if (r.status === 200) showMessage(`removed rule ${name}`, false);
    kick();
  }

  let starting = null;

  async function openStart(name) {
    starting = name;
    const dialog = $("#start-dialog");
    const form = $("#start-form");
    form.reset();
    $("#start-name").textContent = name;
    $("#start-error").hidden = true;
    $("#start-confirm").disabled = true;
    $("#start-confirm").textContent = "confirm start";
    $("#require-traffic-label").hidden = true;
    $("#preview").textContent = "Loading the preview.";
    $("#preflight").textContent = "Waiting for the preview.";
    $("#start-phases").replaceChildren();
    dialog.showModal();
    state.details.delete(name);
    const detail = await scenarioDetail(name);
    if (detail) {
      $("#start-phases").append(el("ol", {}, ...detail.phases.map((p) => el("li", {},
        el("strong", {}, p.name), ` for ${duration(p.duration)}: `,
        p.rules.map((rule) => `${rule.name} → ${rule.fault.type || JSON.stringify(rule.fault)}`).join("; ") || "no rule"))));
    }
    const r = await mutate("POST", "/api/preview", { scenario: name }, `preview ${name}`);
    if (starting !== name) return;
    if (r.status === 200 && r.data) {
      renderPreview(r.data);
      $("#require-traffic-label").hidden = false;
    } else {
      $("#preview").textContent = `No preview: ${r.error}`;
      $("#preflight").textContent = "Not run.";
    }
    $("#start-confirm").disabled = false;
  }

  function renderPreview(preview) {
    const rows = [];
    for (const phase of preview.phases || []) {
      for (const rule of phase.rules || []) {
        const clients = (rule.clients || []).slice(0, 4)
          .map((c) => `${c.client} (${c.queries})`).join(", ");
        const more = (rule.clients || []).length > 4 ? ` +${rule.clients.length - 4}` : "";
        rows.push(el("tr", {}, el("td", {}, phase.name), el("td", {}, rule.name),
          el("td", {}, rule.fault), el("td", { class: "num" }, rule.queries),
          el("td", { class: "num" }, Math.round(rule.expected_faults * 10) / 10),
          el("td", {}, (clients || "none") + more)));
      }
    }
    $("#preview").replaceChildren(
      el("p", { class: "hint" }, `From the last ${duration(preview.window)} of traffic.`),
      el("table", { id: "preview-table" },
        el("thead", {}, el("tr", {}, ...["phase", "rule", "fault", "queries", "expected faults", "clients"]
          .map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
    const pre = preview.preflight || { ok: true, warnings: [] };
    const warnings = pre.warnings || [];
    $("#preflight").replaceChildren(
      el("p", { class: pre.ok ? "ok-text" : "warn-text" },
        pre.ok ? "Preflight ok." : `Preflight: ${warnings.length} warning(s).`),
      warnings.length ? el("ul", { class: "warnings" }, ...warnings.map((w) =>
        el("li", {}, `${w.kind}${w.rule ? " (" + w.rule + ")" : ""}: ${w.message}`))) : "");
    if (!pre.ok) $("#start-confirm").textContent = "start anyway";
  }

  async function confirmStart(event) {
    event.preventDefault();
    const name = starting;
    const form = $("#start-form");
    const error = $("#start-error");
    error.hidden = true;
    const body = {};
    if (form.elements.dry_run.checked) body.dry_run = true;
    const scale = form.elements.time_scale.value.trim();
    if (scale) {
      const value = Number(scale);
      if (!(value > 0)) {
        error.textContent = "time scale: a number greater than 0";
        error.hidden = false;
        return;
      }
      body.time_scale = value;
    }
    const max = form.elements.max_duration.value.trim();
    if (max) body.max_duration = max;
    if (!$("#require-traffic-label").hidden && form.elements.require_traffic.checked) {
      body.require_traffic = true;
    }
    $("#start-confirm").disabled = true;
    const r = await mutate("POST", `/api/scenarios/${encodeURIComponent(name)}/start`, body,
      `start ${name}`);
    $("#start-confirm").disabled = false;
    if (r.status === 201) {
      $("#start-dialog").close();
      starting = null;
      state.selected = r.data.run;
      state.selectedByUser = true;
      const notes = [...(r.data.warnings || []),
        ...((r.data.preflight && r.data.preflight.warnings) || []).map((w) => w.message)];
      showMessage(`started ${r.data.run}` + (notes.length ? ` (warnings: ${notes.join("; ")})` : ""), false);
      kick();
      return;
    }
    const problems = (r.data && r.data.problems) || [];
    error.replaceChildren(r.error || "start failed", ...problems.map((p) =>
      el("div", {}, `${p.file}:${p.line ?? "?"}: ${p.field}: ${p.message}`)));
    error.hidden = false;
  }

  function setupStart() {
    $("#start-form").addEventListener("submit", confirmStart);
    $("#start-cancel").addEventListener("click", () => {
      starting = null;
      $("#start-dialog").close();
    });
    $("#start-dialog").addEventListener("close", () => { starting = null; });
  }

  function setupReset() {
    const dialog = $("#confirm-dialog");
    $("#reset-button").addEventListener("click", () => {
      $("#confirm-text").textContent = "Reset heals everything at once: every run stops and "
        + "every ad hoc rule is removed.";
      dialog.showModal();
    });
    $("#confirm-cancel").addEventListener("click", () => dialog.close());
    $("#confirm-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      dialog.close();
      const r = await mutate("POST", "/api/reset", {}, "reset");
      if (r.status === 200) {
        showMessage(`reset: ${r.data.runs.length} run(s) stopped, ${r.data.rules.length} rule(s) removed`, false);
      }
      kick();
    });
  }

  // --- queries and faults per second, from the /metrics counters -----------------------

  function parseMetrics(text) {
    let queries = 0;
    const faults = new Map();
    for (const line of text.split("\n")) {
      const value = () => Number(line.slice(line.lastIndexOf(" ") + 1));
      if (line.startsWith("dnschaos_queries_total{")) queries += value();
      else if (line.startsWith("dnschaos_faults_injected_total{")) {
        const run = /[{,]run="((?:[^"\\]|\\.)*)"/.exec(line);
        const key = run ? run[1] : "";
        faults.set(key, (faults.get(key) || 0) + value());
      }
    }
    return { t: performance.now() / 1000, queries, faults };
  }

  async function pollMetrics() {
    const r = await read("/metrics");
    if (!r || r.status !== 200) return;
    const cur = parseMetrics(r.text);
    const prev = state.prevMetrics;
    state.prevMetrics = cur;
    if (!prev) return;
    const dt = cur.t - prev.t;
    if (!(dt > 0.2)) return;
    let faulted = 0;
    // Per run, so that a run whose series leave (ended_run_retention) does not
    // count as negative faults; a new run counts from zero.
    for (const [key, value] of cur.faults) faulted += Math.max(0, value - (prev.faults.get(key) || 0));
    const q = Math.max(0, cur.queries - prev.queries) / dt;
    const f = faulted / dt;
    $("#qps").textContent = rate(q);
    $("#fps").textContent = rate(f);
    state.history.push({ q, f });
    if (state.history.length > HISTORY) state.history.shift();
    drawSpark();
  }

  function drawSpark() {
    const box = $("#spark");
    const top = Math.max(1, ...state.history.map((h) => h.q), ...state.history.map((h) => h.f));
    const points = (field) => state.history.map((h, i) =>
      `${(i * 120) / (HISTORY - 1)},${31 - (h[field] / top) * 29}`).join(" ");
    box.replaceChildren(svg("polyline", { class: "q", points: points("q") }),
      svg("polyline", { class: "f", points: points("f") }));
  }

  // --- the dependency map ---------------------------------------------------------------

  function depsQuery() {
    const form = $("#deps-filter");
    const params = new URLSearchParams();
    for (const field of ["client", "suffix"]) {
      const value = form.elements[field].value.trim();
      if (value) params.set(field, value);
    }
    const since = form.elements.since.value.trim();
    if (since) params.set("since", since);  // a duration ago ("15m") or a time: the API reads both
    const text = params.toString();
    return "/api/dependencies" + (text ? "?" + text : "");
  }

  async function pollDeps() {
    state.depsAt = Date.now();
    const note = $("#deps-state");
    const r = await read(depsQuery());
    if (!r) return;
    if (r.status !== 200) {
      note.textContent = `Dependency map: ${r.error}`;
      note.className = "error";
      return;
    }
    renderDeps(r.data);
  }

  function renderDeps(data) {
    const clients = data.clients || [];
    const note = $("#deps-state");
    note.className = "empty";
    const overflow = data.clients_overflow ? ` (+${data.clients_overflow} more clients not tracked)` : "";
    note.textContent = clients.length
      ? `${clients.length} client(s)` + (data.since ? ` since ${data.since}` : "") + overflow
      : "No client has queried yet" + (data.since ? " in that window" : "") + ".";
    const table = $("#deps-table");
    table.hidden = clients.length === 0;
    const serverNow = seconds(data.now);
    const rel = (value) => {
      const t = seconds(value);
      return t === null || serverNow === null ? "-" : (serverNow - t < 1 ? "just now" : duration(serverNow - t) + " ago");
    };
    const rows = [];
    for (const c of clients) {
      const names = c.names || [];
      const span = names.length + (c.names_overflow ? 1 : 0) || 1;
      const head = [
        el("td", { rowspan: span, class: "dep-client" }, el("strong", {}, c.client),
          (c.addresses || []).length && (c.addresses.length > 1 || c.addresses[0] !== c.client)
            ? el("div", { class: "hint" }, c.addresses.join(", ")) : null),
        el("td", { rowspan: span, class: "num" }, c.queries),
      ];
      if (!names.length) rows.push(el("tr", { "data-client": c.client }, ...head, el("td", { colspan: 5 }, "-")));
      names.forEach((n, i) => {
        const answers = el("td", { class: "answers" }, ...Object.entries(n.answers || {})
          .filter(([, v]) => v > 0)
          .map(([k, v]) => el("span", { class: k === "data" ? null : "bad" }, `${k} ${v}`)));
        rows.push(el("tr", { "data-client": c.client, "data-name": n.name }, ...(i === 0 ? head : []),
          el("td", {}, n.name), el("td", { class: "num" }, n.queries), el("td", {}, counts(n.qtypes)),
          answers, el("td", {}, rel(n.last_seen))));
      });
      if (c.names_overflow) {
        rows.push(el("tr", { "data-client": c.client }, el("td", { colspan: 5, class: "hint" },
          `+${c.names_overflow} more names not tracked`)));
      }
    }
    table.querySelector("tbody").replaceChildren(...rows);
    drawGraph(clients);
  }

  // Clients on the left, names on the right, an edge per (client, name) as
  // thick as the log of its queries; a name is coloured by its failed answers.
  function drawGraph(clients) {
    const box = $("#deps-graph");
    box.replaceChildren();
    box.classList.toggle("none", !clients.length);
    if (!clients.length) return;
    const shownClients = clients.slice().sort((a, b) => b.queries - a.queries).slice(0, 15);
    const names = new Map();
    for (const c of shownClients) {
      for (const n of c.names || []) {
        const entry = names.get(n.name) || { name: n.name, queries: 0, bad: 0 };
        entry.queries += n.queries;
        const a = n.answers || {};
        entry.bad += (a.nxdomain || 0) + (a.servfail || 0) + (a.refused || 0) + (a.timeout || 0) + (a.other || 0);
        names.set(n.name, entry);
      }
    }
    // The busiest names, then ordered by the mean row of their clients, so
    // that edges cross less.
    const shownNames = [...names.values()].sort((a, b) => b.queries - a.queries).slice(0, 25);
    const rowOf = new Map(shownClients.map((c, i) => [c.client, i]));
    const mean = new Map(shownNames.map((n) => {
      const rows = shownClients.filter((c) => (c.names || []).some((x) => x.name === n.name))
        .map((c) => rowOf.get(c.client));
      return [n.name, rows.reduce((a, b) => a + b, 0) / (rows.length || 1)];
    }));
    shownNames.sort((a, b) => mean.get(a.name) - mean.get(b.name) || b.queries - a.queries);
    const width = Math.max(420, box.clientWidth || 600);
    const row = 26;
    const height = Math.max(shownClients.length, shownNames.length) * row + 16;
    box.setAttribute("viewBox", `0 0 ${width} ${height}`);
    box.setAttribute("height", String(height));
    const boxW = Math.min(220, width * 0.36);
    const leftX = 4;
    const rightX = width - boxW - 4;
    const yOf = (i, count) => 8 + i * row + (Math.max(shownClients.length, shownNames.length) - count) * row / 2;
    const nameY = new Map(shownNames.map((n, i) => [n.name, yOf(i, shownNames.length)]));
    shownClients.forEach((c, i) => {
      const y = yOf(i, shownClients.length);
      for (const n of c.names || []) {
        if (!nameY.has(n.name)) continue;
        const line = svg("line", { x1: leftX + boxW, y1: y + 10, x2: rightX, y2: nameY.get(n.name) + 10,
          class: "edge", "stroke-width": 1 + Math.log2(1 + n.queries) });
        line.append(svg("title", {}, `${c.client} → ${n.name}: ${n.queries} queries`));
        box.append(line);
      }
    });
    const clip = (text) => (text.length > 30 ? text.slice(0, 29) + "…" : text);
    shownClients.forEach((c, i) => {
      const y = yOf(i, shownClients.length);
      const g = svg("g", { class: "node", "data-client": c.client });
      g.append(svg("rect", { x: leftX, y, width: boxW, height: 20, rx: 4, class: "client" }),
        svg("text", { x: leftX + 6, y: y + 14 }, clip(`${c.client} (${c.queries})`)),
        svg("title", {}, `${c.client}: ${c.queries} queries`));
      box.append(g);
    });
    for (const n of shownNames) {
      const y = nameY.get(n.name);
      const share = n.queries ? n.bad / n.queries : 0;
      const g = svg("g", { class: "node", "data-name": n.name });
      g.append(svg("rect", { x: rightX, y, width: boxW, height: 20, rx: 4,
        class: "name" + (share > 0.5 ? " bad" : share > 0 ? " some-bad" : "") }),
      svg("text", { x: rightX + 6, y: y + 14 }, clip(n.name)),
      svg("title", {}, `${n.name}: ${n.queries} queries, ${n.bad} failed answers`));
      box.append(g);
    }
  }

  function setupDeps() {
    $("#deps-filter").addEventListener("submit", (event) => {
      event.preventDefault();
      state.depsAt = 0;
      kick();
    });
  }

  // --- start --------------------------------------------------------------------------

  setupToken();
  setupStart();
  setupReset();
  setupDeps();
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) kick();
  });
  poll();
})();
