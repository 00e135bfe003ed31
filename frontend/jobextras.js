/* The job page's researcher panels: why and how long a job waits, how long each stage
 * took, memory and CPU over the run (a live chart), previews of result files, "Run again"
 * and a browser notification when the job ends.
 *
 * Loaded before app.js; app.js's job page calls window.labqJobExtras(id) and then
 * render(job) after every refresh, status(ev) for each live status tick and
 * previews(files, box) once the result files are listed. Job-provided text is only ever
 * put into the page as text.
 */
"use strict";

(function () {
  const STAGES = [["queued_s", "Waiting in the queue"], ["env_s", "Preparing the environment"],
    ["run_s", "Running"], ["paused_s", "Paused"], ["total_s", "Total"]];
  const WAITING = new Set(["created", "queued"]);
  const IMAGE = /\.(png|jpe?g|gif|webp|svg)$/i;
  const TABLE = /\.(csv|tsv)$/i;
  const TEXT = /\.(txt|log|out|md|json|ya?ml|py|toml|ini|cfg|tex)$/i;
  const MAX_TEXT_BYTES = 64 * 1024;      // a preview reads at most this much of a file
  const MAX_IMAGE_BYTES = 8 * 1024 * 1024;
  const TABLE_ROWS = 20;
  const OPEN_PREVIEWS = 4;               // the first few previews are open, the rest on click

  window.labqJobExtras = function (id) {
    const L = window.labq;
    const { el, $, api, clear, setText, fmtDuration, fmtBytes, apiJob, TERMINAL } = L;
    const usage = { samples: [], limit: null, loadedEnded: false };
    let lastState = null;
    let liveRun = null;  // seconds run so far, from status ticks (pauses excluded)
    let rerunFilled = false;

    // ---------------------------------------------------------------- waiting
    function renderWaiting(job) {
      const box = $("#waiting");
      if (!box) return;
      // Held by fair share: off the queue (no place, no estimate) until one of the
      // user's own jobs ends.
      const held = job.state === "created" && Boolean(job.hold_reason);
      const waiting = WAITING.has(job.state) && (job.queue_position != null || held);
      box.hidden = !waiting;
      if (!waiting) return;
      setText($("#waiting-place"), held ? "held: not in the queue yet" : ordinal(job.queue_position));
      setText($("#waiting-reason"), job.waiting_reason || job.hold_reason || "");
      const start = job.estimated_start_at ? Date.parse(job.estimated_start_at) : NaN;
      const when = $("#waiting-start");
      if (held) {
        setText(when, "when one of your queued or running jobs ends");
      } else if (isNaN(start)) {
        setText(when, "not known yet (no finished jobs to learn run times from)");
      } else {
        const inS = Math.max(0, (start - Date.now()) / 1000);
        setText(when, `around ${new Date(start).toLocaleTimeString()}` +
          (inS >= 1 ? ` (in about ${fmtDuration(inS)})` : " (any moment now)"));
      }
    }

    function ordinal(n) {
      const s = ["th", "st", "nd", "rd"]; const v = n % 100;
      return `${n}${s[(v - 20) % 10] || s[v] || s[0]} in the queue`;
    }

    // ---------------------------------------------------------------- stages
    function renderStages(job) {
      const box = $("#stages");
      if (!box) return;
      clear(box);
      const d = Object.assign({}, job.durations || {});
      if (!TERMINAL.has(job.state) && liveRun != null && (d.run_s == null || liveRun > d.run_s)) {
        d.run_s = liveRun;  // the server's figure is as of the last fetch; ticks are newer
        const created = L.parseTime(job.created_at);
        if (created) d.total_s = Math.max(d.total_s || 0, (Date.now() - created) / 1000);
      }
      for (const [key, label] of STAGES) {
        if (d[key] == null) continue;
        box.append(el("dt", { text: label }),
          el("dd", { dataset: { stage: key }, text: fmtDuration(d[key]) || "0s" }));
      }
      if (!box.firstChild) box.append(el("dd", { class: "muted", text: "Nothing yet." }));
    }

    // ---------------------------------------------------------------- usage
    function renderUsage(job) {
      usage.limit = job.spec && job.spec.memory_mb ? Number(job.spec.memory_mb) : null;
      const summary = [];
      if (job.peak_rss_mb != null) summary.push(`peak ${fmtMb(job.peak_rss_mb)}`);
      if (usage.limit) summary.push(`limit ${fmtMb(usage.limit)}`);
      if (job.cpu_s != null) summary.push(`CPU time ${fmtCpu(job.cpu_s)}`);
      setText($("#usage-summary"), summary.join(" · "));
      const oom = $("#oom");
      const err = String(job.error || "");
      if (oom) {
        oom.hidden = !/out of memory/i.test(err);
        if (!oom.hidden) {
          setText(oom, `${err}. Give the job more memory (memory_mb in labq.toml, or ` +
            "“Run again” below with a higher memory limit) or make it use less.");
        }
      }
      if (TERMINAL.has(job.state) && !usage.loadedEnded) {
        usage.loadedEnded = true;
        api(`${apiJob(id)}/usage`).then((data) => {
          if (data && Array.isArray(data.samples)) {
            usage.samples = data.samples.map((s) => [Number(s[0]), Number(s[1]), Number(s[2])]);
          }
          drawChart();
        }).catch(() => drawChart());
      } else {
        drawChart();
      }
    }

    function fmtMb(mb) { return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GB` : `${Math.round(mb)} MB`; }
    function fmtCpu(s) { return s < 10 ? `${Number(s).toFixed(2)} s` : fmtDuration(s); }

    function status(ev) {
      if (ev.elapsed_s == null) return;
      const t = Number(ev.elapsed_s);
      liveRun = t;
      if (ev.memory_mb == null) return;
      const last = usage.samples[usage.samples.length - 1];
      if (last && t <= last[0]) return;
      usage.samples.push([t, Number(ev.memory_mb), ev.cpu_s == null ? NaN : Number(ev.cpu_s)]);
      if (usage.samples.length > 2000) usage.samples = usage.samples.filter((_, i) => i % 2 === 0);
      drawChart();
    }

    /** Memory (MB, solid) and CPU use (% of one core, dashed) over the run, as SVG. */
    function drawChart() {
      const box = $("#usage-chart");
      if (!box) return;
      const pts = usage.samples;
      if (pts.length < 2) {
        if (!box.querySelector("p")) {
          clear(box);
          box.append(el("p", { class: "muted", text: "Samples appear here while the job runs." }));
        }
        return;
      }
      const W = 600; const H = 170; const P = { l: 52, r: 52, t: 10, b: 24 };
      const tMax = Math.max(pts[pts.length - 1][0], 1);
      const peak = Math.max(...pts.map((p) => p[1]), 1);
      // A limit far above what the job uses would flatten the curve: then it is only named.
      const showLimit = usage.limit && usage.limit <= 3 * peak;
      const memMax = niceMax(Math.max(peak * 1.1, showLimit ? usage.limit : 0));
      const cpu = pts.map((p, i) => {
        if (i === 0) return 0;
        const dt = p[0] - pts[i - 1][0];
        const dc = p[2] - pts[i - 1][2];
        return dt > 0 && isFinite(dc) ? Math.max(0, (100 * dc) / dt) : 0;
      });
      const cpuMax = niceMax(Math.max(...cpu, 100));
      const x = (t) => P.l + ((W - P.l - P.r) * t) / tMax;
      const yMem = (m) => H - P.b - ((H - P.t - P.b) * m) / memMax;
      const yCpu = (c) => H - P.b - ((H - P.t - P.b) * c) / cpuMax;
      const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart-svg",
        "aria-label": `Memory use over ${fmtDuration(tMax)}: peak ${fmtMb(Math.max(...pts.map((p) => p[1])))}` });
      svg.append(svgEl("line", { x1: P.l, y1: H - P.b, x2: W - P.r, y2: H - P.b, class: "axis" }));
      if (showLimit) {
        svg.append(svgEl("line", { x1: P.l, x2: W - P.r, y1: yMem(usage.limit), y2: yMem(usage.limit),
          class: "limit" }));
      }
      svg.append(svgEl("polyline", { class: "series-cpu", fill: "none",
        points: pts.map((p, i) => `${x(p[0]).toFixed(1)},${yCpu(cpu[i]).toFixed(1)}`).join(" ") }));
      svg.append(svgEl("polyline", { class: "series-mem", fill: "none",
        points: pts.map((p) => `${x(p[0]).toFixed(1)},${yMem(p[1]).toFixed(1)}`).join(" ") }));
      svg.append(label(4, P.t + 10, fmtMb(memMax), "tick-mem"),
        label(4, H - P.b, "0", "tick-mem"),
        label(W - P.r + 6, P.t + 10, `${cpuMax}%`, "tick-cpu"),
        label(P.l, H - 6, "0s", "tick"),
        label(W - P.r - 30, H - 6, fmtDuration(tMax), "tick"));
      clear(box);
      box.dataset.samples = String(pts.length);
      box.append(svg, el("p", { class: "legend muted" },
        el("span", { class: "key key-mem" }), " memory ",
        el("span", { class: "key key-cpu" }), " CPU (% of one core)",
        showLimit ? el("span", {}, " ", el("span", { class: "key key-limit" }), " memory limit") : null));
    }

    function niceMax(v) {
      const p = 10 ** Math.floor(Math.log10(v));
      for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
      return 10 * p;
    }

    function svgEl(tag, attrs) {
      const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
      for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
      return node;
    }

    function label(xPos, yPos, text, cls) {
      const t = svgEl("text", { x: xPos, y: yPos, class: cls });
      t.textContent = text;
      return t;
    }

    // ---------------------------------------------------------------- run again
    function renderRerun(job) {
      const box = $("#rerun-section");
      if (!box) return;
      box.hidden = !TERMINAL.has(job.state);
      if (box.hidden || rerunFilled) return;
      rerunFilled = true;
      const spec = job.spec || {};
      $("#rerun-args").value = (spec.args || []).join("\n");
      $("#rerun-timeout").value = spec.timeout_s || "";
      $("#rerun-memory").value = spec.memory_mb || "";
    }

    function wireRerun() {
      const form = $("#rerun-form");
      if (!form) return;
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        const body = { args: $("#rerun-args").value.split("\n").map((a) => a.trim()).filter(Boolean) };
        for (const [field, input] of [["timeout_s", "#rerun-timeout"], ["memory_mb", "#rerun-memory"]]) {
          const raw = $(input).value.trim();
          if (raw) body[field] = Number(raw);
        }
        const button = form.querySelector("button[type=submit]");
        button.disabled = true;
        setText($("#rerun-error"), "Submitting…");
        try {
          const job = await api(`${apiJob(id)}/rerun`, { method: "POST", json: body });
          location.href = L.jobUrl(job.id);
        } catch (err) {
          setText($("#rerun-error"), err.message);
          button.disabled = false;
        }
      });
    }

    // ---------------------------------------------------------------- notification
    const notifyKey = `labq-notify-${id}`;

    function wireNotify() {
      const button = $("#notify-me");
      if (!button || !("Notification" in window)) return;
      button.addEventListener("click", async () => {
        let permission = Notification.permission;
        if (permission === "default") permission = await Notification.requestPermission();
        if (permission !== "granted") {
          setText(button, "Notifications are blocked for this site");
          button.disabled = true;
          return;
        }
        sessionStorage.setItem(notifyKey, "1");
        setText(button, "You will be notified when it ends");
        button.disabled = true;
      });
    }

    function renderNotify(job) {
      const button = $("#notify-me");
      if (!button || !("Notification" in window)) return;
      const armed = sessionStorage.getItem(notifyKey) === "1";
      button.hidden = TERMINAL.has(job.state);
      if (armed && !button.hidden) {
        setText(button, "You will be notified when it ends");
        button.disabled = true;
      }
      const ended = TERMINAL.has(job.state) && lastState !== null && !TERMINAL.has(lastState);
      if (ended && armed && Notification.permission === "granted") {
        sessionStorage.removeItem(notifyKey);
        const outcome = job.outcome || job.state;
        const n = new Notification(`labq: ${job.name || L.shortId(job.id)} ${outcome}`, {
          body: job.error ? String(job.error).slice(0, 200) : `The job ${outcome}.`, tag: id });
        n.onclick = () => { window.focus(); n.close(); };
      }
    }

    // ---------------------------------------------------------------- links
    function renderLinks(job) {
      const box = $("#job-links");
      if (!box) return;
      clear(box);
      if (job.group_id) {
        box.append(el("a", { href: `/groups/${encodeURIComponent(job.group_id)}`, id: "group-link",
          text: "All jobs of this sweep" }));
      }
      if (job.rerun_of) {
        if (box.firstChild) box.append(" · ");
        box.append("Re-run of ", el("a", { href: L.jobUrl(job.rerun_of), class: "mono",
          text: L.shortId(job.rerun_of) }));
      }
      box.append(box.firstChild ? " · " : "", el("a", { href: `${apiJob(id)}/receipt`,
        text: "Reproducibility receipt (JSON)" }));
    }

    // ---------------------------------------------------------------- previews
    function previews(files, filesBox) {
      const wanted = files.filter((f) => kind(f.path));
      if (!wanted.length) return;
      const box = el("div", { class: "previews", id: "previews" });
      wanted.forEach((f, i) => {
        const href = `${apiJob(id)}/results/files/${String(f.path).split("/").map(encodeURIComponent).join("/")}`;
        const body = el("div", { class: "preview-body" });
        const details = el("details", { class: "preview", dataset: { path: f.path, kind: kind(f.path) } },
          el("summary", {}, el("span", { class: "mono", text: f.path }), " ",
            el("span", { class: "muted", text: fmtBytes(f.size) })), body);
        let loaded = false;
        const load = () => {
          if (loaded || !details.open) return;
          loaded = true;
          showPreview(f, href, body).catch((err) => {
            clear(body);
            body.append(el("p", { class: "muted", text: `No preview: ${err.message}` }));
          });
        };
        details.addEventListener("toggle", load);
        if (i < OPEN_PREVIEWS) details.open = true;
        box.append(details);
        load();
      });
      filesBox.append(el("h3", { class: "small-title", text: "Previews" }), box);
    }

    function kind(path) {
      const p = String(path);
      if (IMAGE.test(p)) return "image";
      if (TABLE.test(p)) return "table";
      if (TEXT.test(p)) return "text";
      return null;
    }

    async function showPreview(f, href, body) {
      const k = kind(f.path);
      if (k === "image") {
        if (f.size > MAX_IMAGE_BYTES) {
          body.append(el("p", { class: "muted", text: `Too large to show here (${fmtBytes(f.size)}); download it.` }));
          return;
        }
        body.append(el("img", { src: href, alt: `Result image ${f.path}`, loading: "lazy", class: "preview-img" }));
        return;
      }
      const { text, truncated } = await readStart(href, MAX_TEXT_BYTES);
      const note = truncated ? el("p", { class: "muted", text: `First ${fmtBytes(MAX_TEXT_BYTES)} of ${fmtBytes(f.size)}.` }) : null;
      if (k === "table") {
        const rows = parseDelimited(text, /\.tsv$/i.test(f.path) ? "\t" : ",", TABLE_ROWS + 1, truncated);
        body.append(tableOf(rows), el("p", { class: "muted",
          text: rows.length > TABLE_ROWS ? `First ${TABLE_ROWS} rows.` : `${Math.max(rows.length - 1, 0)} rows.` }));
        return;
      }
      let shown = text;
      if (/\.json$/i.test(f.path) && !truncated) {
        try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* shown as is */ }
      }
      body.append(el("pre", { class: "preview-text", text: shown }), note);
    }

    /** The first `limit` bytes of a file as text, without downloading the rest. */
    async function readStart(href, limit) {
      const resp = await fetch(href, { credentials: "same-origin" });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const reader = resp.body.getReader();
      const chunks = []; let size = 0; let truncated = false;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value); size += value.length;
        if (size > limit) { truncated = true; reader.cancel().catch(() => {}); break; }
      }
      const all = new Uint8Array(Math.min(size, limit));
      let at = 0;
      for (const c of chunks) {
        const part = c.subarray(0, Math.min(c.length, all.length - at));
        all.set(part, at); at += part.length;
        if (at >= all.length) break;
      }
      return { text: new TextDecoder().decode(all), truncated };
    }

    /** CSV/TSV rows (quotes as in RFC 4180); a cut-off last line is dropped. */
    function parseDelimited(text, sep, maxRows, truncated) {
      const rows = []; let row = []; let cell = ""; let quoted = false;
      for (let i = 0; i < text.length && rows.length < maxRows; i++) {
        const c = text[i];
        if (quoted) {
          if (c === '"' && text[i + 1] === '"') { cell += '"'; i++; } else if (c === '"') quoted = false;
          else cell += c;
        } else if (c === '"' && cell === "") quoted = true;
        else if (c === sep) { row.push(cell); cell = ""; } else if (c === "\n") {
          row.push(cell.replace(/\r$/, "")); rows.push(row); row = []; cell = "";
        } else cell += c;
      }
      if (!truncated && rows.length < maxRows && (cell || row.length)) { row.push(cell); rows.push(row); }
      return rows;
    }

    function tableOf(rows) {
      const table = el("table", { class: "jobs preview-table" });
      if (!rows.length) return el("p", { class: "muted", text: "Empty file." });
      table.append(el("thead", {}, el("tr", {}, rows[0].map((c) => el("th", { text: c })))));
      table.append(el("tbody", {}, rows.slice(1, TABLE_ROWS + 1).map((r) =>
        el("tr", {}, r.map((c) => el("td", { text: c }))))));
      return el("div", { class: "table-wrap" }, table);
    }

    // ---------------------------------------------------------------- wiring
    wireRerun();
    wireNotify();

    function render(job) {
      renderWaiting(job);
      renderStages(job);
      renderUsage(job);
      renderRerun(job);
      renderNotify(job);
      renderLinks(job);
      lastState = job.state;
    }

    return { render, status, previews };
  };
})();
