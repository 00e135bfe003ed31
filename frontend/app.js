/* labq web pages: Home, Upload, Results, Job.
 *
 * Plain JavaScript, no build step, no framework, no external resources. It speaks only the
 * public REST API (/api/v1/...). Job-provided text (names, logs, errors, file names) is
 * always put into the page as text (textContent / text nodes), never as HTML.
 */
"use strict";

(function () {
  const API = "/api/v1";
  const STATES = ["created", "queued", "initialized", "started", "paused", "completed",
    "stopped", "failed"];
  const TERMINAL = new Set(["stopped", "failed"]);
  const OUTCOMES = ["succeeded", "error", "timeout", "cancelled", "failed"];
  const POLL_MS = 5000;          // fallback poll while the event stream is open
  const POLL_FAST_MS = 2000;     // fallback poll while the event stream is down
  const STATS_MS = 3000;

  // ---------------------------------------------------------------- DOM helpers
  /** Build an element. attrs: class, text, dataset, on{Event} handlers, other attributes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on") && typeof value === "function") {
        node.addEventListener(key.slice(2).toLowerCase(), value);
      } else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function $(selector, root) { return (root || document).querySelector(selector); }

  function setText(node, value) { if (node) node.textContent = value == null ? "" : String(value); }

  function clear(node) { while (node && node.firstChild) node.removeChild(node.firstChild); }

  // ---------------------------------------------------------------- formatting
  function shortId(id) { return id ? String(id).slice(0, 8) : ""; }

  function fmtBytes(n) {
    if (n == null || isNaN(n)) return "";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0; let v = Number(n);
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
  }

  function fmtDuration(seconds) {
    if (seconds == null || isNaN(seconds) || seconds < 0) return "";
    const s = Math.floor(seconds);
    const h = Math.floor(s / 3600); const m = Math.floor((s % 3600) / 60); const r = s % 60;
    const pad = (x) => String(x).padStart(2, "0");
    if (h) return `${h}h ${pad(m)}m ${pad(r)}s`;
    if (m) return `${m}m ${pad(r)}s`;
    return `${r}s`;
  }

  function parseTime(iso) {
    if (!iso) return null;
    const t = Date.parse(iso);
    return isNaN(t) ? null : t;
  }

  /** A <time> element: local time of day for today, date and time otherwise. */
  function timeEl(iso) {
    const t = parseTime(iso);
    if (t === null) return document.createTextNode("—");
    const d = new Date(t);
    const today = new Date();
    const sameDay = d.toDateString() === today.toDateString();
    const text = sameDay ? d.toLocaleTimeString() : d.toLocaleString();
    return el("time", { datetime: iso, title: d.toString(), text });
  }

  /** Run time of a job, pauses excluded (the server's durations.run_s). */
  function jobDuration(job) {
    const d = job.durations;
    if (d && d.run_s != null) return d.run_s;
    return null;
  }

  function badge(state) {
    const s = STATES.includes(state) ? state : "unknown";
    return el("span", { class: `badge badge-${s}`, dataset: { state: state || "" },
      text: state || "unknown" });
  }

  function outcomeEl(outcome) {
    if (!outcome) return el("span", { class: "muted", text: "—" });
    return el("span", { class: `outcome outcome-${outcome}`, dataset: { outcome }, text: outcome });
  }

  function jobUrl(id) { return `/jobs/${encodeURIComponent(id)}`; }
  function apiJob(id) { return `${API}/jobs/${encodeURIComponent(id)}`; }

  // ---------------------------------------------------------------- API
  class ApiError extends Error {
    constructor(message, status, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  /** The researcher-readable message of an error response. */
  function errorText(status, body, fallback) {
    const err = body && typeof body === "object" ? body.error : null;
    if (err && err.message) {
      let text = String(err.message);
      if (err.field && !text.includes(String(err.field))) text += ` (field: ${err.field})`;
      return text;
    }
    if (typeof body === "string" && body.trim() && body.length < 500 && !/</.test(body)) {
      return body.trim();
    }
    return fallback || `The server answered ${status}.`;
  }

  // ---------------------------------------------------------------- who is signed in
  /** The signed-in user ({name, admin, csrf_token}); filled by start() before any page runs. */
  const me = { name: null, admin: false, csrf_token: null };

  function toLogin() {
    const here = location.pathname + location.search;
    location.href = `/login?next=${encodeURIComponent(here)}`;
  }

  /** Headers every state-changing request of the pages must carry (CSRF protection). */
  function csrfHeaders() {
    return me.csrf_token ? { "X-CSRF-Token": me.csrf_token } : {};
  }

  async function api(path, options) {
    const opts = Object.assign({ headers: {} }, options || {});
    opts.headers = Object.assign({ Accept: "application/json" }, opts.headers);
    if (opts.method && !["GET", "HEAD"].includes(opts.method.toUpperCase())) {
      Object.assign(opts.headers, csrfHeaders());
    }
    if (opts.json !== undefined) {
      opts.body = JSON.stringify(opts.json);
      opts.headers["Content-Type"] = "application/json";
      delete opts.json;
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (e) {
      throw new ApiError("Cannot reach the labq server. Is it running?", 0, null);
    }
    const type = resp.headers.get("Content-Type") || "";
    let body = null;
    try {
      body = type.includes("json") ? await resp.json() : await resp.text();
    } catch (e) {
      body = null;
    }
    if (resp.status === 401 && !opts.noRedirect) toLogin();
    if (!resp.ok) throw new ApiError(errorText(resp.status, body), resp.status, body);
    return body;
  }

  // ---------------------------------------------------------------- live events
  /**
   * One EventSource on /api/v1/events for the page, shared by its widgets.
   * Lifecycle events are de-duplicated per job by their sequence number.
   */
  const events = {
    source: null,
    handlers: [],
    open: false,
    lastSeq: new Map(),
    statusNode: null,

    subscribe(handler) {
      this.handlers.push(handler);
      if (!this.source) this.connect();
    },

    connect() {
      if (typeof EventSource === "undefined") return;
      const source = new EventSource(`${API}/events`);
      this.source = source;
      const indicator = $("#live-status");
      if (indicator) indicator.hidden = false;
      const onData = (e) => this.dispatch(e);
      source.addEventListener("message", onData);
      source.addEventListener("lifecycle", onData);
      source.addEventListener("status", onData);
      source.addEventListener("open", () => this.setOpen(true));
      source.addEventListener("error", () => {
        this.setOpen(false);
        if (source.readyState === EventSource.CLOSED) {
          // The browser gave up (e.g. a 5xx): try again later ourselves.
          this.source = null;
          setTimeout(() => { if (!this.source) this.connect(); }, 5000);
        }
      });
    },

    setOpen(open) {
      this.open = open;
      const node = this.statusNode || $("#live-status");
      if (node) {
        node.dataset.live = open ? "on" : "off";
        node.textContent = open ? "Live" : "Reconnecting…";
        node.title = open ? "Receiving live updates from the server"
          : "Live updates interrupted; the page refreshes itself every few seconds";
      }
    },

    dispatch(e) {
      let data;
      try { data = JSON.parse(e.data); } catch (err) { return; }
      if (!data || typeof data !== "object" || !data.job_id) return;
      const kind = data.kind || (e.type === "status" ? "status" : "lifecycle");
      data.kind = kind;
      if (kind === "lifecycle" && data.seq != null) {
        const prev = this.lastSeq.get(data.job_id);
        if (prev != null && Number(data.seq) <= prev) return;   // stale or duplicate
        this.lastSeq.set(data.job_id, Number(data.seq));
      }
      for (const h of this.handlers) {
        try { h(data); } catch (err) { console.error(err); }
      }
    },
  };

  /** Call fn now and then every ms (faster while the event stream is down). */
  function poll(fn, ms, fastMs) {
    let timer = null;
    let stopped = false;
    const tick = async () => {
      if (stopped) return;
      try { await fn(); } catch (err) { /* shown by fn; keep polling */ }
      if (stopped) return;
      const wait = document.hidden ? Math.max(ms, 15000) : (events.open || !fastMs ? ms : fastMs);
      timer = setTimeout(tick, wait);
    };
    tick();
    return {
      stop() { stopped = true; clearTimeout(timer); },
      now() { clearTimeout(timer); tick(); },
    };
  }

  /** Debounce: run fn at most once per ms, at the end of a burst. */
  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  // ---------------------------------------------------------------- notices
  function notify(message, kind) {
    const box = $("#notice");
    if (!box) return;
    clear(box);
    if (!message) { box.hidden = true; return; }
    box.hidden = false;
    box.className = `notice notice-${kind || "info"}`;
    box.append(el("span", { text: message }),
      el("button", { type: "button", class: "link-button", "aria-label": "Dismiss",
        onClick: () => notify(null), text: "×" }));
  }

  // ---------------------------------------------------------------- controls
  /** Which control buttons a job in this state gets. */
  function controlsFor(job) {
    const state = job.state;
    const pending = job.requested_state || null;
    const out = [];
    if (TERMINAL.has(state)) return out;
    if (state === "started") {
      out.push({ target: "paused", label: "Pause", busy: pending === "paused" ? "Pausing…" : null });
    }
    if (state === "paused") {
      out.push({ target: "started", label: "Resume",
        busy: pending === "started" ? "Resuming…" : null });
    }
    out.push({ target: "stopped", label: "Stop", danger: true,
      busy: pending === "stopped" ? "Stopping…" : null });
    return out;
  }

  /**
   * Render control buttons for a job into `box`. onChange(job) is called with the job the
   * server returned after a successful request.
   */
  function renderControls(box, job, onChange) {
    // Rebuild only when the buttons change: a button replaced under the pointer loses the click.
    const key = JSON.stringify([job.id, job.state, job.requested_state || null]);
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    clear(box);
    const name = job.name || shortId(job.id);
    for (const c of controlsFor(job)) {
      const button = el("button", {
        type: "button",
        class: `btn btn-small${c.danger ? " btn-danger" : ""}`,
        dataset: { action: c.target },
        "aria-label": `${c.label} job ${name}`,
        disabled: c.busy ? true : null,
        text: c.busy || c.label,
      });
      button.addEventListener("click", async () => {
        button.disabled = true;
        button.textContent = c.target === "stopped" ? "Stopping…"
          : c.target === "paused" ? "Pausing…" : "Resuming…";
        try {
          const updated = await api(`${apiJob(job.id)}/state`,
            { method: "PUT", json: { state: c.target } });
          notify(null);
          onChange(updated && updated.id ? updated : null);
        } catch (err) {
          const body = err.body && err.body.error;
          let msg = `Could not ${c.label.toLowerCase()} “${name}”: ${err.message}`;
          if (body && body.allowed && !err.message.includes("allowed")) {
            msg += ` (now ${body.state}; allowed: ${body.allowed.join(", ") || "none"})`;
          }
          notify(msg, "error");
          button.disabled = false;
          button.textContent = c.label;
          onChange(null);
        }
      });
      box.append(button);
    }
  }

  // ---------------------------------------------------------------- job table
  const COLUMNS = ["Name", "ID", "State", "Outcome", "Exit", "Attempts", "Created", "Duration",
    "Actions"];

  /** The table's columns: admins see every user's jobs, so they also see whose they are. */
  function columns() {
    return me.admin ? ["Name", "Owner", ...COLUMNS.slice(1)] : COLUMNS;
  }

  /** One <tr> for a job; kept in sync by updateRow. */
  function jobRow(job, opts) {
    const tr = el("tr", { dataset: { jobId: job.id } });
    tr._job = job;
    updateRow(tr, job, opts);
    return tr;
  }

  function updateRow(tr, job, opts) {
    const options = opts || {};
    const ticking = !TERMINAL.has(job.state) && job.started_at;
    const key = JSON.stringify([job, tr._elapsed ?? null,
      ticking ? Math.floor(Date.now() / 1000) : 0]);
    if (tr._key === key) return;
    tr._key = key;
    tr._job = job;
    tr.dataset.state = job.state || "";
    const nameCell = el("th", { scope: "row", class: "cell-name" },
      el("a", { href: jobUrl(job.id), text: job.name || "(unnamed)" }));
    const stateCell = el("td", { class: "cell-state" }, badge(job.state));
    if (job.queue_position != null && !TERMINAL.has(job.state)) {
      stateCell.append(el("span", { class: "muted queue-pos", title: job.waiting_reason || "",
        text: ` #${job.queue_position}` }));
    }
    if (job.requested_state && job.requested_state !== job.state && !TERMINAL.has(job.state)) {
      stateCell.append(el("span", { class: "pending", text: ` → ${job.requested_state}` }));
    }
    const dur = tr._elapsed != null && !TERMINAL.has(job.state) && job.state !== "completed"
      ? tr._elapsed : jobDuration(job);
    const cells = [
      nameCell,
      me.admin ? el("td", { class: "cell-owner", text: job.owner || "—" }) : null,
      el("td", { class: "cell-id mono" }, el("span", { title: job.id, text: shortId(job.id) })),
      stateCell,
      el("td", { class: "cell-outcome" }, outcomeEl(job.outcome)),
      el("td", { class: "cell-exit mono", text: job.exit_code == null ? "—" : job.exit_code }),
      el("td", { class: "cell-attempts", text: job.attempts == null ? "—" : job.attempts }),
      el("td", { class: "cell-created" }, timeEl(job.created_at)),
      el("td", { class: "cell-duration", text: dur == null ? "—" : fmtDuration(dur) }),
    ].filter(Boolean);
    // The data cells are replaced; the actions cell stays (its buttons keep focus and clicks).
    for (const cell of Array.from(tr.children)) if (cell !== tr._actions) cell.remove();
    if (options.actions === false) { tr.append(...cells); return; }
    if (!tr._actions) {
      tr._controls = el("div", { class: "controls" });
      tr._links = el("div", { class: "row-links" });
      tr._actions = el("td", { class: "cell-actions" }, tr._controls, tr._links);
      tr.append(tr._actions);
    }
    for (const cell of cells) tr.insertBefore(cell, tr._actions);
    renderControls(tr._controls, job, (updated) => {
      if (updated) updateRow(tr, updated, options);
      if (options.onChanged) options.onChanged(job.id);
    });
    // A results link only when the job left files (an empty zip helps nobody).
    const ended = job.state === "stopped" && job.has_results === true;
    if (tr._links.dataset.ended !== String(ended)) {
      tr._links.dataset.ended = String(ended);
      clear(tr._links);
      tr._links.append(el("a", { href: `${jobUrl(job.id)}#log`,
        "aria-label": `Log of ${job.name || job.id}`, text: "Log" }));
      if (ended) {
        tr._links.append(el("a", { href: `${apiJob(job.id)}/results`, download: "",
          "aria-label": `Download results of ${job.name || job.id}`, text: "Results" }));
      }
    }
  }

  function jobTable(opts) {
    const cols = opts && opts.actions === false ? columns().slice(0, -1) : columns();
    const tbody = el("tbody");
    const table = el("table", { class: "jobs" },
      el("thead", {}, el("tr", {}, cols.map((c) => el("th", { scope: "col", text: c })))),
      tbody);
    return { table, tbody };
  }

  // ---------------------------------------------------------------- nav
  function markNav() {
    const path = location.pathname.replace(/\/+$/, "") || "/";
    document.querySelectorAll(".site-nav a").forEach((a) => {
      const href = a.getAttribute("href");
      if (href === path || (href !== "/" && path.startsWith(href))) {
        a.setAttribute("aria-current", "page");
      }
    });
  }

  // ================================================================= pages
  // ---------------------------------------------------------------- Home
  function pageHome() {
    const statsBox = $("#stats");
    const recentBody = $("#recent tbody");
    const recentEmpty = $("#recent-empty");
    if (me.admin) {
      const head = $("#recent thead tr");
      head.insertBefore(el("th", { scope: "col", text: "Owner" }), head.children[1]);
    }

    async function loadStats() {
      try {
        const s = await api(`${API}/stats`);
        const q = (s && s.queue) || {};
        setText($("#stat-messages"), q.messages ?? "—");
        setText($("#stat-workers"), q.workers ?? "—");
        const jobs = (s && s.jobs) || {};
        const list = $("#stat-states");
        clear(list);
        let total = 0;
        for (const state of STATES) {
          const n = Number(jobs[state] || 0);
          total += n;
          list.append(el("li", { dataset: { state } },
            el("a", { href: `/results?state=${state}`, class: "state-count" },
              badge(state), el("span", { class: "count", text: n }))));
        }
        setText($("#stat-total"), total);
        statsBox.dataset.loaded = "1";
        setText($("#stats-error"), "");
      } catch (err) {
        setText($("#stats-error"), err.message);
      }
    }

    async function loadRecent() {
      try {
        const data = await api(`${API}/jobs?limit=10`);
        const jobs = (data && data.jobs) || [];
        clear(recentBody);
        for (const job of jobs) recentBody.append(jobRow(job, { actions: false }));
        recentEmpty.hidden = jobs.length > 0;
      } catch (err) {
        setText($("#stats-error"), err.message);
      }
    }

    const stats = poll(loadStats, STATS_MS);
    const recent = poll(loadRecent, POLL_MS, POLL_FAST_MS);
    const refresh = debounce(() => { recent.now(); stats.now(); }, 300);
    events.subscribe((ev) => { if (ev.kind === "lifecycle") refresh(); });
  }

  // ---------------------------------------------------------------- Upload
  function pageUpload() {
    const form = $("#upload-form");
    const input = $("#bundle");
    const drop = $("#dropzone");
    const chosen = $("#chosen");
    const progress = $("#progress");
    const progressText = $("#progress-text");
    const progressBox = $("#progress-box");
    const errorBox = $("#upload-error");
    const resultBox = $("#upload-result");
    const submit = $("#submit");
    let file = null;
    let watching = null;

    function choose(f) {
      file = f || null;
      clear(chosen);
      if (file) {
        chosen.append(el("strong", { text: file.name }), ` (${fmtBytes(file.size)})`);
        if (!/\.zip$/i.test(file.name)) {
          chosen.append(el("span", { class: "warn",
            text: " — this does not look like a .zip; the server will probably refuse it" }));
        }
      } else {
        chosen.textContent = "No file chosen yet.";
      }
      submit.disabled = !file;
    }

    input.addEventListener("change", () => choose(input.files[0]));
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
      e.preventDefault();
      drop.classList.add("dragging");
    }));
    ["dragleave", "dragend"].forEach((t) => drop.addEventListener(t, () => {
      drop.classList.remove("dragging");
    }));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("dragging");
      const files = e.dataTransfer && e.dataTransfer.files;
      if (files && files.length) {
        try { input.files = files; } catch (err) { /* old browsers: keep our own copy */ }
        choose(files[0]);
      }
    });
    choose(input.files[0]);

    function showError(message) {
      errorBox.hidden = false;
      setText($("#upload-error-text"), message);
      errorBox.focus();
    }

    function showJob(job) {
      resultBox.hidden = false;
      setText($("#new-id"), job.id);
      setText($("#new-name"), job.name || "(unnamed)");
      const stateBox = $("#new-state");
      clear(stateBox);
      stateBox.append(badge(job.state));
      if (job.outcome) stateBox.append(" ", outcomeEl(job.outcome));
      if (job.error) stateBox.append(el("span", { class: "error-text", text: ` ${job.error}` }));
      const link = $("#new-link");
      link.href = jobUrl(job.id);
      resultBox.dataset.jobId = job.id;
    }

    function watch(job) {
      if (watching) watching.stop();
      const id = job.id;
      let last = job;
      const refresh = async () => {
        last = await api(apiJob(id));
        if (resultBox.dataset.jobId === id) showJob(last);
        if (TERMINAL.has(last.state) && watching) watching.stop();
      };
      watching = poll(refresh, POLL_MS, POLL_FAST_MS);
      events.subscribe((ev) => {
        if (ev.job_id !== id || ev.kind !== "lifecycle" || TERMINAL.has(last.state)) return;
        last = Object.assign({}, last, { state: ev.state, outcome: ev.outcome ?? last.outcome });
        if (resultBox.dataset.jobId === id) showJob(last);
        refresh().catch(() => {});
      });
    }

    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (!file) { showError("Choose a .zip file first."); return; }
      errorBox.hidden = true;
      resultBox.hidden = true;
      submit.disabled = true;
      progressBox.hidden = false;
      progress.value = 0;
      progress.max = 100;
      setText(progressText, "Uploading… 0%");

      const data = new FormData();
      data.append("bundle", file, file.name);
      const hook = $("#notify-url") ? $("#notify-url").value.trim() : "";
      if (hook) data.append("notify_url", hook);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `${API}/jobs`);
      xhr.setRequestHeader("Accept", "application/json");
      for (const [k, v] of Object.entries(csrfHeaders())) xhr.setRequestHeader(k, v);
      xhr.upload.addEventListener("progress", (ev) => {
        if (ev.lengthComputable) {
          const pct = Math.round((ev.loaded / ev.total) * 100);
          progress.value = pct;
          setText(progressText, `Uploading… ${pct}% (${fmtBytes(ev.loaded)} of ${fmtBytes(ev.total)})`);
        }
      });
      xhr.upload.addEventListener("load", () => {
        progress.value = 100;
        setText(progressText, "Uploaded; the server is checking the bundle…");
      });
      xhr.addEventListener("load", () => {
        submit.disabled = false;
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (err) { body = xhr.responseText; }
        if (xhr.status === 401) { toLogin(); return; }
        if (xhr.status === 201 || xhr.status === 200) {
          setText(progressText, "Done: the job was accepted.");
          showJob(body);
          watch(body);
          $("#new-link").focus();
        } else {
          progressBox.hidden = true;
          const fallback = xhr.status === 413 ? "The file is too large for this server."
            : `The server refused the upload (HTTP ${xhr.status}).`;
          showError(errorText(xhr.status, body, fallback));
        }
      });
      xhr.addEventListener("error", () => {
        submit.disabled = false;
        progressBox.hidden = true;
        showError("The upload failed: the server could not be reached (or closed the " +
          "connection, which happens when a file is far too large).");
      });
      xhr.send(data);
    });
  }

  // ---------------------------------------------------------------- Results
  function pageResults() {
    const form = $("#filter-form");
    const stateSel = $("#filter-state");
    const nameInput = $("#filter-name");
    const { table, tbody } = jobTable();
    $("#jobs-wrap").append(table);
    const empty = $("#jobs-empty");
    const newer = $("#page-newer");
    const older = $("#page-older");
    const pageInfo = $("#page-info");
    const rows = new Map();      // job id -> <tr>
    const cursors = [null];      // cursors[i] = cursor of page i
    let pageIndex = 0;
    let nextCursor = null;

    const outcomeSel = $("#filter-outcome");
    const sinceInput = $("#filter-since");
    const untilInput = $("#filter-until");
    const sortSel = $("#filter-sort");
    for (const s of STATES) stateSel.append(el("option", { value: s, text: s }));
    for (const o of OUTCOMES) outcomeSel.append(el("option", { value: o, text: o }));
    const params = new URLSearchParams(location.search);
    stateSel.value = params.get("state") || "";
    // Keep what someone typed while the page was still asking who they are.
    nameInput.value = params.get("q") || params.get("name") || nameInput.value;
    outcomeSel.value = params.get("outcome") || "";
    sinceInput.value = params.get("since") || "";
    untilInput.value = params.get("until") || "";
    sortSel.value = params.get("sort") || "";
    const pageSize = Math.min(200, Math.max(1, parseInt(params.get("limit"), 10) || 25));

    function query(cursor) {
      const q = new URLSearchParams();
      if (stateSel.value) q.set("state", stateSel.value);
      if (nameInput.value.trim()) q.set("q", nameInput.value.trim());
      if (outcomeSel.value) q.set("outcome", outcomeSel.value);
      if (sinceInput.value) q.set("since", sinceInput.value);
      if (untilInput.value) q.set("until", untilInput.value);  // jobs made before that day
      if (sortSel.value) q.set("sort", sortSel.value);
      q.set("limit", String(pageSize));
      if (cursor) q.set("cursor", cursor);
      return q;
    }

    const onChanged = () => refreshSoon();

    async function load() {
      const data = await api(`${API}/jobs?${query(cursors[pageIndex])}`);
      const jobs = (data && data.jobs) || [];
      nextCursor = data ? data.next_cursor || null : null;
      const seen = new Set();
      let prev = null;
      for (const job of jobs) {
        seen.add(job.id);
        let tr = rows.get(job.id);
        if (tr) updateRow(tr, job, { onChanged });
        else { tr = jobRow(job, { onChanged }); rows.set(job.id, tr); }
        // keep the server's order without rebuilding rows (buttons keep focus)
        const want = prev ? prev.nextSibling : tbody.firstChild;
        if (want !== tr) tbody.insertBefore(tr, want);
        prev = tr;
      }
      for (const [id, tr] of rows) {
        if (!seen.has(id)) { tr.remove(); rows.delete(id); }
      }
      empty.hidden = jobs.length > 0;
      older.disabled = !nextCursor;
      newer.disabled = pageIndex === 0;
      setText(pageInfo, `Page ${pageIndex + 1}`);
      tbody.parentElement.setAttribute("aria-busy", "false");
    }

    const poller = poll(async () => {
      try { await load(); setText($("#jobs-error"), ""); } catch (err) {
        setText($("#jobs-error"), err.message);
        throw err;
      }
    }, POLL_MS, POLL_FAST_MS);
    const refreshSoon = debounce(() => poller.now(), 400);

    function reset() {
      cursors.length = 1;
      pageIndex = 0;
      const q = query(null);
      if (pageSize === 25) q.delete("limit");
      const qs = q.toString();
      history.replaceState(null, "", qs ? `?${qs}` : location.pathname);
      poller.now();
    }

    form.addEventListener("submit", (e) => { e.preventDefault(); reset(); });
    for (const input of [stateSel, outcomeSel, sinceInput, untilInput, sortSel]) {
      input.addEventListener("change", reset);
    }
    $("#filter-clear").addEventListener("click", () => {
      for (const input of [stateSel, nameInput, outcomeSel, sinceInput, untilInput, sortSel]) {
        input.value = "";
      }
      reset();
    });
    older.addEventListener("click", () => {
      if (!nextCursor) return;
      cursors[pageIndex + 1] = nextCursor;
      pageIndex += 1;
      poller.now();
    });
    newer.addEventListener("click", () => {
      if (pageIndex === 0) return;
      pageIndex -= 1;
      poller.now();
    });

    events.subscribe((ev) => {
      const tr = rows.get(ev.job_id);
      if (ev.kind === "status") {
        if (tr && ev.elapsed_s != null) {
          tr._elapsed = Number(ev.elapsed_s);
          const cell = $(".cell-duration", tr);
          if (cell && !TERMINAL.has(tr._job.state)) setText(cell, fmtDuration(tr._elapsed));
        }
        return;
      }
      if (tr) {
        // Apply what the event says right away, then fetch the full job.
        const job = Object.assign({}, tr._job, { state: ev.state });
        if (ev.outcome !== undefined && ev.outcome !== null) job.outcome = ev.outcome;
        if (ev.exit_code !== undefined && ev.exit_code !== null) job.exit_code = ev.exit_code;
        if (job.requested_state === ev.state) job.requested_state = null;
        updateRow(tr, job, { onChanged });
        if (stateSel.value && stateSel.value !== ev.state) refreshSoon();
        api(apiJob(ev.job_id)).then((fresh) => {
          if (fresh && rows.get(fresh.id) === tr) updateRow(tr, fresh, { onChanged });
        }).catch(() => {});
      } else if (pageIndex === 0) {
        refreshSoon();   // a new job, or one entering the filtered state
      }
    });
  }

  // ---------------------------------------------------------------- Job
  function pageJob() {
    const match = location.pathname.match(/\/jobs\/([^/]+)\/?$/);
    const id = match ? decodeURIComponent(match[1]) : new URLSearchParams(location.search).get("id");
    const details = $("#details");
    const controls = $("#job-controls");
    const logPre = $("#log");
    const logState = $("#log-state");
    const filesBox = $("#files");
    let job = null;
    let elapsed = null;
    let logStarted = false;
    let filesLoadedFor = null;

    if (!id) { notify("No job id in the address.", "error"); return; }
    // Waiting, stages, usage chart, previews, run again, notification (jobextras.js).
    const extras = window.labqJobExtras ? window.labqJobExtras(id) : null;
    $("#download-all").href = `${apiJob(id)}/results`;
    $("#raw-log").href = `${apiJob(id)}/log`;

    function row(label, value, cls) {
      const dd = el("dd", { class: cls || null });
      if (value instanceof Node) dd.append(value);
      else dd.textContent = value == null || value === "" ? "—" : String(value);
      return [el("dt", { text: label }), dd];
    }

    function render() {
      document.title = `${job.name || shortId(job.id)} · labq`;
      setText($("#job-name"), job.name || "(unnamed)");
      const head = $("#job-state");
      clear(head);
      head.append(badge(job.state));
      if (job.outcome) head.append(" ", outcomeEl(job.outcome));
      if (job.requested_state && job.requested_state !== job.state && !TERMINAL.has(job.state)) {
        head.append(el("span", { class: "pending", text: ` → ${job.requested_state}` }));
      }
      const spec = job.spec || {};
      const dur = elapsed != null && !TERMINAL.has(job.state) && job.state !== "completed"
        ? elapsed : jobDuration(job);
      clear(details);
      const items = [
        row("ID", job.id, "mono"),
        row("Name", job.name),
        row("Owner", job.owner),
        row("State", badge(job.state)),
        row("Outcome", job.outcome),
        row("Exit code", job.exit_code, "mono"),
        row("Attempts", job.attempts),
        row("Worker", job.worker, "mono"),
        row("Run time", dur == null ? null : fmtDuration(dur)),
      ];
      if (job.hold_reason) items.push(row("Waiting", job.hold_reason));
      if (job.error) items.push(row("Error", el("pre", { class: "error-text", text: job.error })));
      items.push(
        row("Entrypoint", [spec.entrypoint, ...(spec.args || [])].filter(Boolean).join(" "), "mono"),
        row("Time limit", spec.timeout_s ? fmtDuration(spec.timeout_s) : "none"),
        row("Memory limit", spec.memory_mb ? `${spec.memory_mb} MB` : "none"),
        row("CPUs", spec.cpus || "no limit"),
      );
      if (spec.max_output_bytes) items.push(row("Max output", fmtBytes(spec.max_output_bytes)));
      if (spec.env && Object.keys(spec.env).length) {
        items.push(row("Environment", Object.keys(spec.env).map((k) => `${k}=${spec.env[k]}`)
          .join("\n"), "mono pre"));
      }
      details.append(...items.flat());

      // timeline of states entered
      const times = $("#timeline");
      clear(times);
      // In the order the states were entered (a resume keeps started_at).
      const entered = ["created", ...STATES.slice(1)]
        .filter((state) => job[`${state}_at`])
        .sort((a, b) => parseTime(job[`${a}_at`]) - parseTime(job[`${b}_at`]));
      for (const state of entered) {
        times.append(el("li", {}, badge(state), " ", timeEl(job[`${state}_at`])));
      }

      renderControls(controls, job, (updated) => {
        if (updated) { job = updated; render(); }
        refresh().catch(() => {});
      });
      if (!controls.firstChild) {
        controls.append(el("span", { class: "muted", text: "This job has ended." }));
      }
      if (TERMINAL.has(job.state) && filesLoadedFor !== job.state) {
        filesLoadedFor = job.state;
        loadFiles();
      }
      if (extras) extras.render(job);
    }

    async function refresh() {
      job = await api(apiJob(id));
      render();
      if (!logStarted) { logStarted = true; startLog(); }
      return job;
    }

    // ---- log: follow with EventSource, fall back to polling ?offset=
    let received = 0;  // bytes of log shown
    const encoder = new TextEncoder();
    const MAX_CHARS = 2000000;

    function atBottom() {
      return logPre.scrollHeight - logPre.scrollTop - logPre.clientHeight < 24;
    }

    function appendLog(text) {
      if (!text) return;
      const stick = atBottom();
      logPre.append(document.createTextNode(text));
      received += encoder.encode(text).length;
      if (logPre.textContent.length > MAX_CHARS) {
        const keep = logPre.textContent.slice(-Math.floor(MAX_CHARS * 0.75));
        logPre.textContent = `[… earlier output hidden; use “raw log” for all of it]\n${keep}`;
      }
      $("#log-empty").hidden = true;
      if (stick) logPre.scrollTop = logPre.scrollHeight;
      else $("#log-jump").hidden = false;
    }

    logPre.addEventListener("scroll", () => { if (atBottom()) $("#log-jump").hidden = true; });
    $("#log-jump").addEventListener("click", () => {
      logPre.scrollTop = logPre.scrollHeight;
      $("#log-jump").hidden = true;
    });

    async function fetchLogFrom() {
      const resp = await fetch(`${apiJob(id)}/log?offset=${received}`, {
        headers: { Accept: "text/plain" },
      });
      if (resp.status === 404) return false;
      if (!resp.ok) throw new Error(`log: HTTP ${resp.status}`);
      appendLog(await resp.text());
      // The body is bytes offset..X-Log-Size: trust the server's count, not the decoded
      // text's (invalid UTF-8 becomes U+FFFD, whose length differs).
      const header = resp.headers.get("X-Log-Size");
      if (header !== null && /^\d+$/.test(header)) received = Math.max(Number(header), 0);
      return true;
    }

    function pollLog() {
      setText(logState, TERMINAL.has(job.state) ? "" : "following (polling)");
      const p = poll(async () => {
        await fetchLogFrom();
        if (job && TERMINAL.has(job.state)) {
          p.stop();
          await fetchLogFrom();
          setText(logState, "complete");
        }
      }, 2000);
    }

    function startLog() {
      if (TERMINAL.has(job.state)) {
        // Ended jobs: read it once.
        fetchLogFrom().then(() => setText(logState, "complete"))
          .catch((err) => setText(logState, err.message));
        return;
      }
      if (typeof EventSource === "undefined") { pollLog(); return; }
      setText(logState, "following live");
      logState.dataset.live = "on";
      const source = new EventSource(`${apiJob(id)}/log?follow=1`);
      let ended = false;
      let resumable = false;  // the server numbers its chunks (id: = byte offset reached)
      const onChunk = (e) => {
        appendLog(e.data);
        if (/^\d+$/.test(e.lastEventId || "")) {
          received = Number(e.lastEventId);
          resumable = true;
        }
      };
      source.addEventListener("message", onChunk);
      source.addEventListener("log", onChunk);
      source.addEventListener("open", () => {
        logState.dataset.live = "on";
        setText(logState, "following live");
      });
      source.addEventListener("end", () => {
        ended = true;
        source.close();
        logState.dataset.live = "off";
        setText(logState, "complete");
        refresh().catch(() => {});
      });
      source.addEventListener("error", () => {
        if (ended) return;
        logState.dataset.live = "off";
        if (resumable && source.readyState === EventSource.CONNECTING) {
          // The browser reconnects with Last-Event-ID: the server resumes at that byte.
          setText(logState, "reconnecting…");
          return;
        }
        // Without offsets a reconnect would repeat the log from byte 0: continue from
        // what we have with plain requests instead.
        source.close();
        pollLog();
      });
    }

    // ---- result files
    async function loadFiles() {
      clear(filesBox);
      filesBox.append(el("p", { class: "muted", text: "Loading…" }));
      try {
        const data = await api(`${apiJob(id)}/results/files`);
        const files = Array.isArray(data) ? data : (data && data.files) || [];
        clear(filesBox);
        if (!files.length) {
          filesBox.append(el("p", { class: "muted", text: "This job left no files in output/." }));
          return;
        }
        const list = el("ul", { class: "files" });
        for (const f of files) {
          const path = String(f.path);
          const href = `${apiJob(id)}/results/files/${path.split("/").map(encodeURIComponent).join("/")}`;
          list.append(el("li", {},
            el("a", { href, download: path.split("/").pop(), class: "mono", text: path }),
            el("span", { class: "muted size", text: fmtBytes(f.size) })));
        }
        filesBox.append(list);
        if (extras) extras.previews(files, filesBox);
        $("#download-all").hidden = false;
      } catch (err) {
        clear(filesBox);
        filesBox.append(el("p", { class: "muted",
          text: err.status === 404 ? "No results stored for this job." : err.message }));
      }
    }

    events.subscribe((ev) => {
      if (ev.job_id !== id || !job) return;
      if (ev.kind === "status") {
        if (extras) extras.status(ev);
        if (ev.elapsed_s != null && !TERMINAL.has(job.state)) {
          elapsed = Number(ev.elapsed_s);
          render();
        }
        return;
      }
      job = Object.assign({}, job, { state: ev.state });
      if (ev.outcome != null) job.outcome = ev.outcome;
      render();
      refresh().catch(() => {});
    });

    const p = poll(async () => {
      try {
        await refresh();
      } catch (err) {
        notify(err.status === 404 ? `There is no job with id ${id}.` : err.message, "error");
        if (err.status === 404) p.stop();
        throw err;
      }
      if (TERMINAL.has(job.state)) p.stop();
    }, POLL_MS, POLL_FAST_MS);
  }

  // ---------------------------------------------------------------- Login
  /** Only a path on this site may be the target after signing in (no open redirect). */
  function safeNext(raw) {
    return raw && raw.startsWith("/") && !raw.startsWith("//") && !raw.startsWith("/\\")
      ? raw : "/";
  }

  function pageLogin() {
    const form = $("#login-form");
    const errorBox = $("#login-error");
    const next = safeNext(new URLSearchParams(location.search).get("next"));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      setText(errorBox, "");
      const button = $("#login-submit");
      button.disabled = true;
      try {
        await api("/login", { method: "POST", noRedirect: true,
          json: { name: $("#login-name").value.trim(), password: $("#login-password").value } });
        location.href = next;
      } catch (err) {
        setText(errorBox, err.message);
        $("#login-password").select();
      } finally {
        button.disabled = false;
      }
    });
  }

  // ---------------------------------------------------------------- Account
  function pageAccount() {
    setText($("#account-name"), me.name);
    setText($("#account-role"), me.admin ? "admin: you see and steer every user's jobs"
      : "you see and steer your own jobs");
    const tbody = $("#tokens tbody");
    const created = $("#token-created");

    async function load() {
      const data = await api(`${API}/tokens`);
      clear(tbody);
      for (const t of data.tokens) {
        const revoke = el("button", { type: "button", class: "btn btn-small btn-danger",
          dataset: { tokenId: t.id }, "aria-label": `Revoke token ${t.name}`, text: "Revoke" });
        revoke.addEventListener("click", async () => {
          revoke.disabled = true;
          try { await api(`${API}/tokens/${t.id}`, { method: "DELETE" }); } catch (err) {
            notify(err.message, "error");
          }
          load().catch((err) => notify(err.message, "error"));
        });
        tbody.append(el("tr", { dataset: { tokenId: t.id } },
          el("td", { class: "mono", text: t.id }), el("th", { scope: "row", text: t.name }),
          el("td", {}, timeEl(t.created_at)), el("td", {}, timeEl(t.last_used_at)),
          el("td", {}, revoke)));
      }
      $("#tokens-empty").hidden = data.tokens.length > 0;
    }

    $("#token-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        const t = await api(`${API}/tokens`, { method: "POST",
          json: { name: $("#token-name").value.trim() || "token" } });
        created.hidden = false;
        setText($("#new-token"), t.token);
        setText($("#token-snippet"), `export LABQ_URL=${location.origin}\n` +
          `export LABQ_TOKEN=${t.token}\nlabq whoami\nlabq submit my-experiment/ --wait`);
        $("#token-name").value = "";
        await load();
      } catch (err) {
        notify(err.message, "error");
      }
    });
    load().catch((err) => notify(err.message, "error"));
  }

  // ---------------------------------------------------------------- start
  // Pages and job-page extras defined by the other scripts (loaded before this one).
  const PAGES = Object.assign({ home: pageHome, upload: pageUpload, results: pageResults,
    job: pageJob, account: pageAccount }, window.labqPages || {});

  /** "Signed in as NAME · Account · Sign out" in the header. */
  function renderWho() {
    const row = $(".header-row");
    if (!row || !me.name) return;
    const out = el("button", { type: "button", class: "btn btn-small btn-ghost", id: "sign-out",
      text: "Sign out" });
    out.addEventListener("click", async () => {
      try { await api("/logout", { method: "POST", noRedirect: true }); } catch (err) { /* gone */ }
      location.href = "/login";
    });
    row.append(el("span", { class: "whoami", id: "whoami" },
      "Signed in as ", el("strong", { id: "whoami-name", text: me.name }),
      me.admin ? el("span", { class: "muted", text: " (admin)" }) : null, " · ",
      el("a", { href: "/account", text: "Account" }), " ", out));
  }

  async function start() {
    markNav();
    const page = document.body.dataset.page;
    if (page === "login") { pageLogin(); return; }
    try {
      Object.assign(me, await api(`${API}/me`));
    } catch (err) {
      if (err.status !== 401) notify(err.message, "error");
      return;
    }
    renderWho();
    if (PAGES[page]) PAGES[page]();
  }

  // The helpers the other page scripts use (frontend/*.js), set before any page runs.
  window.labq = { API, TERMINAL, el, $, api, events, clear, setText, fmtDuration, fmtBytes,
    shortId, timeEl, parseTime, badge, outcomeEl, jobUrl, apiJob, notify, poll, debounce,
    renderControls, jobTable, jobRow, updateRow, me };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
