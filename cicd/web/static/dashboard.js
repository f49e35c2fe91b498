// The cicd-heal dashboard: plain JS, no build step, no third-party code.
// Everything from the server is put into the page as text nodes or SVG attributes, never as
// markup: app names, reasons and payloads come from the proof log, which a sender can write into.
"use strict";

(() => {
  const SEVERITIES = ["low", "medium", "high", "critical"];
  const KINDS = ["crash", "overload", "false_alarm", "underload", "slow_deploy", "failed_deploy"];
  const OUTCOME_COLOURS = { stable: "#1f9d55", escalated: "#d64541", refused: "#d98b0b", open: "#2d6cdf" };
  const SHORT_ACTIONS = { noop: "noop", restart_service: "restart", scale_workers: "scale",
                          retry_deployment: "retry", rollback_deployment: "rollback" };
  const MAX_EVENTS = 80, MAX_CARDS = 8;
  // Proof events after which the incidents and app health are worth fetching again.
  const REFRESHING = /^(INCIDENT_|RL_DECISION|ORCH_|SYSTEM_STABLE|ATTEMPT_FAILED|ESCALATED|EXECUTION_|APPROVAL_|RESTART_BACKOFF|DEPLOY_|SCALED|ROLLBACK)/;

  const view = { env: "", lastSeq: 0, events: [], incidents: [], apps: [], generatedAt: null, fresh: new Set() };
  const byId = (id) => document.getElementById(id);

  // -- building nodes (text only) ----------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "title") node.title = String(value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    for (const child of children.flat()) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  function replace(container, ...children) {
    container.replaceChildren(...children.flat());
  }

  // -- formatting ------------------------------------------------------------------------------
  const ms = (iso) => Date.parse(iso);
  const clock = (iso) => (iso ? new Date(ms(iso)).toISOString().slice(11, 19) : "-");
  const clockMs = (iso) => (iso ? new Date(ms(iso)).toISOString().slice(11, 23) : "-");
  const seconds = (s) => (s === null || s === undefined ? "-" : `${Number(s).toFixed(2)} s`);
  const pct = (r) => (r === null || r === undefined ? "-" : `${(r * 100).toFixed(2)}%`);
  const signed = (q) => `${q >= 0 ? "+" : ""}${q.toFixed(2)}`;
  function compact(value, width) {
    const text = JSON.stringify(value === undefined ? {} : value);
    return text.length <= width ? text : `${text.slice(0, width - 1)}…`;
  }
  function ago(iso) {
    if (!iso || !view.generatedAt) return "-";
    const s = Math.max(0, (ms(view.generatedAt) - ms(iso)) / 1000);
    return s < 90 ? `${s.toFixed(1)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
  }

  // -- talking to the server -------------------------------------------------------------------
  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(`${path}: ${response.status} ${body.error || response.statusText}`);
    return body;
  }

  function showError(error) {
    const box = byId("error");
    if (!error) { box.hidden = true; return; }
    box.textContent = `Could not read the dashboard's data: ${error.message || error}`;
    box.hidden = false;
  }

  async function loadHealth() {
    const body = await getJSON("/api/health");
    view.env = body.env; view.apps = body.apps; view.generatedAt = body.generated_at;
    byId("env").textContent = `environment ${body.env}`;
    document.title = `cicd-heal · ${body.env}`;
    renderApps();
  }

  async function loadIncidents() {
    const body = await getJSON("/api/incidents?limit=100");
    view.incidents = body.incidents;
    renderTimeline();
    renderIncidents();
  }

  async function loadPolicy() {
    renderPolicy(await getJSON("/api/policy"));
  }

  async function loadEvents() {
    const body = await getJSON(`/api/events?limit=${MAX_EVENTS}`);
    view.events = body.events.slice().reverse();
    view.lastSeq = body.events.length ? body.events[body.events.length - 1].seq : 0;
    renderEvents();
  }

  async function refresh(what) {
    try {
      await Promise.all(what.map((load) => load()));
      byId("updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
      showError(null);
    } catch (error) {
      showError(error);
    }
  }

  let pending = null;
  function refreshSoon(policyToo) {
    // Several records land per step of the chain: one fetch for the lot.
    if (pending) { pending.policy = pending.policy || policyToo; return; }
    pending = { policy: policyToo };
    setTimeout(() => {
      const loads = [loadIncidents, loadHealth].concat(pending.policy ? [loadPolicy] : []);
      pending = null;
      refresh(loads);
    }, 300);
  }

  function onRecord(record) {
    if (record.seq <= view.lastSeq) return;
    view.lastSeq = record.seq;
    view.events.unshift(record);
    view.events.length = Math.min(view.events.length, MAX_EVENTS);
    view.fresh.add(record.seq);
    renderEvents();
    if (record.incident_id) view.fresh.add(record.incident_id);
    if (REFRESHING.test(record.event_name) || record.event_name.endsWith("_REFUSED")) {
      refreshSoon(record.event_name === "RL_UPDATE" || record.event_name === "RL_TRAINED");
    }
  }

  function setLive(text, kind) {
    const badge = byId("live");
    badge.textContent = text;
    badge.className = `pill live-${kind}`;
  }

  function follow() {
    // ?live=poll asks for polling instead of the stream: for proxies that hold SSE back, and for
    // headless browsers whose virtual clock stops while a stream is open.
    if (!window.EventSource || new URLSearchParams(location.search).get("live") === "poll") { poll(); return; }
    // The server ends each stream after a while; EventSource reconnects with Last-Event-ID.
    const source = new EventSource(`/api/stream?after=${view.lastSeq}`);
    source.addEventListener("open", () => setLive("live", "ok"));
    source.addEventListener("proof", (message) => onRecord(JSON.parse(message.data)));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) { source.close(); poll(); }  // refused outright: poll
      else setLive("reconnecting…", "wait");
    });
  }

  async function poll() {
    try {
      const body = await getJSON(`/api/events?after=${view.lastSeq}&limit=1000`);
      body.events.forEach(onRecord);
      setLive("live (polling)", "ok");
    } catch (error) {
      setLive("unreachable", "bad");
    }
    setTimeout(poll, 2000);
  }

  // -- apps ------------------------------------------------------------------------------------
  function renderApps() {
    const rows = view.apps.map((app) => {
      const util = app.utilization === null ? null : app.utilization;
      const bar = util === null ? "-" : el("span", {}, el("span", { class: util > 0.75 ? "bar hot" : "bar" }, barFill(util)),
                                          `${Math.round(util * 100)}%`);
      const openCell = app.open_incident
        ? el("a", { class: "mono", href: "#", "data-incident": app.open_incident }, app.open_incident) : "-";
      return el("tr", { "data-app": app.app },
        el("td", {}, el("b", {}, app.app)),
        el("td", {}, el("span", { class: `state state-${app.state}`, title: app.attention || "" }, app.state)),
        el("td", {}, app.replicas),
        el("td", {}, app.healthy === null ? "-" : `${app.healthy}/${app.probed_replicas}`),
        el("td", {}, bar),
        el("td", { title: `${app.probes} probes` }, pct(app.uptime)),
        el("td", {}, app.release === null ? "-" : `#${app.release}`),
        el("td", {}, openCell),
        el("td", { class: "muted" }, ago(app.last_probe_at)));
    });
    const body = byId("apps").tBodies[0];
    replace(body, rows.length ? rows : [el("tr", {}, el("td", { colspan: 9, class: "muted" },
      "no apps onboarded yet: cicd onboard NAME --repo URL --runtime backend"))]);
    const attention = view.apps.filter((a) => a.attention).length;
    byId("apps-note").textContent = `${view.apps.length} ${view.apps.length === 1 ? "app" : "apps"}` + (attention ? `, ${attention} waiting for a human` : "");
  }

  function barFill(ratio) {
    const fill = el("span");
    fill.style.width = `${Math.min(100, Math.max(0, ratio * 100)).toFixed(0)}%`;
    return fill;
  }

  // -- the timeline: severity against time -----------------------------------------------------
  function symbol(kind, x, y, r, attrs) {
    const shape = KINDS.indexOf(kind);
    const pts = (list) => list.map(([dx, dy]) => `${(x + dx * r).toFixed(1)},${(y + dy * r).toFixed(1)}`).join(" ");
    switch (shape) {
      case 1: return svg("polygon", { ...attrs, points: pts([[0, -1.2], [1.1, 0.9], [-1.1, 0.9]]) });        // overload
      case 2: return svg("polygon", { ...attrs, points: pts([[0, -1.2], [1.2, 0], [0, 1.2], [-1.2, 0]]) });  // false alarm
      case 3: return svg("polygon", { ...attrs, points: pts([[0, 1.2], [1.1, -0.9], [-1.1, -0.9]]) });       // underload
      case 4: return svg("rect", { ...attrs, x: x - r, y: y - r, width: 2 * r, height: 2 * r });              // slow deploy
      case 5: return svg("polygon", { ...attrs, points: pts([[-1, -0.35], [-0.35, -0.35], [-0.35, -1], [0.35, -1], [0.35, -0.35], [1, -0.35], [1, 0.35], [0.35, 0.35], [0.35, 1], [-0.35, 1], [-0.35, 0.35], [-1, 0.35]]) });
      default: return svg("circle", { ...attrs, cx: x, cy: y, r });                                          // crash
    }
  }

  function renderTimeline() {
    const box = byId("timeline");
    const width = Math.max(480, box.clientWidth || 800), height = 230;
    const left = 72, right = 16, top = 10, bottom = 26;
    const band = (height - top - bottom) / SEVERITIES.length;
    const incidents = view.incidents.filter((i) => SEVERITIES.includes(i.severity));
    const now = view.generatedAt ? ms(view.generatedAt) : Date.now();
    const times = incidents.map((i) => ms(i.opened_at));
    let start = times.length ? Math.min(...times) : now - 3600e3;
    let end = Math.max(now, ...times);
    if (end - start < 60e3) start = end - 60e3;
    const pad = (end - start) * 0.03;
    start -= pad; end += pad;
    const xOf = (t) => left + ((t - start) / (end - start)) * (width - left - right);
    const yOf = (severity) => top + (SEVERITIES.length - 1 - SEVERITIES.indexOf(severity) + 0.5) * band;

    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
                               "aria-label": "incidents: severity against the time they were detected" });
    SEVERITIES.forEach((severity, i) => {
      const y = top + (SEVERITIES.length - 1 - i) * band;
      chart.append(svg("rect", { class: i % 2 ? "band" : "band alt", x: left, y, width: width - left - right, height: band }));
      chart.append(svg("text", { class: "axis", x: left - 8, y: y + band / 2 + 4, "text-anchor": "end" }, severity));
    });
    for (let i = 0; i <= 5; i += 1) {
      const t = start + ((end - start) * i) / 5;
      const anchor = i === 0 ? "start" : i === 5 ? "end" : "middle";
      chart.append(svg("text", { class: "axis", x: xOf(t), y: height - 8, "text-anchor": anchor },
                       new Date(t).toISOString().slice(11, 19)));
    }
    // Oldest first, so the newest is drawn on top; kinds sit on their own line within a band.
    incidents.slice().reverse().forEach((incident) => {
      const x = xOf(ms(incident.opened_at));
      const y = yOf(incident.severity) + (KINDS.indexOf(incident.kind) - 2.5) * (band / 9);
      const colour = OUTCOME_COLOURS[incident.status] || "#9aa1ac";
      const point = symbol(incident.kind, x, y, 6, { class: "point", fill: colour, "data-incident": incident.id });
      point.append(svg("title", {}, `${incident.id} · ${incident.app} · ${incident.kind} (${incident.severity}) · `
        + `${incident.action || "no action"} · ${incident.status}`
        + (incident.time_to_recover_s !== null ? ` in ${seconds(incident.time_to_recover_s)}` : "")
        + ` · ${clock(incident.opened_at)} UTC`));
      chart.append(point);
    });
    if (!incidents.length) {
      chart.append(svg("text", { class: "axis", x: (width + left) / 2, y: height / 2, "text-anchor": "middle" },
                       "no incidents yet: cicd inject crash APP --wait"));
    }
    replace(box, chart);

    const legend = Object.entries(OUTCOME_COLOURS).map(([outcome, colour]) => {
      const dot = el("i"); dot.style.background = colour;
      return el("span", {}, dot, outcome);
    });
    const kindLegend = KINDS.map((kind) => {
      const mark = svg("svg", { width: 14, height: 14, class: "legend-shape" }, symbol(kind, 7, 7, 4.5, { fill: "#6b7280" }));
      return el("span", {}, mark, ` ${kind.replace("_", " ")}`);
    });
    replace(byId("timeline-legend"), legend, el("span", { class: "muted" }, "·"), kindLegend);
  }

  // -- incidents: the chain of decisions and gates ---------------------------------------------
  function gateChip(gate) {
    const mark = { passed: "✓", refused: "✗", held: "⏸", "not reached": "·" }[gate.verdict] || "?";
    return el("span", { class: `gate gate-${gate.verdict.replace(" ", "-")}`,
                        title: gate.reason ? `${gate.gate}: ${gate.verdict}: ${gate.reason}` : `${gate.gate}: ${gate.verdict}` },
              `${mark} ${gate.gate}`);
  }

  function attemptRows(step) {
    const rows = [];
    const add = (label, ...content) => rows.push(el("span", { class: "label" }, label), el("div", {}, ...content));
    if (step.decision) {
      add(`#${step.attempt} decide`, el("b", {}, step.decision.action || "?"), " ",
          el("span", { class: "why" }, `${step.decision.mode || ""} · ${step.decision.reason || ""}`));
    } else {
      add(`#${step.attempt}`, el("span", { class: "muted" }, "no decision recorded"));
    }
    if (step.gates.length) {
      const refused = step.gates.find((g) => g.verdict === "refused" || g.verdict === "held");
      add("gates", el("div", { class: "gates" }, step.gates.map(gateChip)),
          refused ? el("div", { class: "why" }, `${refused.event || refused.verdict}: ${refused.reason || ""}`) : null);
    }
    if (step.execution) {
      const ex = step.execution;
      add("execute", el("span", { class: ex.status === "done" ? "outcome stable" : "outcome failed" }, ex.status), " ",
          el("span", { class: "why mono" }, compact(ex.result || ex.params || {}, 90)));
    }
    if (step.outcome) {
      const o = step.outcome;
      add("outcome", el("span", { class: `outcome ${o.result}` }, o.result),
          o.time_to_recover_s !== undefined && o.time_to_recover_s !== null ? ` in ${seconds(o.time_to_recover_s)}` : "",
          o.detail ? el("div", { class: "why" }, o.detail) : null);
    }
    if (step.learning) {
      const l = step.learning;
      add("learn", el("span", { class: "why" }, `reward ${signed(Number(l.reward || 0))}`
        + (l.applied ? ` · Q → ${signed(Number(l.new_q))}` : ` · not applied (${l.why || "frozen"})`)));
    }
    return el("div", { class: "attempt" }, rows);
  }

  function renderIncidents() {
    const cards = view.incidents.slice(0, MAX_CARDS).map((incident) => {
      const card = el("article", { class: `incident outcome-${incident.status}`, id: `incident-${incident.id}`,
                                   "data-incident": incident.id },
        el("div", { class: "incident-head" },
          el("b", {}, incident.id), el("span", {}, incident.app),
          el("span", {}, `${incident.kind} · ${incident.severity}`),
          el("span", { class: `outcome ${incident.status}` }, incident.status),
          incident.time_to_recover_s !== null ? el("span", {}, `recovered in ${seconds(incident.time_to_recover_s)}`) : null,
          el("span", { class: "muted" }, `detected ${clock(incident.opened_at)} UTC`)),
        incident.chain.map(attemptRows),
        incident.resolution ? el("div", { class: "why" }, incident.resolution) : null);
      if (view.fresh.has(incident.id)) { card.classList.add("flash"); view.fresh.delete(incident.id); }
      return card;
    });
    replace(byId("incidents"), cards.length ? cards : [el("p", { class: "muted" }, "no incidents yet")]);
    const shown = Math.min(view.incidents.length, MAX_CARDS);
    byId("incidents-note").textContent = view.incidents.length ? `the newest ${shown} of ${view.incidents.length}` : "";
  }

  // -- the policy as a heatmap -----------------------------------------------------------------
  function heat(q) {
    const t = Math.max(-1, Math.min(1, q));
    const [r, g, b] = t >= 0 ? [31, 157, 85] : [214, 69, 65];
    const a = Math.abs(t);
    const mix = (c) => Math.round(255 + (c - 255) * a);
    return `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`;
  }

  function renderPolicy(table) {
    const head = el("tr", {}, el("th", {}, "state"), table.actions.map((a) => el("th", { title: a }, SHORT_ACTIONS[a] || a)));
    const rows = table.states.map((s) => el("tr", {},
      el("th", { class: "state-key", title: s.state },
         `${s.kind.replace("_", " ")} ${s.severity} #${s.attempt}${s.fresh ? " fresh" : ""}`),
      table.actions.map((a) => {
        const q = s.q[a];
        const cell = el("td", { class: a === s.greedy ? "greedy" : "",
                                title: `${s.state} → ${a}: Q ${q.toFixed(3)}${a in s.learned ? ` (learned, ${s.learned[a]} updates)` : " (prior)"}` },
                        `${signed(q)}${a in s.learned ? "*" : ""}`);
        cell.style.background = heat(q);
        if (Math.abs(q) > 0.6) cell.style.color = "#fff";
        return cell;
      })));
    replace(byId("policy"), el("table", { class: "heat" }, el("thead", {}, head), el("tbody", {}, rows)));
    byId("policy-note").textContent = `Q-values of ${table.env} (mode ${table.mode}); outlined: the greedy choice; * learned`;
  }

  // -- live events -----------------------------------------------------------------------------
  function eventClass(name) {
    if (/^(INCIDENT_DETECTED|ESCALATED|ATTEMPT_FAILED|DEPLOY_FAILED|BUILD_FAILED|FAILURE_INJECTED)$/.test(name)) return "ev-bad";
    if (/^(SYSTEM_STABLE|DEPLOY_SUCCEEDED|HEALTH_GATE_PASSED|EXECUTION_GATE_PASSED|SCALED)$/.test(name)) return "ev-ok";
    if (/REFUSE|BLOCK|EXCEEDED|NOT_ALLOWED|APPROVAL|BACKOFF/.test(name)) return "ev-warn";
    if (name.startsWith("RL_")) return "ev-rl";
    return "ev-plain";
  }

  function renderEvents() {
    const items = view.events.map((r) => {
      const item = el("li", { class: view.fresh.has(r.seq) ? "new" : "", "data-seq": r.seq, title: compact(r.payload, 2000) },
        el("span", { class: "muted" }, r.seq),
        el("span", {}, clockMs(r.ts).slice(0, 12)),
        el("span", { class: eventClass(r.event_name) }, r.event_name),
        el("span", { class: "payload" }, [r.app, r.incident_id].filter(Boolean).join(" ") + " " + compact(r.payload, 160)));
      view.fresh.delete(r.seq);
      return item;
    });
    replace(byId("events"), items.length ? items : [el("li", { class: "muted" }, "nothing in the proof log yet")]);
  }

  // -- wiring ----------------------------------------------------------------------------------
  document.addEventListener("click", (event) => {
    const target = event.target.closest("[data-incident]");
    if (!target || target.tagName === "ARTICLE") return;
    event.preventDefault();
    const card = byId(`incident-${target.getAttribute("data-incident")}`);
    if (card) { card.scrollIntoView({ behavior: "smooth", block: "center" }); card.classList.remove("flash"); void card.offsetWidth; card.classList.add("flash"); }
  });
  window.addEventListener("resize", () => renderTimeline());

  async function start() {
    await refresh([loadHealth, loadIncidents, loadPolicy, loadEvents]);
    follow();
    // Uptime and probe ages move without any proof record: look again now and then.
    setInterval(() => refresh([loadHealth]), 5000);
  }
  start();
})();
