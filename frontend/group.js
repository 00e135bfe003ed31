/* The group page of a parameter sweep: every member's state, live, and one download of all
 * results. Loaded before app.js, which runs window.labqPages.group once signed in. */
"use strict";

(function () {
  window.labqPages = window.labqPages || {};

  window.labqPages.group = function pageGroup() {
    const L = window.labq;
    const { el, $, api, setText, TERMINAL } = L;
    const match = location.pathname.match(/\/groups\/([^/]+)\/?$/);
    const id = match ? decodeURIComponent(match[1]) : null;
    if (!id) { L.notify("No sweep id in the address.", "error"); return; }
    const { table, tbody } = L.jobTable();
    $("#group-wrap").append(table);
    const rows = new Map();
    const onChanged = () => refreshSoon();

    async function load() {
      const group = await api(`${L.API}/groups/${encodeURIComponent(id)}`);
      document.title = `${group.name} (sweep) · labq`;
      setText($("#group-name"), `${group.name} — sweep of ${group.size}`);
      const parts = Object.entries(group.states || {}).map(([s, n]) => `${n} ${s}`);
      const outcomes = Object.entries(group.outcomes || {}).map(([o, n]) => `${n} ${o}`);
      setText($("#group-summary"), [parts.join(", "), outcomes.length ? `(${outcomes.join(", ")})` : ""]
        .join(" ").trim() + (group.done ? " · all done" : ""));
      $("#group-summary").dataset.done = String(Boolean(group.done));
      const download = $("#group-download");
      download.href = group.links.results;
      download.hidden = !(group.jobs || []).some((j) => j.has_results);
      let prev = null;
      for (const job of group.jobs || []) {
        let tr = rows.get(job.id);
        if (tr) L.updateRow(tr, job, { onChanged });
        else { tr = L.jobRow(job, { onChanged }); rows.set(job.id, tr); }
        const want = prev ? prev.nextSibling : tbody.firstChild;
        if (want !== tr) tbody.insertBefore(tr, want);
        prev = tr;
      }
      return group;
    }

    const poller = L.poll(async () => {
      try {
        const group = await load();
        if (group.done) poller.stop();
      } catch (err) {
        L.notify(err.status === 404 ? `There is no sweep with id ${id}.` : err.message, "error");
        if (err.status === 404) poller.stop();
        throw err;
      }
    }, 5000, 2000);
    const refreshSoon = L.debounce(() => poller.now(), 300);

    L.events.subscribe((ev) => {
      const tr = rows.get(ev.job_id);
      if (!tr) return;
      if (ev.kind === "status") {
        if (ev.elapsed_s != null && !TERMINAL.has(tr._job.state)) {
          tr._elapsed = Number(ev.elapsed_s);
          L.updateRow(tr, tr._job, { onChanged });
        }
        return;
      }
      L.updateRow(tr, Object.assign({}, tr._job, { state: ev.state,
        outcome: ev.outcome ?? tr._job.outcome }), { onChanged });
      refreshSoon();
    });
  };
})();
